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


def test_a_cache_that_cannot_be_written_warns_once_and_the_work_goes_on(tmp_path, caplog, monkeypatch):
    """A full disk under the cache (write_checked_npz raising ENOSPC, as the OS does with no file
    name): one warning naming the cache folder, then no more writes, from any thread."""
    import errno
    import os
    from concurrent.futures import ThreadPoolExecutor

    import common.data.cache as cache_module

    calls = []

    def full(path, arrays, key):
        calls.append(path)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_module, "write_checked_npz", full)
    cache = Cache(tmp_path / "cache")
    arrays = {"x": np.zeros(2)}
    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: cache.save("images", cache_key({"i": i}), arrays), range(64)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(tmp_path / "cache") in warnings[0] and "No space left on device" in warnings[0]
    assert "carrying on without caching" in warnings[0]
    assert cache.fault is not None and len(calls) <= 8          # no write after the fault was seen
    cache.save("images", cache_key({"i": 99}), arrays)
    assert len(calls) <= 8


def test_a_cache_entry_path_that_cannot_be_looked_at_is_a_miss(tmp_path, caplog):
    """A cache folder so deep that an entry's path is too long to even stat: a miss and one
    warning, not a traceback."""
    root = tmp_path
    while len(str(root)) < 4000:
        root = root / ("d" * 200)
    cache = Cache(root)
    with caplog.at_level(logging.WARNING):
        assert cache.load("features", cache_key({"x": 1})) is None
        assert cache.load("features", cache_key({"x": 2})) is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert cache.fault is not None and cache.fault.errno == 36     # ENAMETOOLONG
