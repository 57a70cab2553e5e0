"""From what a layout reader found to a checked, split :class:`Dataset`: every image checked
cheaply, skipped files summarised, classes ordered, splits assigned, the course project's class
order derived, leaks looked for."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from common.data.dataset import (
    SPLITS,
    TABLE_COLUMNS,
    Dataset,
    Found,
    Notes,
    first_few,
    int_like,
    parallel,
    printable,
)
from common.data.images import check_image
from common.data.leaks import find_leaks
from common.data.splits import assign_splits
from common.errors import UserError

logger = logging.getLogger("common.data.registry")


def sorted_classes(names) -> list[str]:
    """Our class order: numeric if every name is an integer, else lexicographic (for the
    OrthoNet names and the APTOS grade names that is also their code order)."""
    names = sorted(set(names))
    if names and all(int_like(n) for n in names):
        return sorted(names, key=int)
    return names


def course_order(table: pd.DataFrame, class_names: list[str]) -> list[int]:
    """Our label of each class of the original course code, which numbers classes by
    ``sorted()`` of the raw label values it read (folder names, or CSV cells after pandas'
    type inference).  ``table`` has columns ``raw_label`` and ``class_name``."""
    index = {c: i for i, c in enumerate(class_names)}
    class_of_raw = dict(zip(table["raw_label"], table["class_name"]))
    # A column is one type in pandas; the key only keeps mixed tables (two CSVs) from failing.
    order = sorted(class_of_raw, key=lambda v: (isinstance(v, str), v))
    return [index[class_of_raw[raw]] for raw in order]


def _check_images(table: pd.DataFrame, notes: Notes) -> pd.DataFrame:
    """The rows whose file passes :func:`common.data.images.check_image`; the others are skipped."""
    reasons = parallel(check_image, list(table["path"]), "checking images")
    for path, reason in zip(table["path"], reasons):
        if reason is not None:
            notes.skip(path, reason)
    return table[[r is None for r in reasons]]


def _report_skipped(notes: Notes, strict: bool) -> None:
    """One warning counting the skipped files by reason; ``strict`` makes it an error."""
    everything = notes.skipped + notes.absent
    if strict and everything:
        reasons = pd.Series([r for _, r in everything]).value_counts()
        summary = ", ".join(f"{n} {r}" for r, n in reasons.items())
        raise UserError(f"--strict: {len(everything)} file(s) skipped or missing ({summary}); first: "
                        f"{notes.show(everything[0][0])}; fix or remove them")
    if notes.skipped:
        reasons = pd.Series([r for _, r in notes.skipped]).value_counts()
        summary = ", ".join(f"{n} {r}" for r, n in reasons.items())
        notes.warn(f"skipped {len(notes.skipped)} file(s) ({summary}): "
                   f"{first_few(notes.show(p) for p, _ in notes.skipped)}")


def build_dataset(name: str, root: Path, found: Found, notes: Notes, *, expected: str, seed: int,
                  val_fraction: float, test_fraction: float, strict: bool) -> Dataset:
    """Check, split and label the images of ``found``; ``expected`` (the layouts the dataset
    reads, one line) ends the errors for an empty or one-class result."""
    table = _check_images(found.table, notes)
    _report_skipped(notes, strict)
    if table.empty:
        raise UserError(f"no images found in {printable(root)}; expected {expected}")
    duplicated = table.duplicated("path")
    if duplicated.any():
        notes.warn(f"{int(duplicated.sum())} image(s) listed more than once; keeping the first entry: "
                   f"{first_few(notes.show(p) for p in table.loc[duplicated, 'path'])}")
        table = table[~duplicated]

    class_names = sorted_classes(table["class_name"])
    if len(class_names) < 2:
        raise UserError(f"found only one class ({class_names[0]!r}) in {printable(root)}; a probe needs "
                        f"at least 2; expected {expected}")
    # Carve from a path-sorted table, so the split depends on the files, not on listing order.
    table = table.sort_values("path", kind="stable").reset_index(drop=True)
    how = assign_splits(table, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    course = course_order(table, class_names)
    table["label"] = table["class_name"].map({c: i for i, c in enumerate(class_names)}).astype(int)
    table["_order"] = table["split"].map({s: i for i, s in enumerate(SPLITS)})
    table = (table.sort_values(["_order", "path"], kind="stable")
                  .reset_index(drop=True)[TABLE_COLUMNS])

    dataset = Dataset(name=name, root=root, layout=f"{found.layout}; {how}", table=table,
                      class_names=class_names, skipped=notes.skipped + notes.absent,
                      warnings=notes.warnings, course_class_order=course)
    counts = dataset.counts()
    for split in SPLITS:
        absent = [c for c in class_names if counts.at[c, split] == 0]
        if absent and (split == "train" or counts[split].sum() > 0):
            notes.warn(f"{len(absent)} class(es) have no {split} images: {first_few(printable(c) for c in absent)}")
    dataset.leaks = find_leaks(table)
    if dataset.leaks:
        pairs = [f"{notes.show(a)} ({sa}) = {notes.show(b)} ({sb})" for a, sa, b, sb in dataset.leaks]
        notes.warn(f"{len(dataset.leaks)} file(s) with identical content in two splits (a leak): "
                   f"{first_few(pairs, 3)}")
    logger.info("%s: %s; %d images, %d classes (%s)", name, dataset.layout, len(table),
                len(class_names), ", ".join(f"{s} {n}" for s, n in counts.sum().items()))
    return dataset
