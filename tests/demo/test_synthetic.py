"""Synthetic datasets: real layouts (every layout of every dataset module, read by the real
loaders), uniform backgrounds, learnable classes, determinism, generation that a kill cannot
leave half-done."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import common.demo.synthetic as synthetic
from common.data.registry import (
    APTOS_CLASSES,
    KINDS,
    ORTHONET_CLASSES,
    load_dataset,
    manufacturer_of,
)
from common.demo.synthetic import make_synthetic
from common.errors import UserError

NAMES = ("pacemaker", "orthonet", "aptos")
LAYOUTS = [(name, layout) for name, kind in KINDS.items() for layout in kind.synthetic.layouts]


def _digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_pacemaker_layout(tmp_path):
    root = make_synthetic("pacemaker", tmp_path / "pm")
    assert root == tmp_path / "pm"
    assert _visible(root) == ["Test", "Train"]
    train = _visible(root / "Train")
    assert train == _visible(root / "Test") and len(train) == 4
    assert all(re.fullmatch(r"[A-Z]{3} - \w+", c) for c in train)
    makers = [manufacturer_of(c) for c in train]
    assert len(set(makers)) < len(makers)          # manufacturer accuracy differs from top-1
    assert all(len(list((root / "Train" / c).glob("*.png"))) > 0 for c in train)


def test_orthonet_default_is_the_kaggle_release(tmp_path):
    root = make_synthetic("orthonet", tmp_path / "on", per_class=5)
    assert _visible(root) == ["orthonet data", "test.csv", "train.csv"]
    folder = root / "orthonet data" / "orthonet data"
    train = pd.read_csv(root / "train.csv", dtype=str)
    test = pd.read_csv(root / "test.csv", dtype=str)
    assert list(train.columns) == ["filenames", "labels", "masks", "valid_mask"]
    assert list(test.columns) == ["filenames", "labels"]
    assert len(train) + len(test) == 20 and not set(train["filenames"]) & set(test["filenames"])
    assert set(train["labels"]) == set(test["labels"]) and len(set(train["labels"])) == 4
    assert set(train["labels"]) <= set(ORTHONET_CLASSES.values())
    assert {n[:3] for n in train["labels"]} == {"Hip", "Kne"}          # hip and knee classes
    for name in (*train["filenames"], *test["filenames"], *train["masks"]):
        assert (folder / name).is_file(), name
    # Masks lie beside the images; the images in the folder are exactly the CSV rows plus masks.
    assert sorted(p.name for p in folder.iterdir()) == sorted([*train["filenames"], *test["filenames"],
                                                              *train["masks"]])


def test_orthonet_flat_and_folder_layouts(tmp_path):
    root = make_synthetic("orthonet", tmp_path / "flat", per_class=5, layout="flat")
    files = _visible(root)
    assert len(files) == 20 and all(re.fullmatch(r"\d\d_\d{4}\.png", f) for f in files)
    codes = {f[:2] for f in files}
    assert len(codes) == 4 and any(c < "20" for c in codes) and any(c > "20" for c in codes)
    root = make_synthetic("orthonet", tmp_path / "folders", per_class=5, layout="folders")
    assert _visible(root) == sorted(ORTHONET_CLASSES[c] for c in codes)


def test_aptos_default_is_the_three_way_release(tmp_path):
    root = make_synthetic("aptos", tmp_path / "ap", per_class=7)
    assert _visible(root) == ["test.csv", "test_images", "train_1.csv", "train_images", "val_images", "valid.csv"]
    ids = set()
    for csv, folder in (("train_1.csv", "train_images"), ("valid.csv", "val_images"), ("test.csv", "test_images")):
        table = pd.read_csv(root / csv, dtype=str)
        assert list(table.columns) == ["id_code", "diagnosis"]
        assert sorted(table["diagnosis"].unique()) == ["0", "1", "2", "3", "4"]   # every grade in every split
        assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in table["id_code"])
        assert _visible(root / folder) == [folder]                                # doubled
        assert all((root / folder / folder / f"{i}.png").is_file() for i in table["id_code"])
        assert not ids & set(table["id_code"])
        ids |= set(table["id_code"])
    assert len(ids) == 35


def test_aptos_competition_layout(tmp_path):
    root = make_synthetic("aptos", tmp_path / "ap", per_class=4, layout="competition")
    train = pd.read_csv(root / "train.csv", dtype=str)
    assert list(train.columns) == ["id_code", "diagnosis"]
    assert sorted(train["diagnosis"].unique()) == ["0", "1", "2", "3", "4"]
    assert all((root / "train_images" / f"{i}.png").is_file() for i in train["id_code"])
    test = pd.read_csv(root / "test.csv", dtype=str)
    assert list(test.columns) == ["id_code"] and len(test) > 0
    assert all((root / "test_images" / f"{i}.png").is_file() for i in test["id_code"])
    assert not set(test["id_code"]) & set(train["id_code"])
    doubled = make_synthetic("aptos", tmp_path / "ap2", per_class=4, layout="competition_doubled")
    assert all((doubled / "train_images" / "train_images" / f"{i}.png").is_file()
               for i in pd.read_csv(doubled / "train.csv", dtype=str)["id_code"])


def _official_splits(root: Path, name: str, layout: str) -> dict[str, str] | None:
    """{file path: split} for the splits the tree itself fixes, read from the tree; None for
    layouts without an official split."""
    if name == "pacemaker":
        return {str(p): "test" for p in (root / "Test").rglob("*.png")}
    if (name, layout) == ("orthonet", "kaggle"):
        folder = root / "orthonet data" / "orthonet data"
        return {str(folder / f): "test" for f in pd.read_csv(root / "test.csv")["filenames"]}
    if name == "aptos" and layout.startswith("three_way"):
        found = {}
        for csv, split, folder in (("train_1.csv", "train", "train_images"), ("valid.csv", "val", "val_images"),
                                   ("test.csv", "test", "test_images")):
            base = root / folder / folder if layout == "three_way" else root / folder
            found.update({str(base / f"{i}.png"): split for i in pd.read_csv(root / csv, dtype=str)["id_code"]})
        return found
    return None


@pytest.mark.parametrize("name,layout", LAYOUTS)
def test_real_loader_reads_every_layout(tmp_path, name, layout):
    root = make_synthetic(name, tmp_path / name, per_class=8, image_size=16, layout=layout)
    ds = load_dataset(name, root)
    classes = KINDS[name].synthetic.default_classes
    assert len(ds.class_names) == classes and len(ds.table) == 8 * classes
    assert ds.skipped == [] and ds.leaks == [] and ds.warnings == []
    assert (ds.counts() > 0).all().all() and (ds.counts().sum(axis=1) == 8).all()
    official = _official_splits(root, name, layout)
    if official is not None:
        assert set(official) <= set(ds.table["path"])
        for path, split in zip(ds.table["path"], ds.table["split"]):
            # An official split is kept; nothing else joins it (val/test carved from train).
            assert split == official[path] if path in official else split not in official.values()
    if name == "aptos":
        assert ds.class_names == [APTOS_CLASSES[g] for g in range(5)]


@pytest.mark.parametrize("name", NAMES)
def test_images_are_rgb_with_a_uniform_background_over_half(tmp_path, name):
    root = make_synthetic(name, tmp_path / name, per_class=3, image_size=64)
    images = list(load_dataset(name, root).table["path"])
    assert images
    for path in images:
        im = Image.open(path)
        assert im.mode == "RGB" and im.size == (64, 64)
        arr = np.asarray(im)
        corner = arr[0, 0]
        uniform = (arr == corner).all(axis=-1)
        assert uniform.mean() > 0.55, path            # one exact value, well over half
        assert (arr[~uniform] != corner).any(axis=-1).all()


def test_orthonet_masks_are_the_object_silhouette(tmp_path):
    root = make_synthetic("orthonet", tmp_path / "on", per_class=4, image_size=32)
    folder = root / "orthonet data" / "orthonet data"
    train = pd.read_csv(root / "train.csv")
    for image, mask in zip(train["filenames"], train["masks"]):
        arr = np.asarray(Image.open(folder / image))
        silhouette = np.asarray(Image.open(folder / mask))
        assert set(np.unique(silhouette)) <= {0, 255}
        assert ((silhouette == 255) == (arr != arr[0, 0]).any(axis=-1)).all()


@pytest.mark.parametrize("name", NAMES)
def test_classes_are_linearly_separable(tmp_path, name):
    ds = load_dataset(name, make_synthetic(name, tmp_path / name, per_class=12, image_size=48))
    # Grey-level histograms: position-free features, like a patch mean of random-ViT tokens.
    x = np.stack([np.histogram(np.asarray(Image.open(p).convert("L")), bins=32, range=(0, 256))[0]
                  for p in ds.table["path"]]).astype(np.float32) / 48**2
    y = ds.table["label"].to_numpy()
    train = ds.table["split"].to_numpy() != "test"
    # Standardised features, as the project's probe uses.
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[train], y[train])
    assert probe.score(x[~train], y[~train]) >= 0.9


@pytest.mark.parametrize("name,layout", LAYOUTS)
def test_deterministic_for_the_seed(tmp_path, name, layout):
    def make(folder: str, seed: int) -> dict[str, bytes]:
        return _digest(make_synthetic(name, tmp_path / folder, per_class=3, image_size=16, seed=seed, layout=layout))

    a, b, c = make("a", 1), make("b", 1), make("c", 2)
    assert a == b
    assert a != c


def test_repeat_call_leaves_the_tree_untouched_and_foreign_folders_are_refused(tmp_path):
    root = make_synthetic("orthonet", tmp_path / "on", per_class=3)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    time.sleep(0.01)                                    # so a rewrite would show in the mtimes
    assert make_synthetic("orthonet", root, per_class=3) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    with pytest.raises(UserError) as err:
        make_synthetic("orthonet", root, per_class=4)      # other parameters: not ours to change
    assert str(root) in str(err.value)
    with pytest.raises(UserError):
        make_synthetic("orthonet", root, per_class=3, layout="flat")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(UserError):
        make_synthetic("aptos", foreign)
    assert (foreign / "keep.txt").read_text() == "x" and _visible(foreign) == ["keep.txt"]
    empty = tmp_path / "made-by-the-user"
    empty.mkdir()
    assert make_synthetic("pacemaker", empty, per_class=3, image_size=16) == empty
    assert _visible(empty) == ["Test", "Train"]


class _Killed(Exception):
    pass


def test_an_interrupted_generation_does_not_block_the_next_call(tmp_path, monkeypatch):
    root = tmp_path / "data"
    written = []
    real_png = synthetic._png

    def dies_half_way(img, path):
        if len(written) == 10:
            raise _Killed()
        written.append(path)
        real_png(img, path)

    # A killed process runs no cleanup: nothing is removed behind it.
    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "_png", dies_half_way)
        patch.setattr(synthetic.shutil, "rmtree", lambda *args, **kwargs: None)
        with pytest.raises(_Killed):
            make_synthetic("aptos", root, per_class=6, image_size=16)
    assert not root.exists()                            # no half-written dataset in place
    leftovers = [p for p in tmp_path.iterdir() if p.name != "data"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".data.")
    assert all(str(p).startswith(str(leftovers[0])) for p in written)
    foreign = tmp_path / ".data.partial-1-notours"      # looks like ours, has no marker: kept
    (foreign / "keep.txt").parent.mkdir()
    (foreign / "keep.txt").write_text("x")

    assert make_synthetic("aptos", root, per_class=6, image_size=16) == root
    assert not leftovers[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name, "data"]
    assert (foreign / "keep.txt").read_text() == "x"
    ds = load_dataset("aptos", root)
    assert len(ds.table) == 30 and ds.skipped == []


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError):
        make_synthetic("mnist", tmp_path / "x")
    with pytest.raises(UserError):
        make_synthetic("aptos", tmp_path / "x", classes=6)
    with pytest.raises(UserError) as err:
        make_synthetic("pacemaker", tmp_path / "x", layout="kaggle")
    assert "folders" in str(err.value)
    assert not (tmp_path / "x").exists()
