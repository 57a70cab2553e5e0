"""The output folder of a run (and the cache folder), checked before any work.

A run writes only under ``--out`` (and the cache).  Before anything slow happens the folder must
be usable: not a file, creatable and writable, not inside the dataset it reads (nothing a user
gave is modified), not a folder of the user's own files (a run folder carries a hidden marker;
a non-empty folder without it is refused), and not a finished run of another dataset or model
(its results would be mixed with ours).  ``--check_data`` refuses any finished run's folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from common.errors import UserError


def finished_run(folder: Path) -> dict | None:
    """The ``config.json`` of a finished run in ``folder`` (status done), else None."""
    try:
        info = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("status") == "done" else None


MARKER = ".ttr-medical-run"


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def _writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"{flag} {folder}: cannot write there ({error.strerror or error}); pass a writable "
                        "folder") from None


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
    _writable(folder, "--out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {folder}: not writable; pass a writable folder")
    (folder / MARKER).touch()
    return folder


def check_cache_dir(folder: Path) -> None:
    """The cache folder: a folder (created if missing) this process can write in."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--cache_dir {folder} is a file, not a folder; pass a folder (or --no_cache)")
    _writable(folder, "--cache_dir")
