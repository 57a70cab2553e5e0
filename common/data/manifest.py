"""Reading label CSVs: the generic ``path,label[,split]`` manifest (``--manifest FILE`` or a CSV
found in a dataset folder), and the pieces the release-specific CSV layouts (APTOS, OrthoNet's
Kaggle release) share: reading every cell as text, checking labels and splits row by row,
reporting rows whose file is absent, and the label values as the course code's pandas saw them.

Manifest columns are matched case-insensitively; the first alias present wins:
path: ``path, filepath, file_path, file, filename, filenames, image, image_path, img``;
label: ``class_name, classname, label, labels, class, category, code``;
split: ``split, subset`` with values ``train``/``val``/``test`` (``valid``/``validation`` ->
``val``, any case); mask (optional, cells may be empty): ``mask``, the image's object mask
(:mod:`common.data.masks`).  Relative paths resolve against the CSV's folder.

Encodings: UTF-8 (with or without the BOM Excel writes) and UTF-16 (Excel's "Unicode text") are
read as such; a CSV in another encoding (latin-1, cp1252) is refused where its column names or
labels need decoding, with "save it as UTF-8" - file-name cells keep their bytes, so names that
are not UTF-8 on disk still match.  Separators: a comma, else the semicolon or tab of the header
line (Excel in many locales).  A last line cut short without a line break is called a truncated
file.
"""

from __future__ import annotations

import codecs
import csv as csv_module
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from common.data.dataset import (
    Found,
    Notes,
    absolute,
    first_few,
    found_table,
    has_surrogates,
    int_like,
    one_line,
    parallel,
    printable,
)
from common.data.masks import check_mask
from common.errors import UserError

PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "filenames", "image",
                "image_path", "img")
LABEL_COLUMNS = ("class_name", "classname", "label", "labels", "class", "category", "code")
SPLIT_COLUMNS = ("split", "subset")
MASK_COLUMN = "mask"
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

_READ_ERRORS = (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeError, OSError, csv_module.Error)
_SAVE_AS_UTF8 = "save it as UTF-8 (in Excel: CSV UTF-8)"


def _utf16(head: bytes) -> str | None:
    """The UTF-16 codec of a file starting with ``head``, or None: a BOM, or ASCII text with a zero
    byte beside every character (Excel's "Unicode text" without its BOM)."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    sample = head[:64] if len(head) % 2 == 0 else head[:-1][:64]
    if len(sample) >= 4 and not any(sample[1::2]) and all(sample[0::2]):
        return "utf-16-le"
    if len(sample) >= 4 and not any(sample[0::2]) and all(sample[1::2]):
        return "utf-16-be"
    return None


def _options(csv: Path) -> dict:
    """pandas' encoding and separator options for ``csv`` (see the module docstring)."""
    with open(csv, "rb") as fh:
        head = fh.read(4096)
    encoding = _utf16(head)
    if encoding is None:
        # File names that are not valid UTF-8 come back as lone surrogates, so they round-trip.
        options = {"encoding": "utf-8-sig", "encoding_errors": "surrogateescape"}
        first = head.decode("utf-8", "replace")
    else:
        options = {"encoding": encoding}
        first = head.decode(encoding, "replace")
    first = first.lstrip("\ufeff").splitlines()[0] if first.strip() else ""
    if "," not in first and (";" in first or "\t" in first):
        options["sep"] = ";" if first.count(";") >= first.count("\t") else "\t"
    return options


def _not_utf8(csv: Path, what: str) -> UserError:
    return UserError(f"{printable(csv)} is not UTF-8 text ({what}); {_SAVE_AS_UTF8}")


def header(csv: Path) -> list[str] | None:
    """The column names of ``csv`` (stripped, lower case), or None if it cannot be parsed.  Column
    names that are not UTF-8 are a :class:`UserError` (save it as UTF-8)."""
    try:
        columns = [str(c).strip().lower() for c in pd.read_csv(csv, nrows=0, **_options(csv)).columns]
    except _READ_ERRORS:
        return None
    if any(has_surrogates(c) for c in columns):
        shown = ", ".join(printable(c) for c in columns)
        raise _not_utf8(csv, f"column names {shown}")
    return columns


def read_csv(csv: Path) -> pd.DataFrame:
    """Every cell of ``csv`` as text, unstripped (a file name may start or end with a space),
    object dtype, nothing turned into NaN; column names stripped and lower case.  A file that
    does not parse is a :class:`UserError`.  ``frame.attrs["cut_short"]``: the file does not end
    with a line break (its last line may be a cut download)."""
    columns = header(csv)        # checks the column names' encoding
    try:
        frame = pd.read_csv(csv, dtype=object, keep_default_na=False, **_options(csv))
        with open(csv, "rb") as fh:
            fh.seek(max(0, csv.stat().st_size - 2))
            tail = fh.read()
    except _READ_ERRORS as exc:
        raise UserError(f"cannot read {printable(csv)}: {one_line(exc)}; check that it is a CSV file "
                        "(or, if its download was cut short, download it again)") from None
    frame.columns = columns if columns is not None else [str(c).strip().lower() for c in frame.columns]
    frame.attrs["cut_short"] = bool(tail) and not tail.rstrip(b"\x00").endswith((b"\n", b"\r"))
    return frame


