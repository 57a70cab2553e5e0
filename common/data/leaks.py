"""Files with identical content: in two splits a leak a researcher must know about; within one
split a duplicate (under two labels, a label conflict)."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict

import pandas as pd

from common.data.dataset import SPLITS, parallel

_HASH_CHUNK = 1 << 20


def _sha1(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_identical(table: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """``(path_a, split_a, path_b, split_b)`` for every pair of files of ``table`` (columns
    ``path``, ``split``) with identical content, ``split_a`` first in train, val, test order (then
    by path); sorted."""
    sizes = [os.path.getsize(p) for p in table["path"]]
    # Identical content implies identical size: hash only files whose size occurs more than
    # once, so a dataset without duplicates costs one stat per file, not a read of every byte.
    count = defaultdict(int)
    for size in sizes:
        count[size] += 1
    candidates = [(p, s) for p, s, size in zip(table["path"], table["split"], sizes) if count[size] > 1]
    digests = parallel(lambda ps: _sha1(ps[0]), candidates, "hashing for duplicates")
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for (path, split), digest in zip(candidates, digests):
        groups[digest].append((path, split))
    order = {s: i for i, s in enumerate(SPLITS)}
    pairs = []
    for members in groups.values():
        members.sort(key=lambda ps: (order[ps[1]], ps[0]))
        for i, (pa, sa) in enumerate(members):
            pairs.extend((pa, sa, pb, sb) for pb, sb in members[i + 1:])
    return sorted(pairs)

