"""The on-disk cache of a run: decoded images, features, detection rankings, analysis statistics.

Every entry is one checksummed ``.npz`` (:func:`common.io.write_checked_npz`) named by a key: the
SHA-256 of a canonical JSON of everything that changes the entry.  Reading verifies the key and
the checksum, so a truncated, altered or foreign file is reported with one warning and
recomputed, never used.  Writes are atomic, so an interrupted run leaves no half-written entry
and a re-run resumes from the entries that were complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from common.io import read_checked_npz, write_checked_npz

# Bump when what a cache entry holds changes meaning: old entries stop matching.
# 2: checksummed entries; CLIP's patch mean projected like its CLS; library versions, device
#    type and precision in every key.
CACHE_VERSION = 2
_LIBRARIES = ("torch", "open_clip_torch", "timm", "numpy")


def library_versions(packages: tuple[str, ...] = _LIBRARIES) -> dict[str, str]:
    """Installed version of each package ("not installed" when absent)."""
    import importlib.metadata as metadata

    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def cache_key(description: dict) -> str:
    """SHA-256 of a canonical JSON of ``description`` plus the cache version and library versions."""
    payload = json.dumps({"cache_version": CACHE_VERSION, "libraries": library_versions(), **description},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8", "surrogateescape")).hexdigest()


def default_cache_dir() -> Path:
    """``$TTR_CACHE_DIR``, else ``$XDG_CACHE_HOME/ttr-medical``, else ``~/.cache/ttr-medical``."""
    if os.environ.get("TTR_CACHE_DIR"):
        return Path(os.environ["TTR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ttr-medical"


class Cache:
    """Checked ``.npz`` entries under ``root/<kind>/<key[:2]>/<key>.npz``; a disabled cache
    (``--no_cache``) reads nothing and writes nothing."""

    def __init__(self, root: str | Path | None, enabled: bool = True):
        self.root = Path(root) if root is not None else None
        self.enabled = enabled and root is not None

    def path(self, kind: str, key: str) -> Path:
        assert self.root is not None
        return self.root / kind / key[:2] / f"{key}.npz"

    def load(self, kind: str, key: str, what: str | None = None) -> dict[str, np.ndarray] | None:
        if not self.enabled:
            return None
        return read_checked_npz(self.path(kind, key), key, what or f"{kind} cache file")

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        if self.enabled:
            write_checked_npz(self.path(kind, key), arrays, key)
