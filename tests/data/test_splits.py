"""Carving splits (common/data/splits.py): stratified, seeded, every class everywhere, too-small classes
named, fractions that make a split impossible named."""

from __future__ import annotations

import pandas as pd
import pytest

from common.data.registry import load_dataset
from common.errors import UserError
from datatrees import class_tree, one_line_error


def test_stratified_split_is_seeded_and_has_every_class_everywhere(tmp_path):
    root = class_tree(tmp_path / "pm", {"A - a": 7, "A - b": 8, "B - c": 25, "C - d": 7})
    a = load_dataset("pacemaker", root, seed=3).table
    b = load_dataset("pacemaker", root, seed=3).table
    c = load_dataset("pacemaker", root, seed=4).table
    pd.testing.assert_frame_equal(a, b)
    assert not a.set_index("path")["split"].equals(c.set_index("path")["split"].loc[a["path"]])
    for table in (a, c):
        present = pd.crosstab(table["class_name"], table["split"])
        assert present.shape == (4, 3) and (present > 0).all().all()


def test_every_class_in_every_split_for_many_seeds(tmp_path):
    root = class_tree(tmp_path / "pm", {f"M{i} - x": 7 + 3 * i for i in range(6)})
    for seed in range(15):
        ds = load_dataset("pacemaker", root, seed=seed)
        assert (ds.counts() > 0).all().all(), seed


def test_class_too_small_to_split_is_named(tmp_path):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 10, "BIO - Evia": 2})
    with pytest.raises(UserError) as err:
        load_dataset("pacemaker", root)
    msg = one_line_error(err)
    assert "BIO - Evia" in msg and "2 image" in msg and "manifest" in msg


def test_class_too_small_for_val_carving_from_train(tmp_path):
    root = tmp_path / "pm"
    class_tree(root, {"MDT - Adapta": 10, "BIO - Evia": 1}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "BIO - Evia": 2}, "Test")
    with pytest.raises(UserError) as err:
        load_dataset("pacemaker", root)
    assert "BIO - Evia" in one_line_error(err)
