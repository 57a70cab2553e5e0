"""Pacemaker (common/data/pacemaker.py): Train/Test class folders in any case, a val folder, plain class
folders split 70/15/15, the manufacturer, the release with its mess."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.data.registry import (
    SPLITS,
    check_data_report,
    load_dataset,
    manufacturer_of,
)
from common.demo.synthetic import make_synthetic
from datatrees import (
    apple_double,
    class_tree,
    litter,
    png,
)


def test_pacemaker_official_test_split_is_kept(tmp_path):
    root = make_synthetic("pacemaker", tmp_path / "pm", classes=4, per_class=12)
    ds = load_dataset("pacemaker", root)
    assert ds.name == "pacemaker" and "Train/" in ds.layout and "Test/" in ds.layout
    assert ds.class_names == sorted(p.name for p in (root / "Train").iterdir())
    assert list(ds.table.columns) == ["path", "label", "class_name", "split"]
    t = ds.table
    in_test = t["path"].str.contains(f"{os.sep}Test{os.sep}")
    assert (t.loc[in_test, "split"] == "test").all()          # nothing left Test
    assert (t.loc[~in_test, "split"] != "test").all()         # nothing joined Test
    assert len(t) == 4 * 12 and set(t["split"]) == set(SPLITS)
    # labels follow class_names; class_name matches the folder
    for path, label, cls in zip(t["path"], t["label"], t["class_name"]):
        assert Path(path).parent.name == cls == ds.class_names[label]
    # val is carved from Train, about val_fraction of the whole
    assert (t["split"] == "val").sum() == round(0.15 * len(t))
    counts = ds.counts()
    assert list(counts.columns) == list(SPLITS) and (counts > 0).all().all()


def test_pacemaker_any_case_split_folders_and_val_folder(tmp_path):
    root = tmp_path / "pm"
    class_tree(root, {"MDT - Adapta": 3, "BOS - Accolade": 3}, "TRAIN")
    class_tree(root, {"MDT - Adapta": 2, "BOS - Accolade": 2}, "Valid")
    class_tree(root, {"MDT - Adapta": 2, "BOS - Accolade": 2}, "test")
    ds = load_dataset("pacemaker", root)
    assert "official split" in ds.layout and "carved" not in ds.layout
    expected = {"TRAIN": "train", "Valid": "val", "test": "test"}
    for path, split in zip(ds.table["path"], ds.table["split"]):
        assert expected[Path(path).parent.parent.name] == split
    assert ds.counts().loc["MDT - Adapta"].tolist() == [3, 2, 2]


def test_pacemaker_plain_class_folders_are_split_70_15_15(tmp_path):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 20, "MDT - Advisa": 20, "STJ - Assurity": 20})
    ds = load_dataset("pacemaker", root)
    assert "no split folders" in ds.layout
    sizes = ds.table["split"].value_counts()
    assert (sizes["train"], sizes["val"], sizes["test"]) == (42, 9, 9)
    assert (ds.counts() > 0).all().all()


def test_manufacturer_of():
    assert manufacturer_of("MDT - Adapta") == "MDT"
    assert manufacturer_of("STJ - Assurity MRI - v2") == "STJ"
    assert manufacturer_of("Unbranded") == "Unbranded"


PACEMAKER = {"MDT - Adapta": (6, 2), "MDT - Advisa": (7, 2), "STJ - Assurity": (6, 3)}  # (train, test)


def test_pacemaker_release_in_a_wrapper_with_mess(tmp_path, caplog):
    top = tmp_path / "download"
    root = top / "Pacemaker dataset v1"
    for cls, (n_train, n_test) in PACEMAKER.items():
        for split, n in (("Train", n_train), ("Test", n_test)):
            for i in range(n):
                png(root / split / cls / f"{i + 1:04d}.png")
            litter(root / split / cls)
    double = apple_double(root / "Train" / "MDT - Advisa" / "0002.png")
    (root / "Train" / "readme.txt").write_text("not an image")
    litter(top)
    (top / "__MACOSX").mkdir()                       # zip metadata beside the wrapper
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("pacemaker", top)

    assert ds.root == root
    assert "Train/" in ds.layout and "Test/" in ds.layout and "Pacemaker dataset v1" in ds.layout
    assert ds.class_names == sorted(PACEMAKER)
    counts = ds.counts()
    for cls, (n_train, n_test) in PACEMAKER.items():
        assert counts.at[cls, "test"] == n_test                       # official test kept
        assert counts.at[cls, "train"] + counts.at[cls, "val"] == n_train
    in_test = ds.table["path"].str.contains("/Test/")
    assert (ds.table.loc[in_test, "split"] == "test").all() and (ds.table.loc[~in_test, "split"] != "test").all()
    assert ds.skipped == [(str(double), "AppleDouble metadata file")]
    warnings = [r.message for r in caplog.records if "skipped" in r.message]
    # Every class has a 0002.png: the message names the file relative to the root.
    assert len(warnings) == 1 and "Train/MDT - Advisa/._0002.png" in warnings[0]
    assert ds.course_class_order == [0, 1, 2]


def test_pacemaker_numeric_class_folders_course_order(tmp_path):
    root = tmp_path / "pm"
    for cls in ("1", "2", "10"):
        for i in range(7):
            png(root / "Train" / cls / f"{i}.png")
        for i in range(2):
            png(root / "test" / cls / f"{i}.png")
    ds = load_dataset("pacemaker", root)
    assert ds.class_names == ["1", "2", "10"]                  # ours: numeric
    course = sorted(["1", "2", "10"])                           # the course code: sorted(os.listdir)
    assert course == ["1", "10", "2"]
    assert ds.course_class_order == [ds.class_names.index(c) for c in course] == [0, 2, 1]
    assert "its class j is our class [0, 2, 1][j]" in check_data_report(ds)
