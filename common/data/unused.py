"""What a layout passed over: files and folders under the dataset root that no image, label CSV
or explained part of the layout accounts for, each with why, for one warning.

A folder in which nothing is used is named once, with what it holds (``Train/Docs/ (2 files, no
image: .docx, .txt)``, ``Train/Empty/ (empty folder)``); inside folders that are partly used, each
file is named.  Hidden files and OS litter (``Thumbs.db``, ``.DS_Store``, ``__MACOSX``, ``._*``
beside non-images) are not counted.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from common.data.folders import walk
from common.data.images import is_image_file

ARCHIVE_SUFFIXES = frozenset({".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"})


def _kind(path: Path) -> str:
    """``image``, ``archive``, or the file's suffix (``no suffix``)."""
    suffix = path.suffix.lower()
    if path.name.upper() == "DICOMDIR":
        return "DICOMDIR"
    if suffix in ARCHIVE_SUFFIXES:
        return "archive"
    if is_image_file(path):
        return "image"
    return suffix or "no suffix"


def _file_reason(path: Path) -> str:
    kind = _kind(path)
    if kind == "archive":
        return "an archive: unzip it to use the images inside"
    if kind == "image":
        return "an image in no class folder and no label CSV of this layout"
    if kind == ".csv":
        return "a CSV this layout does not read"
    if kind == "DICOMDIR":
        return "a DICOM index, not an image"
    return f"not an image: {kind}"


def _folder_reason(files: list[Path]) -> str:
    if not files:
        return "empty folder"
    kinds = Counter(_kind(f) for f in files)
    if kinds.get("image"):
        return f"{len(files)} file(s), {kinds['image']} image(s) this layout does not read"
    if kinds.get("archive"):
        archives = sorted(f.name for f in files if _kind(f) == "archive")
        return f"holds {', '.join(archives[:3])}: unzip it to use the images inside"
    return f"{len(files)} file(s), no image: {', '.join(sorted(kinds))}"


def unused_under(root: Path, used: set[str]) -> list[tuple[str, str]]:
    """``(absolute path, reason)`` for what under ``root`` is not in ``used`` (absolute paths of
    files, or of folders whose whole content is accounted for).  Folder paths end with ``/``."""
    loops: list[Path] = []
    tree: dict[Path, tuple[list[Path], list[Path]]] = {}
    for folder, dirs, files in walk(root, loops):
        tree[folder] = (dirs, files)

    def scan(folder: Path) -> tuple[int, list[tuple[str, str]], list[Path]]:
        """(files used, entries, every file) under ``folder``."""
        dirs, files = tree.get(folder, ([], []))
        n_used, entries, everything = 0, [], list(files)
        for f in files:
            if str(f) in used:
                n_used += 1
            else:
                entries.append((str(f), _file_reason(f)))
        for d in dirs:
            if str(d) in used:
                n_used += 1
                continue
            sub_used, sub_entries, sub_files = scan(d)
            everything += sub_files
            if sub_used:
                n_used += sub_used
                entries += sub_entries
            else:
                entries.append((str(d) + os.sep, _folder_reason(sub_files)))
        return n_used, entries, everything

    entries = scan(root)[1]
    for link in loops:
        inside = str(link) + os.sep
        # A class folder's own walk may have read it (a link to another class's folder).
        if str(link) not in used and not any(p.startswith(inside) for p in used):
            entries.append((inside, "a symlink to a folder read already (a loop): not read twice"))
    return sorted(entries)
