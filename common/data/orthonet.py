"""OrthoNet (Patel et al., Radiology: Artificial Intelligence 2021): 1,349 radiographs of 12
hip and knee implant models, coded 01-08 (hip) and 21-24 (knee).

Layouts read (exactly one must match; two candidates are an error that says how to choose):

* the Kaggle release: ``train.csv`` and ``test.csv`` with columns ``filenames,labels``
  (train.csv may carry more, such as ``masks,valid_mask``: mask files are never samples), the
  images under ``orthonet data/orthonet data/<filename>`` (or a single ``orthonet data/``).
  The official train/test split is kept; val is carved from train;
* a label CSV in the folder (path and label columns, see :mod:`common.data.manifest`);
* class folders (class names, their codes, or a code followed by a non-digit such as
  ``01_Corail``), optionally under split folders;
* flat image files whose first two characters are the class code (others are skipped).

Labels may be class names or codes (``1``, ``01``, ``21``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from common.data.dataset import (
    DatasetKind,
    Found,
    Notes,
    Painter,
    SyntheticSpec,
    absolute,
    first_few,
    found_table,
    printable,
)
from common.data.folders import (
    SPLIT_FOLDER_NAMES,
    class_folders,
    find_child,
    image_files,
    image_folder,
    listdir,
    shown_folder,
    strip_folder_prefix,
    walk_images,
)
from common.data.manifest import (
    class_names,
    header,
    manifest_columns,
    raw_labels,
    read_csv,
    read_manifest,
)
from common.errors import UserError
from common.io import write_csv

ORTHONET_CLASSES: dict[str, str] = {
    "01": "Hip_DepuySynthes_Corail_Collar",
    "02": "Hip_DepuySynthes_Corail_NilCol",
    "03": "Hip_JRIOrtho_FurlongEvolution_Collar",
    "04": "Hip_JRIOrtho_FurlongEvolution_NilCol",
    "05": "Hip_SmithAndNephew_Anthology",
    "06": "Hip_SmithAndNephew_Polarstem_NilCol",
    "07": "Hip_Stryker_AccoladeII",
    "08": "Hip_Stryker_Exeter",
    "21": "Knee_Depuy_Synthes_Sigma",
    "22": "Knee_SmithAndNephew_GenesisII",
    "23": "Knee_SmithAndNephew_Legion",
    "24": "Knee_ZimmerBiomet_Oxford",
}

EXPECTED = ("the Kaggle release (train.csv and test.csv with filenames,labels; images in "
            "'orthonet data/orthonet data/'), class folders (the 12 class names or codes 01-08, 21-24), "
            "flat images named '<code>...' (e.g. 01_0001.png), or a CSV with path and label columns")
KNOWN = "the 12 OrthoNet classes (codes 01-08, 21-24, or their names)"

KAGGLE_CSVS = ("train.csv", "test.csv")
KAGGLE_COLUMNS = ("filenames", "labels")
KAGGLE_IMAGES = "orthonet data"

# Hip and knee codes interleaved, so a small synthetic set has both kinds.
_SYNTHETIC_ORDER = ("01", "21", "02", "22", "03", "23", "04", "24", "05", "06", "07", "08")


def orthonet_class(label: str, *, allow_prefix: bool = False) -> str | None:
    """The class name for a name, a code (``01``/``1``) or, for folder names, a code followed by
    a non-digit (``01_Corail``); None if it is none of those."""
    label = str(label).strip()
    if label in ORTHONET_CLASSES.values():
        return label
    if re.fullmatch(r"[0-9]{1,2}", label):
        return ORTHONET_CLASSES.get(f"{int(label):02d}")
    if allow_prefix and re.match(r"[0-9]{2}([^0-9]|$)", label):
        return ORTHONET_CLASSES.get(label[:2])
    return None


def _is_kaggle_csv(csv: Path) -> bool:
    return csv.name.lower() in KAGGLE_CSVS and set(KAGGLE_COLUMNS) <= set(header(csv) or [])


def _read_kaggle(root: Path, csvs: list[Path], notes: Notes) -> Found:
    """The Kaggle release: official train/test from train.csv/test.csv, masks never samples."""
    by_name = {c.name.lower(): c for c in csvs}
    if "train.csv" not in by_name:
        train = find_child(root, "train.csv")
        if train is not None and train.is_file():
            # train.csv is there but is not the release's: say what it holds
            columns = header(train)
            if columns is None:
                read_csv(train)   # an unparseable CSV: its own one-line "cannot read" error
            raise UserError(f"{printable(train)} has columns {','.join(columns or []) or '(none)'}; the Kaggle "
                            "release's train.csv has columns filenames,labels (like test.csv beside it): "
                            "restore it, or pass --manifest FILE")
        raise UserError(f"found {printable(by_name['test.csv'].name)} (filenames,labels) in {printable(root)} "
                        "but no train.csv; restore the Kaggle release's train.csv or pass --manifest FILE")
    images = image_folder(root, KAGGLE_IMAGES)
    folder = images if images is not None else root
    where_images = shown_folder(folder, root) if images is not None else "the root folder"
    frames, masks = [], set()
    for split, key in (("train", "train.csv"), ("test", "test.csv")):
        if key not in by_name:
            continue
        csv = by_name[key]
        frame = read_csv(csv)
        if "masks" in frame.columns:
            masks |= {m for m in frame["masks"] if m}
        names = class_names(frame["labels"], orthonet_class, csv, "labels", KNOWN)
        frames.append(pd.DataFrame({"file": frame["filenames"], "labels": frame["labels"],
                                    "class_name": names, "split": split, "csv": csv}, dtype=object))
    rows = pd.concat(frames, ignore_index=True)
    # The course code read each CSV with pandas; numeric codes in either make numeric labels.
    rows["raw_label"] = raw_labels(rows["labels"])

    def located(name: str) -> str:
        # A file name that repeats the image folder ("orthonet data/x.png") names a file inside it.
        direct = folder / name
        if not direct.is_file():
            inside = folder / strip_folder_prefix(name, folder, root)
            if inside.is_file():
                return absolute(inside)
        return absolute(direct)

    rows["path"] = [located(f) for f in rows["file"]]
    notes.uses(*(located(m) for m in masks))
    is_mask = rows["file"].isin(masks)
    for path in rows.loc[is_mask, "path"]:
        notes.skip(path, "mask file (listed in the masks column), not a sample")
    rows = rows[~is_mask]
    present = rows["path"].map(lambda p: Path(p).is_file())
    for csv, group in rows.groupby("csv", sort=False):
        notes.missing(csv, list(group.loc[~present[group.index], "path"]), listed=len(group),
                      fix=f"filenames must be the images' names in {where_images}")
    notes.uses(*by_name.values())
    rows = rows[present]
    if "test.csv" not in by_name:
        notes.warn(f"no test.csv beside {printable(by_name['train.csv'].name)}: the test split is carved "
                   "from train, not the official one")
    used = " + ".join(printable(by_name[k].name) for k in KAGGLE_CSVS if k in by_name)
    table = found_table(list(zip(rows["path"], rows["raw_label"], rows["class_name"], rows["split"])))
    return Found(table, f"OrthoNet Kaggle release: {used} (filenames,labels), images in {where_images}"
                        + (f", {len(masks)} mask file(s) not samples" if masks else ""))


def _read_flat(root: Path, files: list[Path], notes: Notes) -> Found:
    rows = []
    for f in image_files(files):
        name = ORTHONET_CLASSES.get(f.name[:2])
        if name is None:
            notes.skip(f, f"unknown class code {printable(f.name[:2])!r}")
        else:
            rows.append((str(f), f.name[:2], name, None))
    return Found(found_table(rows), f"OrthoNet flat files in the root named by their two-digit class code "
                                    f"({len(rows)} images)")


def _candidates(dirs: list[Path], files: list[Path]) -> dict[str, list[Path]]:
    """The files and folders of the root (its ``dirs`` and ``files``) that each layout would
    read (empty: that layout does not match)."""
    csvs = [f for f in files if f.suffix.lower() == ".csv"]
    kaggle = [c for c in csvs if _is_kaggle_csv(c)]
    return {
        "the Kaggle CSVs": kaggle,
        "the label CSV": [c for c in csvs if c not in kaggle and manifest_columns(header(c) or []) is not None],
        "the class folders": [d for d in dirs if (d.name.lower() in SPLIT_FOLDER_NAMES
                                                  or orthonet_class(d.name, allow_prefix=True))
                              and walk_images(d)],
        "the flat coded files": [f for f in image_files(files) if f.name[:2] in ORTHONET_CLASSES],
    }


def _read(root: Path, notes: Notes) -> Found:
    dirs, files = listdir(root)
    candidates = {what: found for what, found in _candidates(dirs, files).items() if found}
    if len(candidates) > 1:
        seen = "; ".join(f"{what} {first_few((printable(p.name) for p in found), 3)}"
                         for what, found in candidates.items())
        raise UserError(f"{printable(root)} matches more than one OrthoNet layout ({seen}); choose the "
                        "images with --manifest FILE (a label CSV here, or one you write), or move the "
                        "files of the other layout away")
    labelled = candidates.get("the label CSV", [])
    if len(labelled) > 1:
        raise UserError(f"found several label CSVs in {printable(root)} "
                        f"({first_few(printable(c.name) for c in labelled)}); pass the one to use with --manifest")
    if "the Kaggle CSVs" in candidates:
        return _read_kaggle(root, candidates["the Kaggle CSVs"], notes)
    if labelled:
        return read_manifest(labelled[0], orthonet_class, KNOWN, notes, on_missing="skip")
    kaggle_images = find_child(root, KAGGLE_IMAGES)
    if kaggle_images is not None and kaggle_images.is_dir():
        raise UserError(f"found {printable(kaggle_images.name)}/ in {printable(root)} but not the Kaggle "
                        "release's train.csv and test.csv (filenames,labels) beside it; restore them, "
                        "or pass --manifest FILE")
    if any(walk_images(d) for d in dirs):
        table, layout = class_folders(
            root, notes, class_of=lambda name: orthonet_class(name, allow_prefix=True),
            naming="name class folders by class name or code (01-08, 21-24)")
        return Found(table, f"OrthoNet {layout}")
    return _read_flat(root, files, notes)


def _synthetic_codes(classes: int) -> list[str]:
    return sorted(_SYNTHETIC_ORDER[:classes])


def _write_synthetic(root: Path, classes: int, per_class: int, layout: str, paint: Painter) -> None:
    """``kaggle``: train.csv (filenames,labels,masks,valid_mask) + test.csv (filenames,labels),
    images and masks in ``orthonet data/orthonet data/``, a fifth of each class in test;
    ``folders``: ``<class name>/NNNN.png``; ``flat``: ``<code>_NNNN.png``."""
    codes = _synthetic_codes(classes)
    if layout == "folders":
        for k, code in enumerate(codes):
            for n in range(per_class):
                paint.image(k, n, root / ORTHONET_CLASSES[code] / f"{n:04d}.png")
        return
    if layout == "flat":
        for k, code in enumerate(codes):
            for n in range(per_class):
                paint.image(k, n, root / f"{code}_{n:04d}.png")
        return
    folder = root / KAGGLE_IMAGES / KAGGLE_IMAGES
    n_test = max(1, round(per_class * 0.2))
    train, test = [], []
    for k, code in enumerate(codes):
        for n in range(per_class):
            stem = f"image_{k * per_class + n:05d}"
            paint.image(k, n, folder / f"{stem}.png")
            if n < n_test:
                test.append((f"{stem}.png", ORTHONET_CLASSES[code]))
            else:
                paint.mask(k, n, folder / f"{stem}_mask.png")
                train.append((f"{stem}.png", ORTHONET_CLASSES[code], f"{stem}_mask.png", 1))
    write_csv(root / "train.csv", pd.DataFrame(train, columns=["filenames", "labels", "masks", "valid_mask"]))
    write_csv(root / "test.csv", pd.DataFrame(test, columns=["filenames", "labels"]))


DATASET = DatasetKind(
    name="orthonet",
    expected=EXPECTED,
    read=_read,
    label_to_class=orthonet_class,
    labels_known=KNOWN,
    layout_folders=frozenset({KAGGLE_IMAGES}),
    synthetic=SyntheticSpec(layouts=("kaggle", "folders", "flat"), default_classes=4,
                            max_classes=len(ORTHONET_CLASSES), style="implant", write=_write_synthetic),
)
