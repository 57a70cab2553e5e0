"""The on-disk cache (common/data/cache.py): checked entries, and a file that is truncated, altered or
written for another key reported and recomputed, never used; a disabled cache reads and writes
nothing."""

from __future__ import annotations

import logging

import numpy as np

from common.data.cache import Cache, cache_key
from common.io import read_checked_npz, write_checked_npz


def test_checked_cache_files(tmp_path, caplog):
    cache = Cache(tmp_path)
    key = cache_key({"kind": "features", "x": 1})
    arrays = {"pooled": np.arange(12, dtype=np.float32).reshape(3, 4), "patch_mean": np.ones((3, 4), np.float32)}
    cache.save("features", key, arrays)
    path = cache.path("features", key)
    assert read_checked_npz(path, key)["pooled"].tolist() == arrays["pooled"].tolist()
    assert cache.load("features", key) is not None

    # zeroed arrays written back under the same name (a silently altered file): refused
    write_checked_npz(path, {"pooled": np.zeros((3, 4), np.float32), "patch_mean": np.ones((3, 4), np.float32)},
                      "another key")
    with caplog.at_level(logging.WARNING):
        assert cache.load("features", key) is None
    assert "written for another key" in caplog.text and str(path) in caplog.text
    # the arrays zeroed but key and checksum kept (altered in place): the checksum refuses it
    cache.save("features", key, arrays)
    with np.load(path) as data:
        content = {name: data[name] for name in data.files}
    content["pooled"] = np.zeros_like(content["pooled"])
    with open(path, "wb") as stream:
        np.savez(stream, **content)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cache.load("features", key) is None
    assert "checksum" in caplog.text
    # truncated
    cache.save("features", key, arrays)
    path.write_bytes(path.read_bytes()[:200])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cache.load("features", key) is None
    assert "unreadable" in caplog.text
    # a disabled cache (--no_cache) reads and writes nothing
    off = Cache(tmp_path / "off", enabled=False)
    off.save("features", key, arrays)
    assert off.load("features", key) is None and not (tmp_path / "off").exists()
