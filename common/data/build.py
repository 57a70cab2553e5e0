"""From what a layout reader found to a checked, split :class:`Dataset`: every image checked
cheaply, skipped files summarised, what the layout passed over named, rows listing one image
twice sorted out (a second label or split is refused, an exact repeat kept once), classes
ordered, splits assigned, the course project's class order derived, leaks and identical files
within a split looked for."""

from __future__ import annotations

import logging
import os
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
from common.data.leaks import find_identical
from common.data.splits import assign_splits
from common.data.unused import unused_under
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


def _report_unused(root: Path, found: Found, notes: Notes) -> list[tuple[str, str]]:
    """What under ``root`` the layout passed over, in one warning naming and counting it."""
    used = set(found.table["path"]) | {p for p, _ in notes.skipped} | notes.read
    used |= {p.rstrip(os.sep) for p, _ in notes.passed}
    unused = sorted(unused_under(root, used) + notes.passed)
    if unused:
        folders = sum(p.endswith(os.sep) for p, _ in unused)
        counts = " and ".join(f"{n} {what}" for n, what in ((folders, "folder(s)"), (len(unused) - folders, "file(s)"))
                              if n)
        notes.warn(f"ignoring {counts} this layout does not use: "
                   f"{first_few(f'{notes.show(p)} ({why})' for p, why in unused)}")
    return unused


def _one_row_per_image(table: pd.DataFrame, notes: Notes) -> pd.DataFrame:
    """Rows listing one file twice: under two labels is a :class:`UserError` naming the file; in
    two splits with one label it is kept in the first (train, val, test) with a warning naming the
    leak; an exact repeat (same label and split) is kept once, with a warning of its own."""
    twice = table[table.duplicated("path", keep=False)]
    if twice.empty:
        return table
    kinds = twice.groupby("path", sort=True)[["class_name", "split"]].nunique(dropna=False)
    clashing = kinds.index[kinds["class_name"] > 1]
    if len(clashing):
        rows = twice[twice["path"] == clashing[0]]
        given = ", ".join(f"{printable(c)!r}" + (f" in {s}" if s else "")
                          for c, s in zip(rows["class_name"], rows["split"]))
        raise UserError(f"{len(clashing)} image(s) are listed under two labels, e.g. {notes.show(clashing[0])}: "
                        f"{given}; keep one row per image, with its right label")
    leaking = kinds.index[kinds["split"] > 1]
    if len(leaking):
        notes.warn(f"{len(leaking)} image(s) are listed in two splits (a leak), kept in the first of train, val, "
                   f"test only: {first_few(notes.show(p) for p in leaking)}; give each image one split")
    order = table["split"].map({s: i for i, s in enumerate(SPLITS)}).fillna(0).to_numpy()
    table = table.iloc[order.argsort(kind="stable")]
    exact = table.duplicated(["path", "split"]) & ~table["path"].isin(leaking)
    if exact.any():
        repeated = first_few(notes.show(p) for p in table.loc[exact, "path"])
        notes.warn(f"{int(exact.sum())} image(s) listed more than once with the same label and split (exact "
                   f"duplicates); keeping the first entry: {repeated}")
    return table[~table.duplicated("path")]


def _report_identical(dataset: Dataset, notes: Notes) -> None:
    """Files with identical content: across splits (a leak), or within one split under two labels
    (a label conflict) or under one (an exact duplicate that weighs twice)."""
    label = dict(zip(dataset.table["path"], dataset.table["class_name"]))
    pairs = find_identical(dataset.table)
    dataset.leaks = [pair for pair in pairs if pair[1] != pair[3]]
    if dataset.leaks:
        shown = [f"{notes.show(a)} ({sa}) = {notes.show(b)} ({sb})" for a, sa, b, sb in dataset.leaks]
        notes.warn(f"{len(dataset.leaks)} file(s) with identical content in two splits (a leak): "
                   f"{first_few(shown, 3)}")
    within = [(a, s, b) for a, s, b, sb in pairs if s == sb]
    conflicts = [(a, s, b) for a, s, b in within if label[a] != label[b]]
    if conflicts:
        shown = [f"{notes.show(a)} ({printable(label[a])!r}) = {notes.show(b)} ({printable(label[b])!r}) in {s}"
                 for a, s, b in conflicts]
        notes.warn(f"{len(conflicts)} pair(s) of identical files under two labels in one split (a label "
                   f"conflict): {first_few(shown, 3)}; check their labels and remove the wrong copy")
    repeats = [(a, s, b) for a, s, b in within if label[a] == label[b]]
    if repeats:
        shown = [f"{notes.show(a)} = {notes.show(b)} ({s})" for a, s, b in repeats]
        notes.warn(f"{len(repeats)} pair(s) of identical files with the same label in one split (exact "
                   f"duplicates: each weighs twice): {first_few(shown, 3)}")


def build_dataset(name: str, root: Path, found: Found, notes: Notes, *, expected: str, seed: int,
                  val_fraction: float, test_fraction: float, strict: bool, scan: bool = True) -> Dataset:
    """Check, split and label the images of ``found``; ``expected`` (the layouts the dataset
    reads, one line) ends the errors for an empty or one-class result.  ``scan``: name what
    under ``root`` the layout did not use (not for a manifest, whose folder is anyone's)."""
    table = _check_images(found.table, notes)
    _report_skipped(notes, strict)
    unused = _report_unused(root, found, notes) if scan else []
    if table.empty:
        raise UserError(f"no images found in {printable(root)}; expected {expected}")
    table = _one_row_per_image(table, notes)

    class_names = sorted_classes(table["class_name"])
    if len(class_names) < 2:
        raise UserError(f"found only one class ({class_names[0]!r}) in {printable(root)}; a probe needs "
                        f"at least 2; expected {expected}")
    # Carve from a path-sorted table, so the split depends on the files, not on listing order.
    table = table.sort_values("path", kind="stable").reset_index(drop=True)
    how = assign_splits(table, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, notes=notes)
    course = course_order(table, class_names)
    table["label"] = table["class_name"].map({c: i for i, c in enumerate(class_names)}).astype(int)
    table["_order"] = table["split"].map({s: i for i, s in enumerate(SPLITS)})
    table = (table.sort_values(["_order", "path"], kind="stable")
                  .reset_index(drop=True)[TABLE_COLUMNS])

    kept = set(table["path"])
    dataset = Dataset(name=name, root=root, layout=f"{found.layout}; {how}", table=table,
                      class_names=class_names, skipped=notes.skipped + notes.absent,
                      warnings=notes.warnings, course_class_order=course, unused=unused,
                      masks={p: m for p, m in found.masks.items() if p in kept})
    counts = dataset.counts()
    for split in SPLITS:
        absent = [c for c in class_names if counts.at[c, split] == 0]
        if absent and (split == "train" or counts[split].sum() > 0):
            notes.warn(f"{len(absent)} class(es) have no {split} images: {first_few(printable(c) for c in absent)}")
    _report_identical(dataset, notes)
    logger.info("%s: %s; %d images, %d classes (%s)", name, dataset.layout, len(table),
                len(class_names), ", ".join(f"{s} {n}" for s, n in counts.sum().items()))
    return dataset
