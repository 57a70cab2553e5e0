"""The on-disk cache of a run: decoded images, features, detection rankings, analysis statistics.

Every entry is one checksummed ``.npz`` (:func:`common.io.write_checked_npz`) named by a key: the
SHA-256 of a canonical JSON of everything that changes the entry.  Reading verifies the key and
the checksum, so a truncated, altered or foreign file is reported with one warning and
recomputed, never used.  Writes are atomic, so an interrupted run leaves no half-written entry
and a re-run resumes from the entries that were complete.

A cache is an aid, never a reason to stop: when an entry cannot be written or read for a fault of
the machine (a full disk or quota, a path too long, no permission), the run warns once, naming
the cache folder and the fault, and carries on without writing to the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

from common.errors import shown_path
from common.io import read_checked_npz, write_checked_npz

log = logging.getLogger(__name__)

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
    return default_cache_source()[0]


def default_cache_source() -> tuple[Path, str]:
    """The default cache folder and where it comes from, as a message names it: ``TTR_CACHE_DIR``,
    ``XDG_CACHE_HOME`` or ``the default``."""
    if os.environ.get("TTR_CACHE_DIR"):
        return Path(os.environ["TTR_CACHE_DIR"]), "TTR_CACHE_DIR"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "ttr-medical", "XDG_CACHE_HOME"
    return Path(os.path.expanduser("~")) / ".cache" / "ttr-medical", "the default"


class Cache:
    """Checked ``.npz`` entries under ``root/<kind>/<key[:2]>/<key>.npz``; a disabled cache
    (``--no_cache``) reads nothing and writes nothing.  Safe to use from several threads."""

    def __init__(self, root: str | Path | None, enabled: bool = True):
        self.root = Path(root) if root is not None else None
        self.enabled = enabled and root is not None
        self.fault: OSError | None = None      # the first fault of the machine met; no writes after it
        self._lock = threading.Lock()

    def path(self, kind: str, key: str) -> Path:
        assert self.root is not None
        return self.root / kind / key[:2] / f"{key}.npz"

    def load(self, kind: str, key: str, what: str | None = None) -> dict[str, np.ndarray] | None:
        if not self.enabled:
            return None
        try:
            return read_checked_npz(self.path(kind, key), key, what or f"{kind} cache file")
        except OSError as error:      # the path cannot even be looked at (too long, no permission)
            self._fault(error)
            return None

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        if not self.enabled or self.fault is not None:
            return
        try:
            write_checked_npz(self.path(kind, key), arrays, key)
        except OSError as error:
            self._fault(error)

    def _fault(self, error: OSError) -> None:
        """Warn once about a fault of the cache folder; writing stops (this run's results do not
        depend on the cache, only a re-run's speed)."""
        with self._lock:
            if self.fault is not None:
                return
            self.fault = error
        log.warning("the cache %s cannot be written (%s); carrying on without caching: this run's results are "
                    "not affected, a re-run recomputes what was not cached (free some space, pass another --cache_dir, "
                    "or --no_cache)", shown_path(self.root), error.strerror or error)
