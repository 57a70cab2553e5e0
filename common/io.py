"""Writing files that a crash cannot leave half-written, and cache files that cannot lie.

Every file this tool writes goes through :func:`atomic_write` (directly or through one of the
helpers below): the content is written to a temporary file in the same folder, flushed to disk
and renamed over the target, so a reader (or a re-run after SIGKILL) sees either the old file or
the new one, never a torn one.  Files get the permissions any tool gives them
(``0666 & ~umask``, usually 0644), not the 0600 of a bare ``mkstemp``.

Cache files (:func:`write_checked_npz` / :func:`read_checked_npz`) carry their key and a
SHA-256 of their arrays; reading verifies both, so a truncated, altered or foreign file is
reported and ignored (the caller recomputes), never used.

File names: paths the OS allows but that are not valid UTF-8 (Python holds them as lone
surrogates) are written back as their original bytes (``surrogateescape``) in text files and
CSVs, so every CSV row names the file exactly as it is on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

log = logging.getLogger(__name__)

TEXT_ERRORS = "surrogateescape"
CHECKSUM_FIELD = "__checksum__"
KEY_FIELD = "__key__"


def _read_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(current)
    return current


def file_mode() -> int:
    """Permissions of a new file: ``0666 & ~umask``."""
    return 0o666 & ~_read_umask()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(stream)`` on a temporary file, then rename it into place.

    The folder is created when missing.  On any error (also KeyboardInterrupt) the temporary file
    is removed and ``path`` is left as it was; an ``OSError`` (a full disk, a path too long) is
    raised naming ``path`` (:func:`naming`), so the one line the user sees says which file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        _reraise(error, path)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            _reraise(error, path)
        raise
    return path


def _reraise(error: OSError, path: Path):
    named = naming(error, path)
    if named is error:
        raise error
    raise named from error


def naming(error: OSError, path: Path) -> OSError:
    """``error`` naming the file being written: a full disk or a quota raises from a write or a
    flush with no file name, and a failed temporary file names a name the user never chose.  An
    error that names another path (a parent folder that cannot be made) keeps it."""
    named = error.filename
    if named is not None and not os.path.basename(os.fsdecode(named)).startswith(f".{path.name}."):
        return error
    try:
        return type(error)(error.errno, error.strerror or str(error), str(path))
    except Exception:  # noqa: BLE001 - an OSError subclass with a constructor of its own: keep it as it is
        return error


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda stream: stream.write(data))


def write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text; non-UTF-8 file names inside it are written back as their original bytes."""
    return write_bytes(path, text.encode("utf-8", errors=TEXT_ERRORS))


def _json_value(value: Any) -> Any:
    """Paths and numpy scalars as JSON values; anything else is an error (never silently str())."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: str | Path, data: Any) -> Path:
    """Indented JSON (non-ASCII escaped, so any file name round-trips exactly).  The JSON text is
    built before the file is touched: a value that cannot be written leaves the old file as it was."""
    return write_text(path, json.dumps(data, indent=1, default=_json_value) + "\n")


def write_csv(path: str | Path, frame) -> Path:
    """A pandas DataFrame as CSV (no index column)."""
    return write_text(path, frame.to_csv(index=False))


def save_figure(figure, path: str | Path, **savefig_kwargs) -> Path:
    """A matplotlib figure as PNG (the figure is closed afterwards, also on error)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda stream: figure.savefig(stream, format="png", **savefig_kwargs))
    finally:
        plt.close(figure)


# --------------------------------------------------------------------------------------------
# checked cache files


def _array_digest(arrays: dict[str, np.ndarray], key: str) -> str:
    digest = hashlib.sha256(key.encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_checked_npz(path: str | Path, arrays: dict[str, np.ndarray], key: str) -> Path:
    """An ``.npz`` holding ``arrays``, the cache ``key`` and a SHA-256 over both (atomic)."""
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    for reserved in (CHECKSUM_FIELD, KEY_FIELD):
        if reserved in arrays:
            raise ValueError(f"{reserved} is a reserved array name")
    payload = {**arrays, KEY_FIELD: np.array(key), CHECKSUM_FIELD: np.array(_array_digest(arrays, key))}
    return atomic_write(path, lambda stream: np.savez(stream, **payload))


def read_checked_npz(path: str | Path, key: str, what: str = "cache file") -> dict[str, np.ndarray] | None:
    """The arrays of a file written by :func:`write_checked_npz`, or None.

    None without a word when the file does not exist; None with one warning naming the file when
    it is unreadable, truncated, written for another key, or its arrays do not match their
    checksum (the caller recomputes and overwrites it).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as error:  # noqa: BLE001 - zip, zlib, format and OS errors all mean "unusable"
        log.warning("ignoring unreadable %s %s (%s: %s); recomputing it", what, path,
                    type(error).__name__, " ".join(str(error).split())[:120])
        return None
    stored_key = str(arrays.pop(KEY_FIELD, ""))
    stored_sum = str(arrays.pop(CHECKSUM_FIELD, ""))
    if stored_key != key:
        log.warning("ignoring %s %s: it was written for another key; recomputing it", what, path)
        return None
    if stored_sum != _array_digest(arrays, key):
        log.warning("ignoring %s %s: its contents do not match their checksum (altered or damaged); "
                    "recomputing it", what, path)
        return None
    return arrays
