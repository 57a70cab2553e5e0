"""APTOS 2019 (common/data/aptos.py): the three-way release and the competition release, single or doubled
image folders, missing rows, bad grades, ambiguous mixtures."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.data.registry import APTOS_CLASSES, load_dataset
from common.demo.synthetic import make_synthetic
from common.errors import UserError
from datatrees import (
    apple_double,
    litter,
    one_line_error,
    png,
    write_csv,
)


def test_aptos_competition_layout_and_missing_rows(tmp_path, caplog):
    root = make_synthetic("aptos", tmp_path / "ap", per_class=10, layout="competition")
    train = pd.read_csv(root / "train.csv", dtype=str)
    gone = train["id_code"].iloc[:2].tolist()
    for ident in gone:
        (root / "train_images" / f"{ident}.png").unlink()
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("aptos", root)
    assert ds.class_names == ["0 - No DR", "1 - Mild", "2 - Moderate", "3 - Severe",
                              "4 - Proliferative DR"]
    assert len(ds.table) == len(train) - 2
    diagnosis = dict(zip(train["id_code"], train["diagnosis"].astype(int)))
    assert all(diagnosis[Path(p).stem] == label for p, label in zip(ds.table["path"], ds.table["label"]))
    assert not ds.table["path"].str.contains("test_images").any()   # test.csv ignored
    assert sum(gone[0] in p for p, _ in ds.skipped) == 1
    msgs = [r.message for r in caplog.records if "train.csv" in r.message]
    assert len(msgs) == 1 and "2 train.csv row(s)" in msgs[0] and gone[0] in msgs[0]


@pytest.mark.parametrize("remove", ["train.csv", "train_images"])
def test_aptos_missing_item_names_it(tmp_path, remove):
    root = make_synthetic("aptos", tmp_path / "ap", per_class=4, layout="competition")
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError) as err:
        load_dataset("aptos", root)
    msg = one_line_error(err)
    assert str(root) in msg and "train.csv" in msg and "train_images" in msg


def _aptos_three_way(root: Path, *, doubled: bool) -> dict[str, pd.DataFrame]:
    """train_1.csv, valid.csv, test.csv with their image folders; returns the CSV tables."""
    rng = np.random.default_rng(7)
    tables = {}
    for csv, folder_name, n in (("train_1.csv", "train_images", 6), ("valid.csv", "val_images", 2),
                                ("test.csv", "test_images", 2)):
        folder = root / folder_name / folder_name if doubled else root / folder_name
        rows = []
        for grade in range(5):
            for _ in range(n):
                ident = rng.bytes(6).hex()
                png(folder / f"{ident}.png")
                rows.append((ident, grade))
        tables[csv] = pd.DataFrame(rows, columns=["id_code", "diagnosis"])
        write_csv(root / csv, tables[csv])
        litter(folder)
    return tables


@pytest.mark.parametrize("doubled", [True, False])
def test_aptos_three_way_release_with_mess(tmp_path, caplog, doubled):
    top = tmp_path / "aptos2019"
    root = top / "aptos2019"
    tables = _aptos_three_way(root, doubled=doubled)
    val_folder = root / "val_images" / "val_images" if doubled else root / "val_images"
    gone = tables["valid.csv"]["id_code"].iloc[0]
    (val_folder / f"{gone}.png").unlink()                       # a row whose image is missing
    apple_double(next(val_folder.glob("*.png")))
    litter(root)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("aptos", top)
    assert ds.root == root
    images = "train_images/train_images/" if doubled else "train_images/"
    assert "train_1.csv" in ds.layout and "valid.csv" in ds.layout and images in ds.layout
    assert "carved" not in ds.layout                             # all three splits official
    assert ds.class_names == [APTOS_CLASSES[g] for g in range(5)]
    for csv, split in (("train_1.csv", "train"), ("valid.csv", "val"), ("test.csv", "test")):
        want = tables[csv]
        want = want[want["id_code"] != gone]
        got = ds.table[ds.table["split"] == split]
        assert sorted(Path(p).stem for p in got["path"]) == sorted(want["id_code"])
        grade = dict(zip(want["id_code"], want["diagnosis"]))
        assert all(grade[Path(p).stem] == label for p, label in zip(got["path"], got["label"]))
    assert [r for _, r in ds.skipped] == ["missing: listed in valid.csv, no file"]
    msgs = [r.message for r in caplog.records if "valid.csv" in r.message]
    assert len(msgs) == 1 and "1 valid.csv row(s)" in msgs[0] and gone in msgs[0]
    assert ds.course_class_order == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("doubled", [True, False])
def test_aptos_competition_release(tmp_path, doubled):
    root = tmp_path / "ap"
    folder = root / "train_images" / "train_images" if doubled else root / "train_images"
    rows = [(f"id{g}x{i}", g) for g in range(5) for i in range(7)]
    for ident, _ in rows:
        png(folder / f"{ident}.png")
    write_csv(root / "train.csv", pd.DataFrame(rows, columns=["id_code", "diagnosis"]))
    write_csv(root / "test.csv", pd.DataFrame({"id_code": ["t1", "t2"]}))        # unlabelled
    png(root / "test_images" / "t1.png")
    png(root / "test_images" / "t2.png")
    ds = load_dataset("aptos", root)
    assert "train.csv" in ds.layout and ("train_images/train_images/" in ds.layout) == doubled
    assert len(ds.table) == len(rows) and not ds.table["path"].str.contains("test_images").any()
    assert ds.counts().sum(axis=1).tolist() == [7] * 5


def test_aptos_train_csv_beside_train_1_csv_is_ambiguous(tmp_path):
    root = tmp_path / "ap"
    tables = _aptos_three_way(root, doubled=True)
    write_csv(root / "train.csv", tables["train_1.csv"])
    with pytest.raises(UserError) as err:
        load_dataset("aptos", root)
    msg = one_line_error(err)
    assert "train.csv" in msg and "train_1.csv" in msg and "--manifest" in msg


def test_aptos_three_way_missing_csv_is_named(tmp_path):
    root = tmp_path / "ap"
    _aptos_three_way(root, doubled=True)
    (root / "valid.csv").unlink()
    with pytest.raises(UserError) as err:
        load_dataset("aptos", root)
    assert "valid.csv" in one_line_error(err)


def test_aptos_bad_grade_is_named(tmp_path):
    root = tmp_path / "ap"
    tables = _aptos_three_way(root, doubled=False)
    bad = tables["test.csv"].copy()
    bad.loc[3, "diagnosis"] = 7
    write_csv(root / "test.csv", bad)
    with pytest.raises(UserError) as err:
        load_dataset("aptos", root)
    msg = one_line_error(err)
    assert "test.csv line 5" in msg and "'7'" in msg


@pytest.mark.parametrize("spelled", ["train_images/{}", "{}.png", "train_images/{}.png", "train_images\\{}"])
def test_aptos_id_code_with_the_folder_or_the_suffix_names_the_same_image(tmp_path, spelled):
    root = make_synthetic("aptos", tmp_path / "ap", per_class=4, layout="competition")
    train = pd.read_csv(root / "train.csv", dtype=str)
    expected = sorted(str(root / "train_images" / f"{i}.png") for i in train["id_code"])
    train["id_code"] = [spelled.format(i) for i in train["id_code"]]
    train.to_csv(root / "train.csv", index=False)
    assert sorted(load_dataset("aptos", root).table["path"]) == expected


def test_aptos_csv_none_of_whose_ids_has_an_image_names_where_it_looked(tmp_path):
    root = make_synthetic("aptos", tmp_path / "ap", per_class=4, layout="three_way")
    train = pd.read_csv(root / "train_1.csv", dtype=str)
    train["id_code"] = "images/" + train["id_code"]                  # a folder that is not the image folder
    train.to_csv(root / "train_1.csv", index=False)
    with pytest.raises(UserError) as err:
        load_dataset("aptos", root)
    message = one_line_error(err)
    assert f"none of the {len(train)} file(s) listed in {root / 'train_1.csv'} exists" in message
    assert f"train_images/train_images/images/{train['id_code'].iloc[0][7:]}.png" in message
    assert "id_code must be the image's name in train_images/train_images/" in message
    assert "add training images" not in message


def test_aptos_competition_test_set_is_explained_not_reported_unused(tmp_path):
    root = make_synthetic("aptos", tmp_path / "ap", per_class=4, layout="competition_doubled")
    ds = load_dataset("aptos", root)
    assert "test.csv and test_images/: the competition's unlabelled test set, not used" in ds.layout
    assert ds.unused == []
