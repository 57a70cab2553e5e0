"""OrthoNet (common/data/orthonet.py): the Kaggle release, class folders by name or code, flat coded files,
a label CSV, and the ambiguous mixtures; built by hand the way the downloads look."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from common.data.registry import ORTHONET_CLASSES, load_dataset
from common.demo.synthetic import make_synthetic
from common.errors import UserError
from datatrees import (
    apple_double,
    class_tree,
    litter,
    one_line_error,
    png,
    write_csv,
)


def test_orthonet_flat_files_and_unknown_prefixes(tmp_path, caplog):
    root = make_synthetic("orthonet", tmp_path / "on", classes=4, per_class=10, layout="flat")
    png(root / "99_stray.png")
    png(root / "x1_stray.png")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("orthonet", root)
    assert "flat" in ds.layout
    codes = sorted({Path(p).name[:2] for p in ds.table["path"]})
    assert ds.class_names == [ORTHONET_CLASSES[c] for c in codes]
    for path, cls in zip(ds.table["path"], ds.table["class_name"]):
        assert ORTHONET_CLASSES[Path(path).name[:2]] == cls
    assert len(ds.table) == 40
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["99_stray.png", "x1_stray.png"]
    assert any("2 file(s)" in r.message and "99_stray.png" in r.message for r in caplog.records)


def test_orthonet_classes_table_has_the_twelve_codes():
    assert sorted(ORTHONET_CLASSES) == [f"{i:02d}" for i in (*range(1, 9), *range(21, 25))]
    assert ORTHONET_CLASSES["01"] == "Hip_DepuySynthes_Corail_Collar"
    assert ORTHONET_CLASSES["24"] == "Knee_ZimmerBiomet_Oxford"


def test_orthonet_class_folders_by_code_and_by_name(tmp_path):
    root = class_tree(tmp_path / "codes", {"01": 8, "21": 8})
    ds = load_dataset("orthonet", root)
    assert ds.class_names == [ORTHONET_CLASSES["01"], ORTHONET_CLASSES["21"]]
    assert "class-per-folder" in ds.layout

    root = class_tree(tmp_path / "names", {ORTHONET_CLASSES["05"]: 8, ORTHONET_CLASSES["23"]: 8})
    assert load_dataset("orthonet", root).class_names == [ORTHONET_CLASSES["05"], ORTHONET_CLASSES["23"]]

    root = class_tree(tmp_path / "bad", {"01": 8, "Mystery_Stem": 8})
    with pytest.raises(UserError) as err:
        load_dataset("orthonet", root)
    assert "Mystery_Stem" in one_line_error(err)


def test_orthonet_csv_in_folder(tmp_path):
    root = tmp_path / "on"
    rows = []
    for code in ("02", "22"):
        for i in range(8):
            png(root / "imgs" / f"img_{code}_{i}.png")
            rows.append((f"imgs/img_{code}_{i}.png", int(code)))
    pd.DataFrame(rows, columns=["Filename", "Label"]).to_csv(root / "labels.csv", index=False)
    ds = load_dataset("orthonet", root)
    assert "labels.csv" in ds.layout
    assert ds.class_names == [ORTHONET_CLASSES["02"], ORTHONET_CLASSES["22"]]
    assert (ds.table["class_name"] == [ORTHONET_CLASSES[Path(p).stem.split("_")[1]]
                                       for p in ds.table["path"]]).all()


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


def test_orthonet_kaggle_filenames_that_repeat_the_image_folder(tmp_path):
    root = make_synthetic("orthonet", tmp_path / "on", per_class=5, layout="kaggle")
    expected = len(load_dataset("orthonet", root).table)
    for name in ("train.csv", "test.csv"):
        frame = pd.read_csv(root / name, dtype=str)
        frame["filenames"] = "orthonet data/" + frame["filenames"]
        frame.to_csv(root / name, index=False)
    ds = load_dataset("orthonet", root)
    assert len(ds.table) == expected and ds.unused == []


def test_orthonet_kaggle_csv_none_of_whose_files_exists_is_an_error(tmp_path):
    root = make_synthetic("orthonet", tmp_path / "on", per_class=5, layout="kaggle")
    frame = pd.read_csv(root / "test.csv", dtype=str)
    frame["filenames"] = "scans/" + frame["filenames"]
    frame.to_csv(root / "test.csv", index=False)
    with pytest.raises(UserError) as err:
        load_dataset("orthonet", root)
    message = one_line_error(err)
    assert "listed in" in message and "test.csv exists" in message and "orthonet data/orthonet data/scans/" in message
    assert "filenames must be the images' names in orthonet data/orthonet data/" in message
