"""The output folder of a run (and the cache folder), checked before any work, and the lock that
keeps two processes out of one output folder (docs/run.md).

A run writes only under ``--out`` (and the cache).  Before anything slow happens the folder must
be usable: not a file, creatable and writable, not inside the dataset it reads (nothing a user
gave is modified), not a folder of the user's own files (a run folder carries a hidden marker;
a non-empty folder without it is refused), and not a finished run of another dataset or model
(its results would be mixed with ours).  ``--check_data`` refuses any finished run's folder.

While a run (or ``--check_data``, or a study) works in a folder it holds a
:class:`common.runtime.locks.FolderLock` on it: a second process on the same folder stops at once naming
the first one's host and pid.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from common.errors import UserError, shown_path


def finished_run(folder: Path) -> dict | None:
    """The ``config.json`` of a finished run in ``folder`` (status done), else None."""
    try:
        info = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("status") == "done" else None


MARKER = ".ttr-medical-run"
# Room a folder must leave below the system's limit on a path's length for the longest name a
# run writes in it (a cache entry: <kind>/<2>/<64 hex>.npz, and its temporary twin).
PATH_ROOM = 120


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def _path_max(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


def _writable(folder: Path, what: str, advice: str = "pass a writable folder") -> None:
    """``folder`` created if missing and written in once; UserError naming ``what`` otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"{what}: cannot write there ({error.strerror or error}); {advice}") from None
    length, limit = len(os.fsencode(folder)), _path_max(folder)
    if length + PATH_ROOM > limit:
        raise UserError(f"{what}: this path of {length} bytes leaves too little room for the files written in it "
                        f"(the file system allows {limit} in all); use a shorter path")


def prepare_out(folder: Path, *, dataset: str, model: str | None, check_data: bool = False,
                image_path: str | None = None) -> Path:
    """Create ``folder`` if needed and make sure this run may write there (UserError otherwise)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file, not a folder; pass a folder for the run's outputs")
    if image_path is not None and _inside(folder, Path(image_path)):
        raise UserError(f"--out {folder} is inside the dataset folder {image_path}; a run never writes into "
                        "the data it reads: pass another --out, outside the dataset folder")
    finished = finished_run(folder) if folder.is_dir() else None
    if folder.is_dir() and finished is None and not (folder / MARKER).exists() and \
            not (folder / "config.json").exists():
        foreign = sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))
        if foreign:
            raise UserError(f"--out {folder} already holds files that are not a run's ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); pass another --out (a new or empty folder)")
    if finished is not None:
        if check_data:
            raise UserError(f"--out {folder} holds a finished run ({finished.get('dataset')}, "
                            f"{finished.get('model')}); --check_data never overwrites a run's files: pass "
                            "another --out")
        if (finished.get("dataset"), finished.get("model")) != (dataset, model):
            raise UserError(f"--out {folder} holds a finished run of {finished.get('dataset')} with "
                            f"{finished.get('model')}; this is {dataset} with {model}: pass another --out")
    _writable(folder, f"--out {shown_path(folder)}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {folder}: not writable; pass a writable folder")
    (folder / MARKER).touch()
    return folder


def check_cache_dir(folder: Path, source: str = "--cache_dir") -> None:
    """The cache folder: a folder (created if missing) this process can write in.  ``source`` says
    where it came from, as the message names it: ``--cache_dir`` (the user's flag), or
    ``TTR_CACHE_DIR``, ``XDG_CACHE_HOME`` or ``the default`` (the user never named it)."""
    folder = Path(folder)
    if source == "--cache_dir":
        what, advice = f"--cache_dir {shown_path(folder)}", "pass a writable folder (or --no_cache)"
    else:
        what = (f"the default cache folder {shown_path(folder)}" if source == "the default" else
                f"the cache folder {shown_path(folder)} (from ${source})")
        advice = "pass --cache_dir DIR (a writable folder), or --no_cache to run without a cache"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} is a file, not a folder; {advice}")
    _writable(folder, what, advice)
