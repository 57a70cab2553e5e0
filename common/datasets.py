"""Dataset loaders: Pacemaker, OrthoNet, APTOS and a generic CSV manifest (SPEC §6).

Every loader auto-detects its layout under ``image_path``, logs which one it found, checks every
image cheaply (:func:`common.images.check_image`), assigns splits and looks for leaks.  The
result is a :class:`Dataset` whose ``table`` has one row per image
(``path, label, class_name, split``).

Layouts accepted
----------------
pacemaker
    * split folders ``Train/`` and ``Test/`` (any case; also ``training``/``testing``), each
      holding class folders such as ``MDT - Adapta/``; an optional validation folder named
      ``val``/``valid``/``validation`` is the val split, otherwise val is carved from Train;
    * class folders directly under ``image_path`` (no official split: stratified 70/15/15).
orthonet (first match wins)
    * a CSV in ``image_path`` with a path column and a label column (see *Manifests* below);
    * class folders (names are the 12 class names, their two-digit codes, or a code followed by
      a non-digit, e.g. ``01_Corail``), optionally under split folders as for pacemaker;
    * flat image files whose first two characters are the class code (01-08 hip, 21-24 knee);
      files with an unknown prefix are reported and skipped.
aptos
    * ``train.csv`` (``id_code,diagnosis``) + ``train_images/<id_code>.png`` (another image
      suffix with that stem is accepted); ``test.csv``/``test_images/`` have no labels and are
      ignored.  Rows whose image is missing are reported and left out.
manifest (any dataset, ``manifest=FILE``)
    * a CSV with a path column, a label column and optionally a split column.

Manifests
---------
Column names are matched case-insensitively; the first alias present wins:
path: ``path, filepath, file_path, file, filename, image, image_path, img``;
label: ``class_name, classname, label, class, category, code``;
split: ``split, subset`` with values ``train``/``val``/``test`` (``valid``/``validation`` ->
``val``).  Relative paths resolve against ``image_path`` when it is given, otherwise against
the CSV's folder.  Labels may be class names or integers.  For orthonet, codes (``01``, ``1``)
and names map onto the 12 class names; for aptos, grades 0-4 map onto ``"0 - No DR"`` ..
``"4 - Proliferative DR"`` (so a manifest gives the same class names as the native layout);
anything outside those classes is an error.  For pacemaker and the generic manifest any label
is accepted as given (all-integer labels are ordered numerically).

Splits
------
The official split where one exists (folders, or a manifest's split column) is kept as is;
missing splits are carved from train, stratified by class with ``seed``
(:func:`sklearn.model_selection.train_test_split`): test first (``test_fraction`` of all
images), then val (``val_fraction`` of all images).  With no split information at all this is
70/15/15.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from common.errors import UserError
from common.images import IMAGE_SUFFIXES, check_image, is_ignored

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DATASET_NAMES = ("pacemaker", "orthonet", "aptos", "manifest")

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

APTOS_CLASSES: dict[int, str] = {
    0: "0 - No DR",
    1: "1 - Mild",
    2: "2 - Moderate",
    3: "3 - Severe",
    4: "4 - Proliferative DR",
}

# Folder names (lower-case) that mean a split rather than a class.
_SPLIT_DIR_NAMES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
_SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

_PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "image", "image_path", "img")
_LABEL_COLUMNS = ("class_name", "classname", "label", "class", "category", "code")
_SPLIT_COLUMNS = ("split", "subset")

_EXPECTED = {
    "pacemaker": "class folders such as 'MDT - Adapta/' under Train/ and Test/ (optional Val/), "
                 "or class folders directly under it",
    "orthonet": "class folders (the 12 class names or codes 01-08, 21-24), flat images named "
                "'<code>...' (e.g. 01_0001.png), or a CSV with path and label columns",
    "aptos": "train.csv (id_code,diagnosis) next to train_images/<id_code>.png",
    "manifest": "a CSV with columns path,label[,split]",
}

_FIRST_FEW = 5
_HASH_CHUNK = 1 << 20
_WORKERS = min(8, os.cpu_count() or 1)


@dataclass
class Dataset:
    """A loaded, split dataset.

    ``table`` columns are exactly ``path`` (absolute str), ``label`` (int 0..C-1),
    ``class_name`` and ``split`` (train|val|test), sorted by split order then path.
    """

    name: str
    root: Path
    layout: str
    table: pd.DataFrame
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    leaks: list[tuple[str, str, str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # every warning logged while loading

    def counts(self) -> pd.DataFrame:
        """Images per class (rows, in label order) and split (columns train, val, test)."""
        table = pd.crosstab(self.table["class_name"], self.table["split"])
        return table.reindex(index=self.class_names, columns=list(SPLITS), fill_value=0)


def manufacturer_of(class_name: str) -> str:
    """The manufacturer part of a Pacemaker class name: ``"MDT - Adapta"`` -> ``"MDT"``."""
    return class_name.split(" - ", 1)[0].strip() if " - " in class_name else class_name


# --------------------------------------------------------------------------------------------
# small helpers


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _first_few(items: Iterable[str], n: int = _FIRST_FEW) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _abs(path: Path | str) -> str:
    # abspath, not resolve(): keep the user's (possibly symlinked) paths as they wrote them.
    return os.path.abspath(path)


class _Log:
    """Collects warnings so the check_data report can repeat them."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, msg: str) -> None:
        logger.warning(msg)
        self.warnings.append(msg)


