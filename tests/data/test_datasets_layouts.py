"""Every layout of docs/datasets.md, built by hand the way the downloads look, mess included (AppleDouble
files, OS litter, a CSV row whose image is missing, mask files beside the images, a wrapper
folder), read by the real loaders.  Expected counts, classes and splits are computed here from
the tree each test builds, never by the code under test."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.data.registry import (
    APTOS_CLASSES,
    ORTHONET_CLASSES,
    check_data_report,
    load_dataset,
)
from common.errors import UserError

_counter = iter(range(10**9))


def png(path: Path) -> Path:
    """A small valid PNG with unique content (so no accidental leaks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(next(_counter)).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path, format="PNG")
    return path


def litter(folder: Path) -> None:
    """What copies from a Mac or Windows leave behind."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"junk")


def apple_double(path: Path) -> Path:
    """A ``._name`` AppleDouble file beside ``path`` (looks like an image, is not one)."""
    double = path.with_name("._" + path.name)
    double.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    return double


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def split_counts(ds) -> dict[str, int]:
    return ds.table["split"].value_counts().to_dict()


# ---------------------------------------------------------------------------- pacemaker


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


# ---------------------------------------------------------------------------- orthonet: Kaggle release


def _orthonet_kaggle(root: Path, *, labels, doubled: bool = True, masks_first: bool = False):
    """train.csv (filenames,labels,masks,valid_mask) + test.csv (filenames,labels); images and
    masks in 'orthonet data/orthonet data/'.  ``labels(code)`` is the CSV label of a class.
    Returns {split: {class name: number of rows}}, the missing train file and the mask files."""
    folder = root / "orthonet data" / "orthonet data" if doubled else root / "orthonet data"
    codes = ("01", "05", "21", "24")
    rows = {"train": [], "test": []}
    masks = []
    for code in codes:
        for i in range(9):
            name = f"IMG {code}-{i:03d}.png"
            png(folder / name)
            if i < 2:
                rows["test"].append((name, labels(code)))
            else:
                mask = f"IMG {code}-{i:03d}_mask.png"
                png(folder / mask)                              # a mask beside its image
                masks.append(folder / mask)
                rows["train"].append((name, labels(code), mask, 1))
    rows["train"].append(("IMG 21-999.png", labels("21"), "IMG 21-999_mask.png", 0))  # no such file
    train = pd.DataFrame(rows["train"], columns=["filenames", "labels", "masks", "valid_mask"])
    if masks_first:
        train = train[["masks", "filenames", "labels", "valid_mask"]]
    write_csv(root / "train.csv", train)
    write_csv(root / "test.csv", pd.DataFrame(rows["test"], columns=["filenames", "labels"]))
    apple_double(folder / "IMG 01-000.png")
    litter(folder)
    litter(root)
    expected = {split: pd.Series([ORTHONET_CLASSES[code] for code in codes for _ in range(n)]).value_counts().to_dict()
                for split, n in (("train", 7), ("test", 2))}
    return expected, folder / "IMG 21-999.png", masks


@pytest.mark.parametrize("labels,doubled", [
    (lambda code: int(code), True),                 # codes as numbers: 1, 21
    (lambda code: code, False),                     # codes as text "01" (pandas reads 1)
    (lambda code: ORTHONET_CLASSES[code], True),    # class names
])
def test_orthonet_kaggle_release(tmp_path, caplog, labels, doubled):
    top = tmp_path / "archive"
    root = top / "orthonet-data"
    expected, missing, masks = _orthonet_kaggle(root, labels=labels, doubled=doubled)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("orthonet", top)
    assert ds.root == root
    images = "orthonet data/orthonet data/" if doubled else "orthonet data/"
    assert "train.csv + test.csv" in ds.layout and f"images in {images}" in ds.layout
    assert ds.class_names == sorted(expected["train"])
    counts = ds.counts()
    for cls in ds.class_names:
        assert counts.at[cls, "test"] == expected["test"][cls]           # official test kept
        assert counts.at[cls, "train"] + counts.at[cls, "val"] == expected["train"][cls]   # the missing row left out
    assert counts["val"].sum() == round(0.15 * len(ds.table))            # val carved from train
    paths = set(ds.table["path"])
    assert not paths & {str(m) for m in masks} and not any("mask" in p for p in paths)
    assert (str(missing), "missing: listed in train.csv, no file") in ds.skipped
    assert not any("._" in p for p, _ in ds.skipped)                    # not listed: not looked at
    msgs = [r.message for r in caplog.records if "row(s) have no image" in r.message]
    assert len(msgs) == 1 and "1 train.csv row(s)" in msgs[0] and "IMG 21-999.png" in msgs[0]
    assert ds.course_class_order == [0, 1, 2, 3]


def test_orthonet_kaggle_masks_column_is_never_the_path_column(tmp_path):
    expected, _, masks = _orthonet_kaggle(tmp_path / "on", labels=int, masks_first=True)
    ds = load_dataset("orthonet", tmp_path / "on")
    assert len(ds.table) == sum(expected["train"].values()) + sum(expected["test"].values())
    assert not any(p.endswith("_mask.png") for p in ds.table["path"])


def test_orthonet_kaggle_mask_listed_as_sample_is_skipped(tmp_path):
    root = tmp_path / "on"
    _, _, masks = _orthonet_kaggle(root, labels=int)
    train = pd.read_csv(root / "train.csv")
    train.loc[len(train)] = [masks[0].name, 1, "", 0]              # a mask listed as a sample
    train.to_csv(root / "train.csv", index=False)
    ds = load_dataset("orthonet", root)
    assert str(masks[0]) not in set(ds.table["path"])
    assert any(p == str(masks[0]) and "mask" in r for p, r in ds.skipped)


def test_orthonet_kaggle_course_order_of_text_labels(tmp_path):
    root = tmp_path / "on"
    folder = root / "orthonet data" / "orthonet data"
    # Text labels that pandas cannot read as numbers: the course code sorts them as text.
    labels = {"8": ORTHONET_CLASSES["08"], "Hip_DepuySynthes_Corail_Collar": ORTHONET_CLASSES["01"],
              "23": ORTHONET_CLASSES["23"]}
    train, test = [], []
    for label in labels:
        for i in range(8):
            name = png(folder / f"{len(train) + len(test):03d}.png").name
            (test if i < 2 else train).append((name, label))
    write_csv(root / "train.csv", pd.DataFrame(train, columns=["filenames", "labels"]))
    write_csv(root / "test.csv", pd.DataFrame(test, columns=["filenames", "labels"]))
    ds = load_dataset("orthonet", root)
    ours = sorted(labels.values())
    assert ds.class_names == ours
    course = sorted(labels)                                    # ["23", "8", "Hip_..."]
    assert ds.course_class_order == [ours.index(labels[c]) for c in course] == [2, 1, 0]


def test_orthonet_kaggle_plus_another_label_csv_is_ambiguous(tmp_path):
    root = tmp_path / "on"
    _orthonet_kaggle(root, labels=int)
    write_csv(root / "my_labels.csv", pd.DataFrame({"path": ["a.png"], "label": [1]}))
    with pytest.raises(UserError) as err:
        load_dataset("orthonet", root)
    msg = one_line_error(err)
    assert "train.csv" in msg and "test.csv" in msg and "my_labels.csv" in msg and "--manifest" in msg


def test_orthonet_kaggle_images_without_csvs(tmp_path):
    root = tmp_path / "on"
    png(root / "orthonet data" / "orthonet data" / "x.png")
    png(root / "orthonet data" / "orthonet data" / "y.png")
    with pytest.raises(UserError) as err:
        load_dataset("orthonet", root)
    msg = one_line_error(err)
    assert "orthonet data" in msg and "train.csv" in msg


def test_orthonet_unknown_kaggle_label_is_named(tmp_path):
    root = tmp_path / "on"
    _orthonet_kaggle(root, labels=int)
    test = pd.read_csv(root / "test.csv")
    test.loc[0, "labels"] = 9
    test.to_csv(root / "test.csv", index=False)
    with pytest.raises(UserError) as err:
        load_dataset("orthonet", root)
    msg = one_line_error(err)
    assert "test.csv" in msg and "'9'" in msg


# ---------------------------------------------------------------------------- orthonet: folders, flat


def test_orthonet_flat_files_in_a_wrapper(tmp_path, caplog):
    root = tmp_path / "OrthoNet" / "images"
    sizes = {"01": 6, "08": 5, "22": 7}
    for code, n in sizes.items():
        for i in range(n):
            png(root / f"{code}_{i:04d}.png")
    png(root / "99_stray.png")
    apple_double(root / "01_0000.png")
    litter(root)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("orthonet", tmp_path / "OrthoNet")
    assert "flat" in ds.layout and "images/" in ds.layout
    assert ds.counts().sum(axis=1).to_dict() == {ORTHONET_CLASSES[c]: n for c, n in sizes.items()}
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["._01_0000.png", "99_stray.png"]
    assert any("2 file(s)" in r.message and "99_stray.png" in r.message for r in caplog.records)


def test_orthonet_class_folders_under_split_folders(tmp_path):
    root = tmp_path / "on"
    for split, n in (("train", 6), ("Test", 2)):
        for folder in ("01_Corail_Collar", ORTHONET_CLASSES["24"]):
            for i in range(n):
                png(root / split / folder / f"{i}.png")
        litter(root / split)
    ds = load_dataset("orthonet", root)
    assert ds.class_names == [ORTHONET_CLASSES["01"], ORTHONET_CLASSES["24"]]
    assert ds.counts()["test"].tolist() == [2, 2]
    assert ds.course_class_order == [0, 1]


# ---------------------------------------------------------------------------- aptos


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


def test_orthonet_label_csv_beside_class_folders_is_ambiguous(tmp_path):
    root = tmp_path / "on"
    for code in ("01", "21"):
        for i in range(6):
            png(root / code / f"{i}.png")
    rows = [(f"{code}/{i}.png", int(code)) for code in ("01", "21") for i in range(6)]
    write_csv(root / "labels.csv", pd.DataFrame(rows, columns=["path", "label"]))
    with pytest.raises(UserError) as err:
        load_dataset("orthonet", root)
    msg = one_line_error(err)
    assert "labels.csv" in msg and "class folders" in msg and "--manifest" in msg
    # The way out the message names: the CSV as a manifest.
    ds = load_dataset("orthonet", manifest=root / "labels.csv")
    assert len(ds.table) == 12 and ds.class_names == [ORTHONET_CLASSES["01"], ORTHONET_CLASSES["21"]]
