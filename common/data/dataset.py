"""The shapes every dataset module shares: the loaded :class:`Dataset`, what a layout reader
returns (:class:`Found`), how a dataset module describes itself (:class:`DatasetKind`), the
collector of warnings and skipped files (:class:`Notes`), and the text helpers that turn any
path the OS allows into a one-line, printable message.

Paths are kept as Python holds them (``str``; bytes that are not valid UTF-8 become lone
surrogates), so ``splits.csv`` can write them back byte-exactly (:mod:`common.io`).  Only text
meant for a human goes through :func:`printable`, which shows such bytes as ``\\xNN``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd
from tqdm.auto import tqdm

from common.errors import UserError

logger = logging.getLogger("common.data.registry")

SPLITS = ("train", "val", "test")
TABLE_COLUMNS = ["path", "label", "class_name", "split"]
# What a layout reader hands back, one row per candidate image.
FOUND_COLUMNS = ["path", "raw_label", "class_name", "split"]

_FIRST_FEW = 5
_WORKERS = min(8, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# text


def printable(text: str | os.PathLike) -> str:
    """``text`` safe to print on one line: bytes that are not UTF-8 (lone surrogates) shown as
    ``\\xNN``, control characters (a newline in a file name) escaped."""
    text = os.fspath(text)
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def first_few(items: Iterable[object], n: int = _FIRST_FEW) -> str:
    """``"a, b, c, ... (+7 more)"``: a list cut short for a one-line message."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def has_surrogates(text: str) -> bool:
    """True if ``text`` holds bytes that were not UTF-8 (read with ``surrogateescape``)."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def absolute(path: str | os.PathLike) -> str:
    """Absolute path as a str; ``abspath``, not ``resolve()``, keeps the user's symlinks."""
    return os.path.abspath(os.fspath(path))


def relative_display(path: str | os.PathLike, root: Path | None) -> str:
    """``path`` relative to ``root`` when it lies inside it, else absolute; printable."""
    full = absolute(path)
    if root is not None:
        base = absolute(root)
        try:
            if os.path.commonpath([full, base]) == base:
                return printable(os.path.relpath(full, base))
        except ValueError:  # another drive (Windows): not inside root
            pass
    return printable(full)


# --------------------------------------------------------------------------------------------
# the loaded dataset


