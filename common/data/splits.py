"""Carving the splits a layout does not give: stratified by class with a fixed seed.

The official split where one exists is kept as is.  Missing splits are carved from train with
:func:`sklearn.model_selection.train_test_split` (stratified): test first (``test_fraction`` of
all images), then val (``val_fraction`` of all images).  With no split information at all that
is 70/15/15; where a test split exists, only val is carved from train.
"""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from common.data.dataset import one_line
from common.errors import UserError


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


def assign_splits(table: pd.DataFrame, *, seed: int, val_fraction: float, test_fraction: float) -> str:
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
        raise UserError(f"no train split given (found {sorted(given)}); add training images")
    todo = [(s, f) for s, f in (("test", test_fraction), ("val", val_fraction))
            if s not in given and f > 0]
    if not todo:
        return "official split"
    what = " and ".join(s for s, _ in todo)
    _too_small(table[table["split"] == "train"], len(todo) + 1, what)
    n_total = len(table)
    for split, fraction in todo:
        _carve(table, split, n_total, fraction, seed)
    kept = f"official {'/'.join(s for s in ('train', 'val', 'test') if s in given)}; " if given else ""
    return f"{kept}{what} carved from train, stratified by class (seed {seed})"
