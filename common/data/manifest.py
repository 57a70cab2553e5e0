"""Reading label CSVs: the generic ``path,label[,split]`` manifest (``--manifest FILE`` or a CSV
found in a dataset folder), and the pieces the release-specific CSV layouts (APTOS, OrthoNet's
Kaggle release) share: reading every cell as text, checking labels and splits row by row,
reporting rows whose file is absent, and the label values as the course code's pandas saw them.

Manifest columns are matched case-insensitively; the first alias present wins:
path: ``path, filepath, file_path, file, filename, filenames, image, image_path, img``;
label: ``class_name, classname, label, labels, class, category, code``;
split: ``split, subset`` with values ``train``/``val``/``test`` (``valid``/``validation`` ->
``val``, any case).  Relative paths resolve against the CSV's folder.
"""

from __future__ import annotations

import csv as csv_module
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from common.data.dataset import (
    Found,
    Notes,
    absolute,
    first_few,
    found_table,
    int_like,
    one_line,
    printable,
)
from common.errors import UserError

PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "filenames", "image",
                "image_path", "img")
LABEL_COLUMNS = ("class_name", "classname", "label", "labels", "class", "category", "code")
SPLIT_COLUMNS = ("split", "subset")
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

# File names that are not valid UTF-8 come back as lone surrogates, so they round-trip.
_ENCODING = {"encoding": "utf-8", "encoding_errors": "surrogateescape"}
_READ_ERRORS = (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError,
                csv_module.Error)


def header(csv: Path) -> list[str] | None:
    """The column names of ``csv`` (stripped, lower case), or None if it cannot be parsed."""
    try:
        return [str(c).strip().lower() for c in pd.read_csv(csv, nrows=0, **_ENCODING).columns]
    except _READ_ERRORS:
        return None


def read_csv(csv: Path) -> pd.DataFrame:
    """Every cell of ``csv`` as text, unstripped (a file name may start or end with a space),
    object dtype, nothing turned into NaN; column names stripped and lower case.  A file that
    does not parse is a :class:`UserError`."""
    try:
        frame = pd.read_csv(csv, dtype=object, keep_default_na=False, **_ENCODING)
    except _READ_ERRORS as exc:
        raise UserError(f"cannot read {printable(csv)}: {one_line(exc)}; check that it is a CSV file") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return frame


def manifest_columns(columns: list[str]) -> tuple[str, str, str | None] | None:
    """(path column, label column, split column or None) among lower-case ``columns``, or None
    when there is no recognised path or label column."""
    path = next((c for c in PATH_COLUMNS if c in columns), None)
    label = next((c for c in LABEL_COLUMNS if c in columns), None)
    split = next((c for c in SPLIT_COLUMNS if c in columns), None)
    return None if path is None or label is None else (path, label, split)


def raw_labels(values: pd.Series) -> list:
    """The label cells as pandas' own type inference reads them (what the course code sorted):
    numbers when every cell is numeric (``"01"`` -> 1), else the text."""
    values = values.str.strip()
    numbers = pd.to_numeric(values, errors="coerce")
    if len(values) and numbers.notna().all():
        if (numbers == numbers.round()).all():
            return [int(v) for v in numbers]
        return [float(v) for v in numbers]
    return [str(v) for v in values]


def class_names(values: pd.Series, to_class: Callable[[str], str | None], csv: Path,
                column: str, known: str) -> list[str]:
    """Class name of every label cell; an empty or unknown label is a :class:`UserError`
    naming the CSV, its lines and values, and what labels are accepted."""
    values = values.str.strip()
    empty = [i + 2 for i, v in enumerate(values) if not v]  # +2: header line, 1-based
    if empty:
        raise UserError(f"{printable(csv)}: empty {column} on line(s) {first_few(map(str, empty))}; "
                        "give every row a label")
    names = [to_class(v) for v in values]
    unknown = sorted({v for v, n in zip(values, names) if n is None})
    if unknown:
        raise UserError(f"{printable(csv)}: unknown {column} value(s) "
                        f"{first_few(repr(printable(u)) for u in unknown)}; labels must be {known}")
    return names


def split_names(values: pd.Series, csv: Path, column: str) -> list[str]:
    """``train``/``val``/``test`` for every split cell (``valid``, ``validation``, any case)."""
    lowered = [v.strip().lower() for v in values]
    bad = sorted({v for v in lowered if v not in SPLIT_VALUES})
    if bad:
        raise UserError(f"{printable(csv)}: unknown {column} value(s) {first_few(repr(b) for b in bad)}; "
                        "use train, val (or valid/validation) or test")
    return [SPLIT_VALUES[v] for v in lowered]


def generic_class(label: str) -> str:
    """Any label as given; integers written alike (``"01"`` and ``"1"`` are one class)."""
    return str(int(label)) if int_like(label) else label


def read_manifest(csv: Path, to_class: Callable[[str], str | None], known: str, notes: Notes,
                  *, on_missing: str = "error") -> Found:
    """Read a ``path,label[,split]`` CSV.  Relative paths resolve against the CSV's folder.

    ``on_missing``: ``"error"`` (a manifest the user wrote: a listed file that does not exist
    is a :class:`UserError`) or ``"skip"`` (a CSV shipped in a dataset folder: such rows are
    reported in one warning and left out).
    """
    if not csv.is_file():
        what = "is a folder, not a CSV file" if csv.is_dir() else "not found"
        raise UserError(f"manifest {printable(csv)} {what}; pass a CSV with columns path,label[,split]")
    columns = header(csv)
    chosen = manifest_columns(columns or [])
    if chosen is None:
        raise UserError(f"manifest {printable(csv)} has columns {columns or []}; expected path,label[,split] "
                        f"(path may also be {'/'.join(PATH_COLUMNS[1:])}; "
                        f"label may be {'/'.join(c for c in LABEL_COLUMNS if c != 'label')})")
    path_col, label_col, split_col = chosen
    frame = read_csv(csv)
    if frame.empty:
        raise UserError(f"manifest {printable(csv)} has no rows; add one row per image (path,label[,split])")
    names = class_names(frame[label_col], to_class, csv, label_col, known)
    splits = split_names(frame[split_col], csv, split_col) if split_col else [None] * len(frame)
    paths = [absolute(Path(p) if Path(p).is_absolute() else csv.parent / p) for p in frame[path_col]]
    present = [Path(p).is_file() for p in paths]
    missing = [p for p, ok in zip(paths, present) if not ok]
    if missing and on_missing == "error":
        raise UserError(f"manifest {printable(csv)}: {len(missing)} listed file(s) not found (relative "
                        f"paths resolve against {printable(csv.parent)}): "
                        f"{first_few((notes.show(p) for p in missing), 3)}; fix the paths or remove the rows")
    notes.missing(csv, missing)
    rows = [(p, raw, n, s) for p, raw, n, s, ok
            in zip(paths, raw_labels(frame[label_col]), names, splits, present) if ok]
    wanted = ",".join([path_col, label_col] + ([split_col] if split_col else []))
    return Found(found_table(rows), f"CSV manifest {notes.show(csv)} (columns {wanted})")
