"""Dataset loaders (docs/datasets.md): each dataset module of this package reads its dataset as its users
have it on disk, auto-detecting the layout; a CSV manifest reads any dataset.

The registry finds every module here that defines ``DATASET`` (a
:class:`~common.data.dataset.DatasetKind`): adding a dataset means adding one module, with its
classes, its layouts, its particulars and a writer of synthetic data in its real layout.
Shared pieces: :mod:`.base` (shapes), :mod:`.folders` (folder trees), :mod:`.manifest` (label
CSVs), :mod:`.splits` (stratified carving), :mod:`.leaks` (identical files across splits),
:mod:`.build` (checks, classes, splits, course class order).

:func:`load_dataset` returns a :class:`Dataset` whose ``table`` has one row per image
(``path, label, class_name, split``) and whose ``layout`` line names the files read.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

from common.data.build import build_dataset
from common.data.dataset import (
    SPLITS,
    TABLE_COLUMNS,
    Dataset,
    DatasetKind,
    Notes,
    absolute,
    printable,
)
from common.data.folders import descend_wrappers
from common.data.images import is_ignored
from common.data.manifest import generic_class, read_manifest
from common.data.splits import DEFAULT_FRACTION
from common.data.unused import ARCHIVE_SUFFIXES
from common.errors import UserError
from common.io import write_csv

logger = logging.getLogger(__name__)


# One module per dataset; adding a dataset is one module here and one line in this tuple.
DATASET_MODULES: tuple[str, ...] = ("aptos", "orthonet", "pacemaker")


def _discover() -> dict[str, DatasetKind]:
    """``{name: kind}`` for every dataset module of :data:`DATASET_MODULES` (each defines ``DATASET``)."""
    kinds: dict[str, DatasetKind] = {}
    for name in DATASET_MODULES:
        module = importlib.import_module(f"common.data.{name}")
        kind = getattr(module, "DATASET", None)
        if not isinstance(kind, DatasetKind):
            raise RuntimeError(f"{module.__name__} defines no DATASET")
        if kind.name in kinds or kind.name == "manifest":
            raise RuntimeError(f"dataset name {kind.name!r} of {module.__name__} is taken")
        kinds[kind.name] = kind
    return dict(sorted(kinds.items()))


KINDS: dict[str, DatasetKind] = _discover()
DATASET_NAMES: tuple[str, ...] = (*KINDS, "manifest")

# The particulars other modules import by name.
from common.data.aptos import APTOS_CLASSES  # noqa: E402
from common.data.orthonet import ORTHONET_CLASSES  # noqa: E402
from common.data.pacemaker import manufacturer_of  # noqa: E402

__all__ = [
    "APTOS_CLASSES", "DATASET_NAMES", "KINDS", "ORTHONET_CLASSES", "SPLITS", "Dataset",
    "check_data_report", "dataset_kind", "load_dataset", "manufacturer_of", "write_splits",
]

_MANIFEST_EXPECTED = "a CSV with columns path,label[,split]"


def dataset_kind(name: str) -> DatasetKind:
    """The registered dataset ``name`` (a :class:`UserError` listing the names otherwise)."""
    kind = KINDS.get(str(name).lower())
    if kind is None:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(KINDS)}")
    return kind


def _expected(name: str) -> str:
    return KINDS[name].expected if name in KINDS else _MANIFEST_EXPECTED


def _image_root(name: str, image_path: str | os.PathLike) -> Path:
    root = Path(absolute(image_path))
    if not root.exists():
        raise UserError(f"image path {printable(root)} does not exist; expected {_expected(name)}")
    if not root.is_dir():
        if root.suffix.lower() in ARCHIVE_SUFFIXES:
            raise UserError(f"image path {printable(root)} is an archive, not a folder; unzip it and pass the folder "
                            f"it holds (expected {_expected(name)})")
        raise UserError(f"image path {printable(root)} is not a folder; expected {_expected(name)}")
    if all(is_ignored(e) for e in os.listdir(root)):
        raise UserError(f"image path {printable(root)} is empty; expected {_expected(name)}")
    return root


def load_dataset(name: str, image_path: str | os.PathLike | None = None, *,
                 manifest: str | os.PathLike | None = None, seed: int = 0,
                 val_fraction: float = DEFAULT_FRACTION, test_fraction: float = DEFAULT_FRACTION,
                 strict: bool = False) -> Dataset:
    """Load, check and split dataset ``name`` from ``image_path`` (its layout auto-detected) or
    from a ``manifest`` CSV (``path,label[,split]``; relative paths against the CSV's folder).

    Splits: the official one where the layout has it; missing splits carved from train,
    stratified by class with ``seed`` (:mod:`.splits`).  ``strict`` turns skipped files
    (unreadable, truncated, empty, ``._*``, unknown OrthoNet code, CSV rows without an image)
    into a :class:`UserError`.  Files and folders under ``image_path`` the layout does not use
    are named in one warning (and in ``Dataset.unused``).  Nothing under ``image_path`` is ever
    written.
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
    if image_path is not None and manifest is not None:
        raise UserError(f"both --image_path {printable(image_path)} and --manifest {printable(manifest)} "
                        "were given; pass one of them (a manifest's relative paths resolve against "
                        "its own folder)")
    if manifest is not None:
        csv = Path(absolute(manifest))
        root = csv.parent
        notes = Notes(root)
        to_class, known = ((KINDS[name].label_to_class, KINDS[name].labels_known) if name in KINDS
                           else (generic_class, "any text"))
        found = read_manifest(csv, to_class, known, notes)
    elif name == "manifest":
        raise UserError(f"dataset 'manifest' needs --manifest FILE ({_MANIFEST_EXPECTED})")
    elif image_path is None:
        raise UserError(f"--image_path is required for {name}; expected {_expected(name)}")
    else:
        kind = KINDS[name]
        root, wrappers = descend_wrappers(_image_root(name, image_path), kind.layout_folders)
        notes = Notes(root)
        found = kind.read(root, notes)
        if wrappers:
            found.layout += f" (inside the wrapper folder {'/'.join(wrappers)}/)"
    logger.info("%s: found layout: %s", name, found.layout)
    return build_dataset(name, root, found, notes, expected=_expected(name), seed=seed,
                         val_fraction=val_fraction, test_fraction=test_fraction, strict=strict,
                         scan=manifest is None)


def write_splits(dataset: Dataset, path: str | os.PathLike) -> None:
    """Write ``splits.csv`` (columns path,label,class_name,split) atomically through
    :func:`common.io.write_csv`; paths that are not valid UTF-8 keep their original bytes."""
    write_csv(path, dataset.table[TABLE_COLUMNS])


def check_data_report(dataset: Dataset) -> str:
    """A human report: layout, classes, images per class and split, skipped files, leaks,
    warnings.  Every path is printable (relative to the dataset root)."""
    counts = dataset.counts()
    table = counts.copy()
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    table.index = [printable(c) for c in table.index]
    table.index.name = "class"
    identity = dataset.course_class_order == list(range(len(dataset.class_names)))
    lines = [
        f"Dataset: {dataset.name}",
        f"Root:    {printable(dataset.root)}",
        f"Layout:  {dataset.layout}",
        f"Classes: {len(dataset.class_names)}",
    ]
    if dataset.name in KINDS:
        lines += KINDS[dataset.name].report_lines(dataset.class_names)
    lines.append("Course project's class order (sorted raw labels): "
                 + ("the same as ours" if identity else
                    f"its class j is our class {dataset.course_class_order}[j]"))
    lines += ["", "Images per class and split:", table.to_string(), "",
              "Totals: " + ", ".join(f"{s} {int(counts[s].sum())}" for s in SPLITS)
              + f", all {len(dataset.table)}", ""]
    if dataset.masks:
        test = set(dataset.table.loc[dataset.table["split"] == "test", "path"])
        lines += [f"Object masks: {len(dataset.masks)} image(s), {len(test & set(dataset.masks))} of them in test "
                  "(attention localization)", ""]
    lines.append(f"Skipped files: {len(dataset.skipped)}")
    lines += [f"  {dataset.display(p)}: {r}" for p, r in dataset.skipped[:10]]
    if len(dataset.skipped) > 10:
        lines.append(f"  ... and {len(dataset.skipped) - 10} more")
    lines.append(f"Not used (files and folders under the root no image or label CSV accounts for): "
                 f"{len(dataset.unused)}")
    lines += [f"  {dataset.display(p.rstrip(os.sep))}{'/' if p.endswith(os.sep) else ''}: {r}"
              for p, r in dataset.unused[:10]]
    if len(dataset.unused) > 10:
        lines.append(f"  ... and {len(dataset.unused) - 10} more")
    lines.append(f"Leaks (identical content in two splits): {len(dataset.leaks)}")
    lines += [f"  {dataset.display(a)} ({sa}) == {dataset.display(b)} ({sb})"
              for a, sa, b, sb in dataset.leaks[:10]]
    if len(dataset.leaks) > 10:
        lines.append(f"  ... and {len(dataset.leaks) - 10} more")
    lines.append(f"Warnings: {len(dataset.warnings) or 'none'}")
    lines += [f"  {w}" for w in dataset.warnings]
    return "\n".join(lines)
