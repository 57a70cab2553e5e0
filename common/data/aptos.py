"""APTOS 2019 Blindness Detection: 3,662 labelled fundus photographs, diabetic-retinopathy grade
0-4 (scored by quadratic weighted kappa).

Layouts read (exactly one must match; two candidates are an error that says how to choose):

* the labelled three-way Kaggle release the course project used: ``train_1.csv``,
  ``valid.csv``, ``test.csv`` (each ``id_code,diagnosis``) with images in
  ``train_images/train_images/``, ``val_images/val_images/``, ``test_images/test_images/``
  (``<id_code>.png``); all three splits are official and kept;
* the competition release: ``train.csv`` (``id_code,diagnosis``) with
  ``train_images/<id_code>.png``; its ``test.csv`` has no labels and is not used.

Image folders may be single or doubled (``train_images/`` or ``train_images/train_images/``).
An image with another suffix but the same stem is accepted (``.png`` preferred; DICOM too).  An
``id_code`` that repeats the image folder (``train_images/abc``) or carries the suffix
(``abc.png``) names the same image.  Rows whose image is missing are reported in one warning and
left out; a CSV none of whose rows has an image is an error naming where it looked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.data.dataset import (DatasetKind, Found, Notes, Painter, SyntheticSpec, absolute, first_few,
                                 found_table, int_like, printable)
from common.data.folders import (find_child, image_files, image_folder, listdir, shown_folder,
                                 strip_folder_prefix)
from common.data.images import IMAGE_SUFFIXES
from common.data.manifest import cut_short, header, raw_labels, read_csv
from common.errors import UserError
from common.io import write_csv

APTOS_CLASSES: dict[int, str] = {
    0: "0 - No DR",
    1: "1 - Mild",
    2: "2 - Moderate",
    3: "3 - Severe",
    4: "4 - Proliferative DR",
}

EXPECTED = ("train_1.csv, valid.csv, test.csv (id_code,diagnosis) with train_images/, val_images/, "
            "test_images/ (three-way release), or train.csv (id_code,diagnosis) with train_images/ "
            "(competition release); image folders single or doubled")
KNOWN = "APTOS grades 0-4"

# (label CSV, image folder, split) of the three-way release.
THREE_WAY = (("train_1.csv", "train_images", "train"),
             ("valid.csv", "val_images", "val"),
             ("test.csv", "test_images", "test"))
COMPETITION = ("train.csv", "train_images")
COLUMNS = ("id_code", "diagnosis")


def aptos_class(label: str) -> str | None:
    """The class name for a grade (``2``) or a class name (``"2 - Moderate"``); else None."""
    label = str(label).strip()
    if label in APTOS_CLASSES.values():
        return label
    if int_like(label) and int(label) in APTOS_CLASSES:
        return APTOS_CLASSES[int(label)]
    return None


def _labelled(csv: Path | None) -> bool:
    return csv is not None and csv.is_file() and set(COLUMNS) <= set(header(csv) or [])


def _read_split(root: Path, csv: Path, folder_name: str, split: str | None, notes: Notes
                ) -> tuple[list[tuple], str]:
    """Rows ``(path, raw_label, class_name, split)`` of one label CSV and its image folder."""
    folder = image_folder(root, folder_name)
    if folder is None:
        raise UserError(f"{printable(csv.name)} is in {printable(root)} but its image folder "
                        f"{folder_name}/ is not; expected {printable(root / folder_name)}/ "
                        f"(or {folder_name}/{folder_name}/) with <id_code>.png")
    frame = read_csv(csv)
    if frame.empty:
        raise UserError(f"{printable(csv)} has no rows; expected one row per image (id_code,diagnosis)")
    grades = frame["diagnosis"].str.strip()
    bad = [(i + 2, g) for i, g in enumerate(grades) if aptos_class(g) is None or not int_like(g)]
    if bad:
        line, value = bad[0]
        raise (cut_short(frame, csv, line, f"diagnosis {value!r}") if len(bad) == 1 else None) or UserError(
            f"{printable(csv)} line {line}: diagnosis {printable(value)!r} is not a grade 0-4 "
            f"({len(bad)} such row(s)); fix the rows")
    # One listing instead of a stat per row; .png preferred over another suffix of the same stem.
    by_stem: dict[str, Path] = {}
    by_name: dict[str, Path] = {}
    for f in image_files(listdir(folder)[1]):
        # A DICOM file without an image suffix (named by its UID) is matched by its whole name.
        stem = f.stem if f.suffix.lower() in IMAGE_SUFFIXES else f.name
        by_name[f.name] = f
        if stem not in by_stem or f.suffix.lower() == ".png":
            by_stem[stem] = f
    rows, missing = [], []
    for ident, grade, raw in zip(frame["id_code"].str.strip(), grades, raw_labels(grades)):
        name = strip_folder_prefix(ident, folder, root)
        path = by_stem.get(name) or by_name.get(name)
        if path is None:
            missing.append(absolute(folder / f"{ident}.png"))
        else:
            rows.append((str(path), raw, aptos_class(grade), split))
    notes.missing(csv, missing, listed=len(frame),
                  fix=f"id_code must be the image's name in {shown_folder(folder, root)}, without folder or "
                      "suffix (e.g. 000c1434d8d7 for 000c1434d8d7.png)")
    notes.uses(csv)
    return rows, f"{printable(csv.name)} + {shown_folder(folder, root)}"


def _read(root: Path, notes: Notes) -> Found:
    three = {name: find_child(root, name) for name, _, _ in THREE_WAY}
    competition = find_child(root, COMPETITION[0])
    # valid.csv and train_1.csv exist only in the three-way release; a labelled test.csv too
    # (the competition's test.csv has no diagnosis column).
    three_way = [c for c in three.values() if c is not None and (c.name.lower() != "test.csv" or _labelled(c))]
    if three_way and _labelled(competition):
        raise UserError(
            f"{printable(root)} holds two APTOS layouts: {printable(competition.name)} (competition release) "
            f"and {first_few(printable(c.name) for c in three_way)} (three-way release); move the "
            "files of the one you do not want away, or choose the images with --manifest FILE")
    if three_way:
        absent = [name for name, csv in three.items() if csv is None]
        if absent:
            raise UserError(f"found {first_few(printable(c.name) for c in three_way)} of the three-way APTOS "
                            f"release in {printable(root)} but not {', '.join(absent)}; restore "
                            "train_1.csv, valid.csv and test.csv, or pass --manifest FILE")
        rows, used = [], []
        for name, folder_name, split in THREE_WAY:
            csv = three[name]
            if not _labelled(csv):
                raise UserError(f"{printable(csv)} has columns {header(csv) or []}; expected id_code,diagnosis")
            split_rows, text = _read_split(root, csv, folder_name, split, notes)
            rows += split_rows
            used.append(text)
        return Found(found_table(rows), "APTOS three-way release: " + ", ".join(used))
    if competition is not None:
        if not _labelled(competition):
            raise UserError(f"{printable(competition)} has columns {header(competition) or []}; "
                            "expected id_code,diagnosis")
        rows, text = _read_split(root, competition, COMPETITION[1], None, notes)
        unlabelled = [p for p in (find_child(root, "test.csv"), image_folder(root, "test_images")) if p is not None]
        if unlabelled:
            notes.uses(*unlabelled)
            names = " and ".join(printable(p.name) + ("/" if p.is_dir() else "") for p in unlabelled)
            text += f" ({names}: the competition's unlabelled test set, not used)"
        return Found(found_table(rows), f"APTOS competition release: {text}")
    raise UserError(f"no APTOS label CSV in {printable(root)}: expected train.csv with train_images/ "
                    "(competition release) or train_1.csv, valid.csv, test.csv with train_images/, "
                    "val_images/, test_images/ (three-way release); point --image_path at that folder "
                    "or pass --manifest FILE")


# --------------------------------------------------------------------------------------------
# synthetic data


def _write_synthetic(root: Path, classes: int, per_class: int, layout: str, paint: Painter) -> None:
    """``three_way`` (doubled image folders) / ``three_way_single``: train_1.csv, valid.csv,
    test.csv, about 15% of each grade in val and in test; ``competition`` (single) /
    ``competition_doubled``: train.csv + train_images/ and an unlabelled test.csv + test_images/."""
    ids = np.random.default_rng([paint.seed, 3])
    used: set[str] = set()

    def new_id() -> str:
        while True:
            ident = ids.bytes(6).hex()
            if ident not in used:
                used.add(ident)
                return ident

    def folder(name: str, doubled: bool) -> Path:
        return root / name / name if doubled else root / name

    if layout.startswith("three_way"):
        doubled = layout == "three_way"
        n_held = max(1, round(per_class * 0.15))
        rows: dict[str, list] = {name: [] for name, _, _ in THREE_WAY}
        for n in range(per_class):
            part = 2 if n < n_held else 1 if n < 2 * n_held else 0
            csv, folder_name, _ = THREE_WAY[part]
            for k in range(classes):
                ident = new_id()
                paint.image(k, n, folder(folder_name, doubled) / f"{ident}.png")
                rows[csv].append((ident, k))
        for csv, csv_rows in rows.items():
            write_csv(root / csv, pd.DataFrame(csv_rows, columns=list(COLUMNS)))
        return
    doubled = layout == "competition_doubled"
    rows_train = []
    for n in range(per_class):
        for k in range(classes):
            ident = new_id()
            paint.image(k, n, folder("train_images", doubled) / f"{ident}.png")
            rows_train.append((ident, k))
    write_csv(root / "train.csv", pd.DataFrame(rows_train, columns=list(COLUMNS)))
    test_ids = []
    for n in range(max(2, per_class // 2)):
        ident = new_id()
        # Unlabelled, as on Kaggle; drawn from every grade in turn.
        paint.image(n % classes, per_class + n, folder("test_images", doubled) / f"{ident}.png")
        test_ids.append(ident)
    write_csv(root / "test.csv", pd.DataFrame({"id_code": test_ids}))


DATASET = DatasetKind(
    name="aptos", expected=EXPECTED, read=_read, label_to_class=aptos_class, labels_known=KNOWN,
    layout_folders=frozenset({"train_images", "val_images", "test_images"}),
    synthetic=SyntheticSpec(layouts=("three_way", "three_way_single", "competition", "competition_doubled"),
                            default_classes=len(APTOS_CLASSES), max_classes=len(APTOS_CLASSES),
                            style="fundus", write=_write_synthetic),
)
