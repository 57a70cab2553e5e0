"""Carving the splits a layout does not give: stratified by class with a fixed seed.

The official split where one exists is kept as is.  Missing splits are carved from train with
:func:`sklearn.model_selection.train_test_split` (stratified): test first (``test_fraction`` of
all images), then val (``val_fraction`` of all images).  With no split information at all that
is 70/15/15; where a test split exists, only val is carved from train.  A fraction the layout
makes pointless (``val_fraction`` where the layout has an official val split) is said in the
layout line, and in a warning when it differs from the default.  A carve that fails because of
the fractions says so, and what would work, instead of asking for more images.
"""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from common.data.dataset import Notes, one_line
from common.errors import UserError

# The fractions' default (configs.py's too); a different value is a choice the user made.
DEFAULT_FRACTION = 0.15


def _too_small(pool: pd.DataFrame, needed: int, what: str) -> None:
    counts = pool["class_name"].value_counts()
    small = counts[counts < needed]
    if not small.empty:
        cls, n = small.index[0], int(small.iloc[0])
        more = f" (and {len(small) - 1} other class(es))" if len(small) > 1 else ""
        raise UserError(
            f"class {cls!r} has only {n} image(s) in train{more}, too few to split off {what} "
            f"(needs at least {needed}); add images of this class or drop it with a --manifest CSV")


def _carve(table: pd.DataFrame, split: str, n_total: int, fraction: float, seed: int) -> None:
    """Move a stratified ``fraction`` of all images from train into ``split`` (in place)."""
    pool = table[table["split"] == "train"]
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
        raise UserError(f"cannot split off {split} stratified by class ({one_line(exc)}); smallest "
                        f"class {counts.index[-1]!r} has {int(counts.iloc[-1])} image(s) in train; "
                        "add images or drop it with a --manifest CSV") from None
    table.loc[taken, "split"] = split


def _carve_all(table: pd.DataFrame, todo: list[tuple[str, float]], seed: int) -> None:
    what = " and ".join(s for s, _ in todo)
    _too_small(table[table["split"] == "train"], len(todo) + 1, what)
    n_total = len(table)
    for split, fraction in todo:
        _carve(table, split, n_total, fraction, seed)


def _works(table: pd.DataFrame, todo: list[tuple[str, float]], seed: int) -> bool:
    try:
        _carve_all(table.copy(), todo, seed)
    except UserError:
        return False
    return True


def _carve_or_blame_fractions(table: pd.DataFrame, todo: list[tuple[str, float]], seed: int) -> None:
    """Carve ``todo`` ``(split, fraction)``; if that fails but the default fractions would work,
    the error names the fractions (they, not the number of images, are the cause)."""
    before = table.copy()
    try:
        _carve_all(table, todo, seed)
    except UserError:
        defaults = [(split, DEFAULT_FRACTION) for split, _ in todo]
        if todo == defaults or not _works(before, defaults, seed):
            raise
        n_train = int((before["split"] == "train").sum())
        asked = " and ".join(f"{s}_fraction={f}" for s, f in todo)
        raise UserError(
            f"{asked} {'leave' if len(todo) > 1 else 'leaves'} too few of the {n_train} training image(s) to split "
            f"{before['class_name'].nunique()} "
            "classes stratified (every class needs images on each side); use smaller fractions, e.g. "
            f"{' and '.join(f'{s}_fraction={DEFAULT_FRACTION}' for s, _ in todo)}") from None


def _pointless(given: set[str], val_fraction: float, test_fraction: float, notes: Notes | None) -> str:
    """The fractions the official splits make pointless: a note for the layout line, and a
    warning for a value that is not the default (the user chose it)."""
    unused = [(f"{s}_fraction", f) for s, f in (("val", val_fraction), ("test", test_fraction)) if s in given]
    if not unused:
        return ""
    for key, value in unused:
        if value != DEFAULT_FRACTION and notes is not None:
            split = key.split("_")[0]
            notes.warn(f"{key}={value} has no effect: this layout has an official {split} split, which is "
                       f"kept as it is; to carve {split} from train instead, pass a --manifest whose split "
                       f"column has no {split}")
    keys = " and ".join(k for k, _ in unused)
    splits = " and ".join(k.split("_")[0] for k, _ in unused)
    return f" ({keys} not used: the {splits} split{'s are' if len(unused) > 1 else ' is'} official)"


def assign_splits(table: pd.DataFrame, *, seed: int, val_fraction: float, test_fraction: float,
                  notes: Notes | None = None) -> str:
    """Fill in the ``split`` column of ``table`` (columns ``class_name``, ``split``; None where
    unknown) in place, carving missing splits from train.  Returns how, for the layout line."""
    if table["split"].isna().all():
        table["split"] = "train"
        given: set[str] = set()
    elif table["split"].isna().any():
        raise UserError("some images have a split and some do not; give every image a split")
    else:
        given = set(table["split"])
    if given and "train" not in given:
        raise UserError(f"no image is in the train split (all are in {', '.join(sorted(given))}); give "
                        "some images the train split, or leave the split out to carve it")
    pointless = _pointless(given, val_fraction, test_fraction, notes)
    todo = [(s, f) for s, f in (("test", test_fraction), ("val", val_fraction))
            if s not in given and f > 0]
    if not todo:
        return "official split" + pointless
    _carve_or_blame_fractions(table, todo, seed)
    kept = f"official {'/'.join(s for s in ('train', 'val', 'test') if s in given)}; " if given else ""
    what = " and ".join(s for s, _ in todo)
    return f"{kept}{what} carved from train, stratified by class (seed {seed}){pointless}"
