"""Synthetic datasets: real layouts, uniform backgrounds, learnable classes, determinism."""

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

from common.datasets import load_dataset, manufacturer_of
from common.errors import UserError
from common.synthetic import make_synthetic

NAMES = ("pacemaker", "orthonet", "aptos")


def _digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pacemaker_layout(tmp_path):
    root = make_synthetic("pacemaker", tmp_path / "pm")
    assert root == tmp_path / "pm"
    train = sorted(p.name for p in (root / "Train").iterdir())
    assert train == sorted(p.name for p in (root / "Test").iterdir()) and len(train) == 4
    assert all(re.fullmatch(r"[A-Z]{3} - \w+", c) for c in train)
    makers = [manufacturer_of(c) for c in train]
    assert len(set(makers)) < len(makers)          # manufacturer accuracy differs from top-1
    assert all(len(list((root / "Train" / c).glob("*.png"))) > 0 for c in train)


def test_orthonet_layout(tmp_path):
    root = make_synthetic("orthonet", tmp_path / "on", per_class=5)
    files = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert len(files) == 20 and all(re.fullmatch(r"\d\d_\d{4}\.png", f) for f in files)
    codes = {f[:2] for f in files}
    assert len(codes) == 4 and any(c < "20" for c in codes) and any(c > "20" for c in codes)


def test_aptos_layout(tmp_path):
    root = make_synthetic("aptos", tmp_path / "ap", per_class=4)
    train = pd.read_csv(root / "train.csv", dtype=str)
    assert list(train.columns) == ["id_code", "diagnosis"]
    assert sorted(train["diagnosis"].unique()) == ["0", "1", "2", "3", "4"]
    assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in train["id_code"])
    assert all((root / "train_images" / f"{i}.png").is_file() for i in train["id_code"])
    test = pd.read_csv(root / "test.csv", dtype=str)
    assert list(test.columns) == ["id_code"] and len(test) > 0
    assert all((root / "test_images" / f"{i}.png").is_file() for i in test["id_code"])
    assert not set(test["id_code"]) & set(train["id_code"])


@pytest.mark.parametrize("name", NAMES)
def test_real_loader_reads_it(tmp_path, name):
    ds = load_dataset(name, make_synthetic(name, tmp_path / name, per_class=8))
    assert len(ds.class_names) == {"pacemaker": 4, "orthonet": 4, "aptos": 5}[name]
    assert len(ds.table) == 8 * len(ds.class_names)
    assert ds.skipped == [] and ds.leaks == [] and (ds.counts() > 0).all().all()


@pytest.mark.parametrize("name", NAMES)
def test_images_are_rgb_with_a_uniform_background_over_half(tmp_path, name):
    root = make_synthetic(name, tmp_path / name, per_class=3, image_size=64)
    images = [p for p in root.rglob("*.png")]
    assert images
    for path in images:
        im = Image.open(path)
        assert im.mode == "RGB" and im.size == (64, 64)
        arr = np.asarray(im)
        corner = arr[0, 0]
        uniform = (arr == corner).all(axis=-1)
        assert uniform.mean() > 0.55, path            # one exact value, well over half
        assert (arr[~uniform] != corner).any(axis=-1).all()


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


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_the_seed(tmp_path, name):
    a = _digest(make_synthetic(name, tmp_path / "a", per_class=3, seed=1))
    b = _digest(make_synthetic(name, tmp_path / "b", per_class=3, seed=1))
    c = _digest(make_synthetic(name, tmp_path / "c", per_class=3, seed=2))
    assert a == b
    assert a != c


def test_repeat_call_leaves_the_tree_untouched_and_foreign_folders_are_refused(tmp_path):
    root = make_synthetic("orthonet", tmp_path / "on", per_class=3)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    time.sleep(0.01)
    assert make_synthetic("orthonet", root, per_class=3) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    with pytest.raises(UserError) as err:
        make_synthetic("orthonet", root, per_class=4)      # other parameters: not ours to change
    assert str(root) in str(err.value)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(UserError):
        make_synthetic("aptos", foreign)
    assert (foreign / "keep.txt").read_text() == "x"


def test_fast(tmp_path):
    start = time.perf_counter()
    make_synthetic("pacemaker", tmp_path / "pm", classes=10, per_class=30)
    assert time.perf_counter() - start < 10      # 300 images; ~1 s on a laptop core


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError):
        make_synthetic("mnist", tmp_path / "x")
    with pytest.raises(UserError):
        make_synthetic("aptos", tmp_path / "x", classes=6)