@dataclass
class Dataset:
    """A loaded, split dataset.

    ``table`` columns are exactly ``path`` (absolute str), ``label`` (int 0..C-1, index into
    ``class_names``), ``class_name`` and ``split`` (train|val|test); rows sorted by split order
    (train, val, test) then path; the text columns have object dtype (a name that is not valid
    UTF-8 stays a Python str whatever pandas' string storage).  ``skipped`` holds ``(absolute path, reason)``, ``leaks``
    ``(path_a, split_a, path_b, split_b)`` for files with identical content in two splits.
    ``course_class_order[j]`` is our label of the original course project's class ``j`` (it
    numbers classes by ``sorted()`` of the raw label values it read).  ``unused`` holds
    ``(absolute path, reason)`` for the files and folders under the root the layout did not use
    (a folder's path ends with the path separator).  ``masks`` maps an image's path to the path of
    its object mask, for the images that have one (:mod:`common.data.masks`).
    """

    name: str
    root: Path
    layout: str
    table: pd.DataFrame
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    leaks: list[tuple[str, str, str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # every warning logged while loading
    course_class_order: list[int] = field(default_factory=list)
    unused: list[tuple[str, str]] = field(default_factory=list)
    masks: dict[str, str] = field(default_factory=dict)

    def counts(self) -> pd.DataFrame:
        """Images per class (rows, in label order) and split (columns train, val, test)."""
        table = pd.crosstab(self.table["class_name"], self.table["split"])
        return table.reindex(index=self.class_names, columns=list(SPLITS), fill_value=0)

    def display(self, path: str | os.PathLike) -> str:
        """``path`` relative to the dataset root (absolute when outside it), printable: for
        messages and figure titles, where a base name alone is ambiguous."""
        return relative_display(path, self.root)


@dataclass
class Found:
    """What a layout reader found under a root.

    ``table`` has columns :data:`FOUND_COLUMNS`: ``path`` (absolute str), ``raw_label`` (the
    label value as the original course code would have read it: a folder name, or the CSV
    cell after pandas' type inference), ``class_name`` and ``split`` (train|val|test, or None
    where the layout has no official split).  ``layout`` is the line that names the files read.
    ``masks``: image path -> object mask path (absolute), for the images that have one.
    """

    table: pd.DataFrame
    layout: str
    masks: dict[str, str] = field(default_factory=dict)


def found_table(rows: list[tuple[str, object, str, str | None]]) -> pd.DataFrame:
    """A :class:`Found` table from ``(path, raw_label, class_name, split)`` rows.  Object dtype:
    a path that is not valid UTF-8 must stay a Python str (pandas' string storage may refuse it)."""
    return pd.DataFrame(rows, columns=FOUND_COLUMNS, dtype=object)


# --------------------------------------------------------------------------------------------
# warnings and skipped files


class Notes:
    """Collects what a load has to tell: warnings (logged and kept for the report), files
    skipped on disk (unreadable, not an image, unknown class code ...), CSV rows whose
    file is absent, and the files and folders a layout read or explains besides its images
    (label CSVs, mask files, an unlabelled test set), which are not "unused".  Paths in messages
    are shown relative to ``root``."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.warnings: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.absent: list[tuple[str, str]] = []
        self.read: set[str] = set()
        self.passed: list[tuple[str, str]] = []

    def show(self, path: str | os.PathLike) -> str:
        """``path`` for a message, relative to the root; a folder (ending in a separator) ends in ``/``."""
        text = os.fspath(path)
        if text.endswith(os.sep):
            return relative_display(text.rstrip(os.sep), self.root) + "/"
        return relative_display(text, self.root)

    def uses(self, *paths: str | os.PathLike) -> None:
        """Files or folders the layout read or explains besides its images (never "unused")."""
        self.read.update(absolute(p) for p in paths)

    def warn(self, message: str) -> None:
        logger.warning(message)
        self.warnings.append(message)

    def skip(self, path: str | os.PathLike, reason: str) -> None:
        """A file on disk that is not used; reported in one summary warning at the end."""
        self.skipped.append((absolute(path), reason))

    def pass_over(self, path: str, reason: str) -> None:
        """A file or folder (path ending in a separator) the layout does not use, and why."""
        self.passed.append((path, reason))

    def missing(self, csv: Path, paths: list[str], *, listed: int, fix: str) -> None:
        """Rows of ``csv`` whose file does not exist: one warning with the count, left out.  When
        none of the ``listed`` rows has a file, the CSV and its images do not match: a
        :class:`UserError` naming the first file looked for and ``fix`` (what to check)."""
        if not paths:
            return
        if any(has_surrogates(p) for p in paths):
            fix = f"{csv.name} is not UTF-8 text: save it as UTF-8 (in Excel: CSV UTF-8); or {fix}"
        if len(paths) >= listed:
            raise UserError(f"none of the {listed} file(s) listed in {printable(csv)} exists: the first was "
                            f"looked for as {self.show(paths[0])}; {fix}")
        reason = f"missing: listed in {csv.name}, no file"
        self.absent.extend((absolute(p), reason) for p in paths)
        self.warn(f"{len(paths)} {csv.name} row(s) have no image file and are left out: "
                  f"{first_few(self.show(p) for p in paths)}")


# --------------------------------------------------------------------------------------------
# how a dataset module describes itself


class Painter(Protocol):
    """Draws one synthetic PNG (see :mod:`common.demo.synthetic`); ``k`` is the class index, ``n``
    the image number within the class (content is a function of both and ``seed``, which
    layout writers also use for anything else they draw, such as APTOS id codes)."""

    seed: int

    def image(self, k: int, n: int, path: Path) -> None: ...

    def mask(self, k: int, n: int, path: Path) -> None: ...


@dataclass(frozen=True)
class SyntheticSpec:
    """How :func:`common.demo.synthetic.make_synthetic` lays out this dataset.

    ``write(root, classes, per_class, layout, painter)`` writes ``per_class`` images for each
    of the first ``classes`` classes in layout ``layout`` (one of ``layouts``; the first is the
    one most users have).  ``style`` picks the drawing: "pacemaker", "implant" or "fundus".
    """

    layouts: tuple[str, ...]
    default_classes: int
    max_classes: int
    style: str
    write: Callable[[Path, int, int, str, Painter], None]


def _no_report_lines(class_names: list[str]) -> list[str]:
    return []


@dataclass(frozen=True)
class DatasetKind:
    """One dataset module's description, found by the registry in :mod:`common.data.registry`.

    ``read(root, notes)`` detects the layout under ``root`` and returns a :class:`Found` (or
    raises :class:`~common.errors.UserError`).  ``label_to_class`` maps a manifest label to a
    class name (None: not a class of this dataset); ``labels_known`` says what is accepted.
    ``layout_folders`` (lower case) are folder names that belong to a layout and so are never
    taken for an archive's wrapper folder.  ``report_lines(class_names)`` adds the dataset's
    particulars to the ``--check_data`` report.
    """

    name: str
    expected: str
    read: Callable[[Path, Notes], Found]
    label_to_class: Callable[[str], str | None]
    labels_known: str = ""
    layout_folders: frozenset[str] = frozenset()
    report_lines: Callable[[list[str]], list[str]] = _no_report_lines
    synthetic: SyntheticSpec | None = None


# --------------------------------------------------------------------------------------------
# small shared helpers


def parallel(fn: Callable, items: list, desc: str) -> list:
    """``[fn(x) for x in items]`` on a thread pool (file reads and zlib CRCs release the GIL)."""
    if len(items) < 64:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(_WORKERS) as pool:
        return list(tqdm(pool.map(fn, items, chunksize=16), total=len(items), desc=desc,
                         leave=False, disable=None))


def int_like(text: object) -> bool:
    """True for an integer written in ASCII digits, optionally signed (``"01"``, ``"-3"``)."""
    return re.fullmatch(r"[+-]?[0-9]+", str(text).strip()) is not None