def cut_short(cells: pd.DataFrame | pd.Series, csv: Path, line: int, what: str) -> UserError | None:
    """The error for a bad cell on ``line`` (1-based, the header is line 1) of ``cells`` (read by
    :func:`read_csv`) when it is the last line and the file ends without a line break: a truncated
    download, not a wrong label; else None."""
    if cells.attrs.get("cut_short") and line == len(cells) + 1:
        return UserError(f"{printable(csv)} line {line}, the last, is cut short ({printable(what)}): the file "
                         "looks truncated (an incomplete download); download it again")
    return None


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
    cells, values = values, values.str.strip()
    garbled = [i + 2 for i, v in enumerate(values) if has_surrogates(v)]
    if garbled:
        raise _not_utf8(csv, f"{column} on line(s) {first_few(map(str, garbled))}, e.g. "
                             f"'{printable(values.iloc[garbled[0] - 2])}'")
    empty = [i + 2 for i, v in enumerate(values) if not v]  # +2: header line, 1-based
    if empty:
        raise (cut_short(cells, csv, empty[0], f"empty {column}") if len(empty) == 1 else None) or UserError(
            f"{printable(csv)}: empty {column} on line(s) {first_few(map(str, empty))}; give every row a label")
    names = [to_class(v) for v in values]
    unknown = [(i + 2, v) for i, (v, n) in enumerate(zip(values, names)) if n is None]
    if unknown:
        line, value = unknown[0]
        raise (cut_short(cells, csv, line, f"{column} {value!r}") if len(unknown) == 1 else None) or UserError(
            f"{printable(csv)}: unknown {column} value(s) "
            f"{first_few(repr(printable(u)) for u in sorted({v for _, v in unknown}))}; labels must be {known}")
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


def _listed_path(csv: Path, cell: str) -> str:
    """The absolute path of a path cell: relative to the CSV's folder; a CSV written on Windows
    (``images\\a.png``) names ``images/a.png`` when only that exists."""
    path = absolute(Path(cell) if Path(cell).is_absolute() else csv.parent / cell)
    if "\\" in cell and os.sep == "/" and not os.path.exists(path):
        posix = absolute(csv.parent / cell.replace("\\", "/"))
        if os.path.isfile(posix):
            return posix
    return path


def _listed_masks(csv: Path, cells: pd.Series, paths: list[str], present: list[bool], notes: Notes,
                  on_missing: str) -> dict[str, str]:
    """``{image: mask}`` of the rows whose mask cell is filled in and whose image exists; each mask
    checked (found, readable, the image's size: headers only).  A bad mask is a :class:`UserError`
    naming it (``on_missing="error"``), or is left out with one warning counting them."""
    pairs = [(image, _listed_path(csv, cell.strip())) for image, cell, ok in zip(paths, cells, present)
             if ok and cell.strip()]
    problems = parallel(lambda pair: check_mask(pair[1], pair[0], notes.show), pairs, "checking masks")
    bad = [problem for problem in problems if problem]
    if bad and on_missing == "error":
        raise UserError(bad[0] + (f" ({len(bad) - 1} more mask(s) like it in {printable(csv.name)})"
                                  if len(bad) > 1 else ""))
    if bad:
        notes.warn(f"{len(bad)} mask(s) listed in {printable(csv.name)} left out: {first_few(bad, 2)}")
    masks = {image: mask for (image, mask), problem in zip(pairs, problems) if not problem}
    notes.uses(*masks.values())
    return masks


def read_manifest(csv: Path, to_class: Callable[[str], str | None], known: str, notes: Notes,
                  *, on_missing: str = "error") -> Found:
    """Read a ``path,label[,split][,mask]`` CSV.  Relative paths resolve against the CSV's folder.

    ``on_missing``: ``"error"`` (a manifest the user wrote: a listed file that does not exist,
    or a mask that is not found, cannot be read or has another size than its image, is a
    :class:`UserError`) or ``"skip"`` (a CSV shipped in a dataset folder: such rows or masks are
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
    paths = [_listed_path(csv, cell) for cell in frame[path_col]]
    present = [Path(p).is_file() for p in paths]
    missing = [p for p, ok in zip(paths, present) if not ok]
    if missing and on_missing == "error":
        raise UserError(f"manifest {printable(csv)}: {len(missing)} listed file(s) not found (relative "
                        f"paths resolve against {printable(csv.parent)}): "
                        f"{first_few((notes.show(p) for p in missing), 3)}; fix the paths or remove the rows")
    notes.missing(csv, missing, listed=len(frame),
                  fix=f"relative paths resolve against {printable(csv.parent)}; fix the {path_col} column")
    notes.uses(csv)
    rows = [(p, raw, n, s) for p, raw, n, s, ok
            in zip(paths, raw_labels(frame[label_col]), names, splits, present) if ok]
    has_masks = MASK_COLUMN in frame.columns
    masks = _listed_masks(csv, frame[MASK_COLUMN], paths, present, notes, on_missing) if has_masks else {}
    wanted = ",".join([path_col, label_col] + ([split_col] if split_col else []) + ([MASK_COLUMN] if has_masks else []))
    with_masks = f"; object masks for {len(masks)} image(s)" if has_masks else ""
    return Found(found_table(rows), f"CSV manifest {notes.show(csv)} (columns {wanted}{with_masks})", masks)