def _listdir(folder: Path) -> tuple[list[Path], list[Path]]:
    """Non-ignored subfolders and files of ``folder``, sorted by name."""
    dirs, files = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_ignored(entry.name):
            continue
        (dirs if entry.is_dir() else files).append(Path(entry.path))
    return dirs, files


def _image_files(files: Iterable[Path]) -> list[Path]:
    return [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]


def _walk_images(folder: Path) -> list[Path]:
    """Every file with an image suffix under ``folder`` (recursive), ignored names left out."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(d))
        found.extend(Path(dirpath) / f for f in sorted(filenames)
                     if not is_ignored(f) and Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return found


def _parallel(fn: Callable, items: list, desc: str) -> list:
    """``[fn(x) for x in items]`` on a thread pool (file reads and zlib CRCs release the GIL)."""
    if len(items) < 64:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(_WORKERS) as pool:
        return list(tqdm(pool.map(fn, items, chunksize=16), total=len(items), desc=desc,
                         leave=False, disable=None))


def _check_all(records: list[tuple[Path, str, str | None]],
               skipped: list[tuple[str, str]]) -> list[tuple[Path, str, str | None]]:
    """Keep the records whose image passes check_image; add the others to ``skipped``."""
    reasons = _parallel(lambda r: check_image(r[0]), records, "checking images")
    kept = []
    for rec, reason in zip(records, reasons):
        if reason is None:
            kept.append(rec)
        else:
            skipped.append((_abs(rec[0]), reason))
    return kept


# --------------------------------------------------------------------------------------------
# class-name rules


def _int_like(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text.strip()) is not None


def _orthonet_name(label: str, *, allow_prefix: bool) -> str | None:
    """The OrthoNet class name for a name, a code (``01``/``1``) or, for folder names,
    a code followed by a non-digit (``01_Corail``).  None if it is none of those."""
    label = label.strip()
    if label in ORTHONET_CLASSES.values():
        return label
    if re.fullmatch(r"\d{1,2}", label):
        return ORTHONET_CLASSES.get(f"{int(label):02d}")
    if allow_prefix and re.match(r"\d\d(\D|$)", label):
        return ORTHONET_CLASSES.get(label[:2])
    return None


def _aptos_name(label: str) -> str | None:
    label = label.strip()
    if label in APTOS_CLASSES.values():
        return label
    if _int_like(label) and int(label) in APTOS_CLASSES:
        return APTOS_CLASSES[int(label)]
    return None


def _sorted_classes(names: Iterable[str]) -> list[str]:
    """Deterministic class order: numeric if every name is an integer, else lexicographic.

    (For the OrthoNet names and APTOS grades, lexicographic order is also the code order.)
    """
    names = sorted(set(names))
    if names and all(_int_like(n) for n in names):
        return sorted(names, key=int)
    return names


# --------------------------------------------------------------------------------------------
# layouts


def _class_folders(folder: Path, split: str | None, skipped: list[tuple[str, str]]
                   ) -> list[tuple[Path, str, str | None]]:
    """(image, folder name, split) for every image under each class folder of ``folder``;
    images lying directly in ``folder`` are skipped (they belong to no class)."""
    dirs, files = _listdir(folder)
    for f in _image_files(files):
        skipped.append((_abs(f), "not inside a class folder"))
    records = []
    for d in dirs:
        records.extend((img, d.name, split) for img in _walk_images(d))
    return records


def _split_dirs(root: Path) -> dict[str, Path]:
    """Subfolders of ``root`` named like a split (any case) -> {split: folder}."""
    found: dict[str, Path] = {}
    for d in _listdir(root)[0]:
        split = _SPLIT_DIR_NAMES.get(d.name.lower())
        if split is None:
            continue
        if split in found:
            raise UserError(
                f"both {found[split]} and {d} look like the {split} split folder; "
                "keep one of them (or pass a --manifest CSV)"
            )
        found[split] = d
    return found


def _descend_wrapper(root: Path, log: _Log) -> Path:
    """If ``root`` holds nothing but one folder that itself holds folders (an unzipped archive's
    wrapper directory), look inside it."""
    dirs, files = _listdir(root)
    if len(dirs) == 1 and not _image_files(files) and not _split_dirs(root):
        inner_dirs, _ = _listdir(dirs[0])
        if inner_dirs:
            logger.info("%s holds only %s; reading the dataset from there", root, dirs[0].name)
            return dirs[0]
    return root


def _folder_layout(root: Path, skipped: list[tuple[str, str]], log: _Log
                   ) -> tuple[list[tuple[Path, str, str | None]], str]:
    """Class-per-folder, with or without split folders.  Returns (records, layout line)."""
    splits = _split_dirs(root)
    if splits:
        if "train" not in splits:
            raise UserError(
                f"{root} has split folder(s) {_first_few(p.name for p in splits.values())} "
                "but no Train/ folder; add Train/<class>/ folders"
            )
        others = [d.name for d in _listdir(root)[0] if d not in splits.values()]
        if others:
            log.warn(f"ignoring {len(others)} folder(s) beside the split folders in {root}: "
                     f"{_first_few(others)}")
        records = []
        for split in SPLITS:
            if split in splits:
                records.extend(_class_folders(splits[split], split, skipped))
        names = "/, ".join(splits[s].name for s in SPLITS if s in splits) + "/"
        return records, f"class-per-folder under {names} (official split)"
    return _class_folders(root, None, skipped), "class-per-folder, no split folders"


def _load_pacemaker(root: Path, skipped: list[tuple[str, str]], log: _Log):
    root = _descend_wrapper(root, log)
    records, layout = _folder_layout(root, skipped, log)
    return records, layout


def _load_orthonet(root: Path, skipped: list[tuple[str, str]], log: _Log):
    root = _descend_wrapper(root, log)
    dirs, files = _listdir(root)
    # (c) a label CSV in the folder
    csvs = [f for f in files if f.suffix.lower() == ".csv" and _manifest_columns(f) is not None]
    if len(csvs) > 1:
        raise UserError(
            f"found several label CSVs in {root} ({_first_few(c.name for c in csvs)}); "
            "pass the one to use with --manifest"
        )
    if csvs:
        records = _read_manifest(csvs[0], root, "orthonet", skipped, log)
        return records, f"CSV manifest {csvs[0].name}"
    # (a) class-per-folder
    if any(_walk_images(d) for d in dirs):
        records, layout = _folder_layout(root, skipped, log)
        mapped, unknown = [], set()
        for path, folder, split in records:
            name = _orthonet_name(folder, allow_prefix=True)
            if name is None:
                unknown.add(folder)
            mapped.append((path, name, split))
        if unknown:
            raise UserError(
                f"unknown OrthoNet class folder(s) in {root}: {_first_few(sorted(unknown))}; "
                "name class folders by class name or code (01-08, 21-24)"
            )
        return mapped, layout
    # (b) flat files named <code>...
    records, unknown = [], []
    for f in _image_files(files):
        name = ORTHONET_CLASSES.get(f.name[:2])
        if name is None:
            unknown.append(f)
        else:
            records.append((f, name, None))
    if unknown:
        skipped.extend((_abs(f), f"unknown class code {f.name[:2]!r}") for f in unknown)
        log.warn(f"skipped {len(unknown)} file(s) in {root} whose first two characters are not "
                 f"an OrthoNet class code (01-08, 21-24): {_first_few(f.name for f in unknown)}")
    return records, "flat files named by two-digit class code"


def _find_child(root: Path, name: str) -> Path | None:
    """``root/name`` matched case-insensitively (exact name preferred)."""
    if (root / name).exists():
        return root / name
    for entry in sorted(os.listdir(root)):
        if entry.lower() == name.lower():
            return root / entry
    return None


def _load_aptos(root: Path, skipped: list[tuple[str, str]], log: _Log):
    csv = _find_child(root, "train.csv")
    images = _find_child(root, "train_images")
    if csv is None or not csv.is_file():
        raise UserError(f"{root / 'train.csv'} not found; expected {_EXPECTED['aptos']}")
    if images is None or not images.is_dir():
        raise UserError(f"{root / 'train_images'} folder not found; expected {_EXPECTED['aptos']}")
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {csv}: {_one_line(exc)}; expected columns id_code,diagnosis") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    if not {"id_code", "diagnosis"} <= set(df.columns):
        raise UserError(f"{csv} has columns {list(df.columns)}; expected id_code,diagnosis")
    if df.empty:
        raise UserError(f"{csv} has no rows; expected one row per image (id_code,diagnosis)")
    # One directory listing instead of a stat per row; .png preferred over other suffixes.
    by_stem: dict[str, Path] = {}
    for f in _image_files(_listdir(images)[1]):
        if f.stem not in by_stem or f.suffix.lower() == ".png":
            by_stem[f.stem] = f
    records, missing = [], []
    for row_no, (id_code, diagnosis) in enumerate(zip(df["id_code"], df["diagnosis"]), start=2):
        id_code = id_code.strip()
        name = _aptos_name(diagnosis) if _int_like(diagnosis) else None
        if name is None:
            raise UserError(f"{csv} line {row_no}: diagnosis {diagnosis!r} for {id_code!r} "
                            "is not a grade 0-4; fix the row")
        path = by_stem.get(id_code)
        if path is None:
            missing.append(id_code)
        else:
            records.append((path, name, None))
    if missing:
        skipped.extend((_abs(images / f"{m}.png"), "missing: listed in train.csv, no image")
                       for m in missing)
        log.warn(f"{len(missing)} train.csv row(s) have no image in {images} and are left out: "
                 f"{_first_few(missing)}")
    if _find_child(root, "test.csv") is not None:
        logger.info("APTOS test.csv has no labels: ignored (not used for scoring)")
    return records, "train.csv + train_images/ (Kaggle APTOS 2019)"


# --------------------------------------------------------------------------------------------
# manifests


def _manifest_columns(csv: Path) -> tuple[str, str, str | None] | None:
    """(path column, label column, split column or None) of a CSV, or None if it has no
    recognised path and label columns."""
    try:
        header = pd.read_csv(csv, nrows=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
        return None
    cols = {str(c).strip().lower(): c for c in header.columns}
    path_col = next((cols[a] for a in _PATH_COLUMNS if a in cols), None)
    label_col = next((cols[a] for a in _LABEL_COLUMNS if a in cols), None)
    split_col = next((cols[a] for a in _SPLIT_COLUMNS if a in cols), None)
    if path_col is None or label_col is None:
        return None
    return path_col, label_col, split_col


def _read_manifest(csv: Path, base: Path, name: str, skipped: list[tuple[str, str]], log: _Log
                   ) -> list[tuple[Path, str, str | None]]:
    """Records from a manifest CSV; relative paths resolve against ``base``."""
    if not csv.is_file():
        raise UserError(f"manifest {csv} not found; pass a CSV with columns path,label[,split]")
    columns = _manifest_columns(csv)
    if columns is None:
        try:
            found = list(pd.read_csv(csv, nrows=0).columns)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            found = []
        raise UserError(f"manifest {csv} has columns {found}; expected path,label[,split] "
                        f"(path may also be {'/'.join(_PATH_COLUMNS[1:])}; "
                        f"label may be {'/'.join(c for c in _LABEL_COLUMNS if c != 'label')})")
    path_col, label_col, split_col = columns
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if df.empty:
        raise UserError(f"manifest {csv} has no rows; add one row per image (path,label[,split])")

    labels = [str(v).strip() for v in df[label_col]]
    if any(not v for v in labels):
        rows = [i + 2 for i, v in enumerate(labels) if not v]
        raise UserError(f"manifest {csv}: empty label on line(s) {_first_few(map(str, rows))}; "
                        "give every row a label")
    if name == "orthonet":
        normalise: Callable[[str], str | None] = lambda v: _orthonet_name(v, allow_prefix=False)
        known = "the 12 OrthoNet classes (codes 01-08, 21-24 or their names)"
    elif name == "aptos":
        normalise, known = _aptos_name, "APTOS grades 0-4"
    else:
        normalise, known = (lambda v: str(int(v)) if _int_like(v) else v), ""
    names = [normalise(v) for v in labels]
    unknown = sorted({v for v, n in zip(labels, names) if n is None})
    if unknown:
        raise UserError(f"manifest {csv}: unknown label(s) {_first_few(repr(u) for u in unknown)}; "
                        f"labels must be {known}")

    splits: list[str | None] = [None] * len(df)
    if split_col is not None:
        raw = [str(v).strip().lower() for v in df[split_col]]
        bad = sorted({v for v in raw if v not in _SPLIT_VALUES})
        if bad:
            raise UserError(f"manifest {csv}: unknown split value(s) {_first_few(repr(b) for b in bad)}; "
                            "use train, val (or valid/validation) or test")
        splits = [_SPLIT_VALUES[v] for v in raw]

    paths = [Path(str(p).strip()) for p in df[path_col]]
    paths = [p if p.is_absolute() else base / p for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"manifest {csv}: {len(missing)} listed file(s) not found "
                        f"(relative paths resolve against {base}): {_first_few(missing, 3)}")
    return list(zip(paths, names, splits))


# --------------------------------------------------------------------------------------------
# splits, leaks, finishing


def _too_small(pool: pd.DataFrame, needed: int, what: str) -> None:
    counts = pool["class_name"].value_counts()
    small = counts[counts < needed]
    if not small.empty:
        cls, n = small.index[0], int(small.iloc[0])
        more = f" (and {len(small) - 1} other class(es))" if len(small) > 1 else ""
        raise UserError(
            f"class {cls!r} has only {n} image(s) in train{more}, too few to split off {what} "
            f"(needs at least {needed}); add images of this class or drop it with a --manifest CSV"
        )


def _carve(df: pd.DataFrame, split: str, n_total: int, fraction: float, seed: int) -> None:
    """Move a stratified ``fraction`` of all images from train into ``split`` (in place)."""
    pool = df[df["split"] == "train"]
    n_classes = pool["class_name"].nunique()
    # sklearn's stratified split needs at least one image per class on each side.
    n = max(round(fraction * n_total), n_classes)
    if len(pool) - n < n_classes:
        raise UserError(f"only {len(pool)} training image(s) for {n_classes} classes: too few to "
                        f"split off {split}; add images or give the split explicitly (folders or a "
                        "--manifest split column)")
    try:
        _, taken = train_test_split(pool.index.to_numpy(), test_size=n, random_state=seed,
                                    shuffle=True, stratify=pool["class_name"].to_numpy())
    except ValueError as exc:
        counts = pool["class_name"].value_counts()
        raise UserError(f"cannot split off {split} stratified by class ({_one_line(exc)}); smallest "
                        f"class {counts.index[-1]!r} has {int(counts.iloc[-1])} image(s) in train; "
                        "add images or drop it with a --manifest CSV") from None
    df.loc[taken, "split"] = split


def _assign_splits(df: pd.DataFrame, *, seed: int, val_fraction: float, test_fraction: float
                   ) -> str:
    """Fill in missing splits by carving them from train.  Returns a description."""
    if df["split"].isna().all():
        df["split"] = "train"
        given: set[str] = set()
    elif df["split"].isna().any():
        raise UserError("some images have a split and some do not; give every image a split")
    else:
        given = set(df["split"])
    if "train" not in given and given:
        raise UserError(f"no train split given (found {sorted(given)}); add training images")
    todo = [(s, f) for s, f in (("test", test_fraction), ("val", val_fraction))
            if s not in given and f > 0]
    if not todo:
        return "official split"
    what = " and ".join(s for s, _ in todo)
    _too_small(df[df["split"] == "train"], len(todo) + 1, what)
    n_total = len(df)
    for split, fraction in todo:
        _carve(df, split, n_total, fraction, seed)
    return f"{what} carved from train, stratified by class (seed {seed})"


def _sha1(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _find_leaks(table: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """Pairs of files with identical content in two different splits."""
    sizes = [os.path.getsize(p) for p in table["path"]]
    # Identical content implies identical size: hash only files whose size occurs in more than
    # one split, so a leak-free dataset costs one stat per file, not a read of every byte.
    splits_by_size: dict[int, set[str]] = defaultdict(set)
    for size, split in zip(sizes, table["split"]):
        splits_by_size[size].add(split)
    candidates = [(p, s) for p, s, size in zip(table["path"], table["split"], sizes)
                  if len(splits_by_size[size]) > 1]
    digests = _parallel(lambda ps: _sha1(ps[0]), candidates, "hashing for leaks")
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for (path, split), digest in zip(candidates, digests):
        groups[digest].append((path, split))
    order = {s: i for i, s in enumerate(SPLITS)}
    leaks = []
    for members in groups.values():
        members.sort(key=lambda ps: (order[ps[1]], ps[0]))
        for i, (pa, sa) in enumerate(members):
            leaks.extend((pa, sa, pb, sb) for pb, sb in members[i + 1:] if sb != sa)
    return sorted(leaks)


def _finish(name: str, root: Path, layout: str, records: list[tuple[Path, str, str | None]],
            skipped: list[tuple[str, str]], log: _Log, *, seed: int, val_fraction: float,
            test_fraction: float, strict: bool) -> Dataset:
    records = _check_all(records, skipped)
    if skipped:
        reasons = pd.Series([r for _, r in skipped]).value_counts()
        summary = ", ".join(f"{n} {r}" for r, n in reasons.items())
        msg = (f"skipped {len(skipped)} file(s) ({summary}): "
               f"{_first_few(f'{Path(p).name} ({r})' for p, r in skipped)}")
        if strict:
            raise UserError(f"--strict: {msg}; first: {skipped[0][0]}; fix or remove them")
        log.warn(msg)
    if not records:
        raise UserError(f"no images found in {root}; expected {_EXPECTED[name]}")

    df = pd.DataFrame(records, columns=["path", "class_name", "split"])
    df["path"] = [_abs(p) for p in df["path"]]
    dup = df.duplicated("path")
    if dup.any():
        log.warn(f"{int(dup.sum())} image(s) listed more than once; keeping the first entry: "
                 f"{_first_few(df.loc[dup, 'path'])}")
        df = df[~dup].reset_index(drop=True)

    class_names = _sorted_classes(df["class_name"])
    if len(class_names) < 2:
        raise UserError(f"found only one class ({class_names[0]!r}) in {root}; a probe needs at "
                        f"least 2; expected {_EXPECTED[name]}")
    how = _assign_splits(df, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    df["label"] = df["class_name"].map({c: i for i, c in enumerate(class_names)}).astype(int)
    df["_order"] = df["split"].map({s: i for i, s in enumerate(SPLITS)})
    df = (df.sort_values(["_order", "path"], kind="stable")
            .reset_index(drop=True)[["path", "label", "class_name", "split"]])

    dataset = Dataset(name=name, root=root, layout=f"{layout}; {how}", table=df,
                      class_names=class_names, skipped=skipped, warnings=log.warnings)
    counts = dataset.counts()
    for split in SPLITS:
        absent = [c for c in class_names if counts.at[c, split] == 0]
        if absent and (split == "train" or counts[split].sum() > 0):
            log.warn(f"{len(absent)} class(es) have no {split} images: {_first_few(absent)}")
    dataset.leaks = _find_leaks(df)
    if dataset.leaks:
        log.warn(f"{len(dataset.leaks)} file(s) with identical content in two splits (a leak): "
                 f"{_first_few([f'{Path(a).name} ({sa}) = {Path(b).name} ({sb})' for a, sa, b, sb in dataset.leaks], 3)}")
    logger.info("%s: %s; %d images, %d classes (%s)", name, dataset.layout, len(df),
                len(class_names), ", ".join(f"{s} {n}" for s, n in counts.sum().items()))
    return dataset


# --------------------------------------------------------------------------------------------
# public


def load_dataset(name: str, image_path: str | Path | None, *, manifest: str | Path | None = None,
                 seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 strict: bool = False) -> Dataset:
    """Load, check and split a dataset (see the module docstring for layouts and splits).

    ``strict`` turns skipped files (unreadable, truncated, empty, ``._*``, unknown OrthoNet
    code, APTOS rows without an image) into a :class:`UserError`.  Nothing under
    ``image_path`` is ever written.
    """
    name = str(name).lower()
    if name not in DATASET_NAMES:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    for flag, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise UserError(f"{flag} {value} is outside [0, 1); use e.g. 0.15")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no "
                        "training images; make their sum below 1")
    log, skipped = _Log(), []
    root = Path(_abs(image_path)) if image_path is not None else None
    if root is not None and not root.exists():
        raise UserError(f"image path {root} does not exist; expected {_EXPECTED[name]}")
    if root is not None and not root.is_dir():
        raise UserError(f"image path {root} is not a folder; expected {_EXPECTED[name]}")

    if manifest is not None:
        csv = Path(_abs(manifest))
        base = root if root is not None else csv.parent
        records = _read_manifest(csv, base, name, skipped, log)
        root, layout = base, f"CSV manifest {csv}"
    elif name == "manifest":
        raise UserError("dataset 'manifest' needs --manifest FILE (a CSV with columns path,label[,split])")
    elif root is None:
        raise UserError(f"--image_path is required for {name}; expected {_EXPECTED[name]}")
    else:
        if not any(not is_ignored(e) for e in os.listdir(root)):
            raise UserError(f"image path {root} is empty; expected {_EXPECTED[name]}")
        if name == "pacemaker":
            records, layout = _load_pacemaker(root, skipped, log)
        elif name == "orthonet":
            records, layout = _load_orthonet(root, skipped, log)
        else:
            records, layout = _load_aptos(root, skipped, log)
    logger.info("%s: found layout: %s", name, layout)
    return _finish(name, root, layout, records, skipped, log, seed=seed,
                   val_fraction=val_fraction, test_fraction=test_fraction, strict=strict)


def write_splits(dataset: Dataset, path: Path) -> None:
    """Write ``splits.csv`` (path,label,class_name,split) atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            dataset.table[["path", "label", "class_name", "split"]].to_csv(fh, index=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_data_report(dataset: Dataset) -> str:
    """A human report: layout, images per class and split, skipped files, leaks, warnings."""
    counts = dataset.counts()
    table = counts.copy()
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    table.index.name = "class"
    lines = [
        f"Dataset: {dataset.name}",
        f"Root:    {dataset.root}",
        f"Layout:  {dataset.layout}",
        f"Classes: {len(dataset.class_names)}",
    ]
    if dataset.name == "pacemaker":
        makers = sorted({manufacturer_of(c) for c in dataset.class_names})
        lines.append(f"Manufacturers: {len(makers)} ({', '.join(makers)})")
    lines += ["", "Images per class and split:", table.to_string(), "",
              "Totals: " + ", ".join(f"{s} {int(counts[s].sum())}" for s in SPLITS)
              + f", all {len(dataset.table)}", ""]
    lines.append(f"Skipped files: {len(dataset.skipped)}")
    lines += [f"  {p}: {r}" for p, r in dataset.skipped[:10]]
    if len(dataset.skipped) > 10:
        lines.append(f"  ... and {len(dataset.skipped) - 10} more")
    lines.append(f"Leaks (identical content in two splits): {len(dataset.leaks)}")
    lines += [f"  {a} ({sa}) == {b} ({sb})" for a, sa, b, sb in dataset.leaks[:10]]
    if len(dataset.leaks) > 10:
        lines.append(f"  ... and {len(dataset.leaks) - 10} more")
    lines.append(f"Warnings: {len(dataset.warnings) or 'none'}")
    lines += [f"  {w}" for w in dataset.warnings]
    return "\n".join(lines)
