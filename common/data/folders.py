"""Reading folder trees as datasets ship them: listings without OS litter, names matched in any
case, image folders that Kaggle doubles (``train_images/train_images/``), split folders, class
folders, the wrapper folder an unzipped archive adds around everything, and file names in a CSV
that repeat the image folder they are looked for in.

Symlinked folders are followed (a class folder, or a folder inside one), each real folder once:
a link back to a folder already read (a loop) is passed over and named."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from common.data.dataset import SPLITS, Notes, first_few, found_table, printable
from common.data.images import is_ignored, is_image_file
from common.errors import UserError

logger = logging.getLogger("common.data.registry")

# Folder names (lower case) that mean a split rather than a class.
SPLIT_FOLDER_NAMES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}


def listdir(folder: Path) -> tuple[list[Path], list[Path]]:
    """Subfolders and files of ``folder`` (sorted by name), hidden files and OS litter left out."""
    dirs, files = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_ignored(entry.name):
            continue
        (dirs if entry.is_dir() else files).append(Path(entry.path))
    return dirs, files


def image_files(files: Iterable[Path]) -> list[Path]:
    """The files that are images: an image suffix, or DICOM whatever the name."""
    return [f for f in files if is_image_file(f)]


def walk(folder: Path, loops: list[Path] | None = None) -> Iterator[tuple[Path, list[Path], list[Path]]]:
    """``(folder, subfolders, files)`` top-down under ``folder``, sorted, litter left out, symlinked
    folders followed once each; a link to a folder already visited or to a parent of the folder
    it is in is appended to ``loops``."""
    seen = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = os.path.realpath(dirpath) + os.sep
        kept = []
        for name in sorted(dirnames):
            if is_ignored(name):
                continue
            real = os.path.realpath(os.path.join(dirpath, name))
            # A folder seen already, or one this folder lies inside (a link to a parent), is a loop.
            if real in seen or here.startswith(real + os.sep):
                if loops is not None:
                    loops.append(Path(dirpath) / name)
                continue
            seen.add(real)
            kept.append(name)
        dirnames[:] = kept
        yield (Path(dirpath), [Path(dirpath) / d for d in kept],
               [Path(dirpath) / f for f in sorted(filenames) if not is_ignored(f)])


def walk_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursive, sorted, symlinked folders followed), litter left out."""
    return [f for _, _, files in walk(folder) for f in image_files(files)]


