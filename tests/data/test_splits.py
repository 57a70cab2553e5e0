"""Carving splits (common/data/splits.py): stratified, seeded, every class everywhere, too-small classes
named, fractions that make a split impossible named."""

from __future__ import annotations

import logging

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


def test_fractions_that_make_the_split_impossible_are_named_not_the_images(tmp_path):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 6, "STJ - Assurity": 6, "BOS - Accolade": 6})
    load_dataset("pacemaker", root)                                   # the defaults split it
    with pytest.raises(UserError) as err:
        load_dataset("pacemaker", root, val_fraction=0.45, test_fraction=0.45)
    message = one_line_error(err)
    assert "test_fraction=0.45 and val_fraction=0.45" in message and "18 training image(s)" in message
    assert "use smaller fractions, e.g. test_fraction=0.15 and val_fraction=0.15" in message
    assert "add images" not in message


def test_too_few_images_for_any_fractions_still_asks_for_images(tmp_path):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 2, "STJ - Assurity": 2})
    with pytest.raises(UserError) as err:
        load_dataset("pacemaker", root, val_fraction=0.3, test_fraction=0.3)
    assert "add images" in one_line_error(err) and "_fraction=0.3" not in one_line_error(err)


def test_a_fraction_the_official_split_makes_pointless_is_said_once(tmp_path, caplog):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 6, "STJ - Assurity": 6}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")
    ds = load_dataset("pacemaker", root)                              # defaults: said in the layout line only
    assert "(test_fraction not used: the test split is official)" in ds.layout and not ds.warnings
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("pacemaker", root, test_fraction=0.3, val_fraction=0.2)
    said = [r.message for r in caplog.records if r.levelno >= logging.WARNING and "test_fraction" in r.message]
    assert len(said) == 1 and "test_fraction=0.3 has no effect: this layout has an official test split" in said[0]
    assert not any("val_fraction" in r.message for r in caplog.records if r.levelno >= logging.WARNING)  # val is carved
    assert (ds.table["split"] == "test").sum() == 4


def test_the_default_fraction_is_the_configs_default():
    import configs
    from common.data.splits import DEFAULT_FRACTION

    assert configs.RUN_DEFAULTS["val_fraction"] == configs.RUN_DEFAULTS["test_fraction"] == DEFAULT_FRACTION