def strip_folder_prefix(name: str, folder: Path, root: Path) -> str:
    """``name`` (a file name from a CSV) without leading folders that repeat the image folder it is
    looked for in: ``train_images/x.png`` in ``train_images/`` (or ``train_images/train_images/``)
    is ``x.png``.  Matched case-insensitively, ``\\`` read as ``/``; other names unchanged."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    where = [p.lower() for p in Path(os.path.relpath(folder, root)).parts if p != "."]
    for k in range(min(len(parts) - 1, len(where)), 0, -1):
        lead = [p.lower() for p in parts[:k]]
        if lead == where[len(where) - k:] or lead == where[:k]:
            return "/".join(parts[k:])
    return name


def find_child(folder: Path, name: str) -> Path | None:
    """``folder/name`` matched case-insensitively (the exact spelling preferred), or None."""
    exact = folder / name
    if exact.exists():
        return exact
    matches = sorted(e for e in os.listdir(folder) if e.lower() == name.lower())
    return folder / matches[0] if matches else None


def image_folder(root: Path, name: str) -> Path | None:
    """The image folder ``root/name/``, or ``root/name/name/`` when Kaggle doubled it (the
    outer folder then holds the inner one and no images of its own); None if absent."""
    outer = find_child(root, name)
    if outer is None or not outer.is_dir():
        return None
    inner = find_child(outer, name)
    if inner is not None and inner.is_dir() and not image_files(listdir(outer)[1]):
        return inner
    return outer


def shown_folder(folder: Path, root: Path) -> str:
    """``folder`` relative to ``root`` with a trailing slash, for layout lines."""
    return printable(os.path.relpath(folder, root)) + "/"


def split_folders(root: Path) -> dict[str, Path]:
    """Subfolders of ``root`` named like a split (any case) -> ``{split: folder}``."""
    found: dict[str, Path] = {}
    for folder in listdir(root)[0]:
        split = SPLIT_FOLDER_NAMES.get(folder.name.lower())
        if split is None:
            continue
        if split in found:
            raise UserError(
                f"both {printable(found[split])} and {printable(folder)} look like the {split} split "
                "folder; keep one of them (or choose the images with --manifest FILE)")
        found[split] = folder
    return found


def _litter(name: str) -> bool:
    # AppleDouble files (._x) next to a wrapper folder are macOS metadata, not content.
    return is_ignored(name) or name.startswith("._")


def descend_wrappers(root: Path, keep: frozenset[str]) -> tuple[Path, list[str]]:
    """Go down through wrapper folders (an unzipped archive's top folder): while ``root`` holds
    nothing but one subfolder, read from inside it.  A folder that is part of a layout (a split
    folder, or a name in ``keep`` such as ``orthonet data``) is never a wrapper.

    Returns the folder to read and the names of the wrappers passed.
    """
    passed: list[str] = []
    while True:
        entries = [e for e in os.scandir(root) if not _litter(e.name)]
        if len(entries) != 1 or not entries[0].is_dir():
            return root, passed
        name = entries[0].name
        if name.lower() in SPLIT_FOLDER_NAMES or name.lower() in keep:
            return root, passed
        root = Path(entries[0].path)
        passed.append(printable(name))
        logger.info("reading the dataset from inside the wrapper folder %s", printable(root))


def class_folders(root: Path, notes: Notes, *, class_of=lambda name: name, naming: str = ""):
    """Class-per-folder, with or without split folders (``Train/<class>/``, ``Test/<class>/``).

    ``class_of(folder name)`` gives the class name, or None for a folder that is no class of
    this dataset (an error listing them, ending with ``naming``: how to name class folders).
    Images lying outside any class folder are skipped.  An image path that is itself a split
    folder (``Train/``) with other split folders beside it is read, with a warning that they are not.
    Returns ``(found table, layout text)`` with the folder name as raw label.
    """
    splits = split_folders(root)
    split_of_root = SPLIT_FOLDER_NAMES.get(root.name.lower())
    if not splits and split_of_root:
        siblings = [printable(d.name) + "/" for d in listdir(root.parent)[0]
                    if SPLIT_FOLDER_NAMES.get(d.name.lower(), split_of_root) != split_of_root]
        if siblings:
            notes.warn(f"the image path is the {printable(root.name)}/ split folder: {first_few(siblings)} beside it "
                       f"{'is' if len(siblings) == 1 else 'are'} not read and the splits are carved from it; "
                       f"pass {printable(root.parent)} to keep the official split")
    if splits:
        if "train" not in splits:
            raise UserError(
                f"{printable(root)} has split folder(s) {first_few(p.name for p in splits.values())} "
                "but no Train/ folder; add Train/<class>/ folders")
        for other in listdir(root)[0]:
            if other not in splits.values():
                notes.pass_over(str(other) + os.sep, "a folder beside the split folders")
        parts = [(splits[s], s) for s in SPLITS if s in splits]
    else:
        parts = [(root, None)]
    rows, unknown, described = [], set(), []
    for folder, split in parts:
        dirs, files = listdir(folder)
        for stray in image_files(files):
            notes.skip(stray, "not inside a class folder")
        n_classes = 0
        for class_dir in dirs:
            images = walk_images(class_dir)
            if not images:
                continue
            name = class_of(class_dir.name)
            if name is None:
                unknown.add(printable(class_dir.name))
                continue
            n_classes += 1
            rows.extend((str(p), class_dir.name, name, split) for p in images)
        described.append(f"{shown_folder(folder, root)} ({n_classes} class folders)")
    if unknown:
        raise UserError(f"unknown class folder(s) in {printable(root)}: {first_few(sorted(unknown))}"
                        + (f"; {naming}" if naming else ""))
    if splits:
        return found_table(rows), "class-per-folder under " + ", ".join(described)
    return found_table(rows), f"class-per-folder directly under the root ({n_classes} class folders), no split folders"
