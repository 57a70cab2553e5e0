"""Folder trees (common/data/folders.py): wrapper folders, split folders, symlinked folders, file names
that repeat their image folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.data.folders import strip_folder_prefix, walk, walk_images
from common.data.registry import SPLITS, load_dataset
from datatrees import class_tree, png


def test_a_lone_split_folder_is_not_a_wrapper(tmp_path):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 10, "STJ - Assurity": 10}, "Train")
    (root / ".DS_Store").write_bytes(b"x")
    ds = load_dataset("pacemaker", root)
    assert ds.root == root and "Train/" in ds.layout and "test and val carved" in ds.layout
    assert set(ds.table["split"]) == set(SPLITS)


def test_nested_wrappers_are_descended(tmp_path):
    inner = tmp_path / "a" / "b" / "pacemaker"
    class_tree(inner, {"MDT - Adapta": 6, "STJ - Assurity": 6}, "Train")
    class_tree(inner, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")
    (tmp_path / "a" / "._b").write_bytes(b"\x00\x05\x16\x07")     # AppleDouble of the folder
    ds = load_dataset("pacemaker", tmp_path / "a")
    assert ds.root == inner and "b/pacemaker/" in ds.layout


@pytest.mark.parametrize("name, expected", [
    ("x.png", "x.png"),
    ("train_images/x.png", "x.png"),
    ("train_images/train_images/x.png", "x.png"),
    ("Train_Images\\x.png", "x.png"),
    ("other/x.png", "other/x.png"),
    ("train_images/sub/x.png", "sub/x.png"),
])
def test_a_file_name_that_repeats_its_image_folder(name, expected):
    root = Path("/data")
    assert strip_folder_prefix(name, root / "train_images" / "train_images", root) == expected


def test_walk_follows_symlinked_folders_once(tmp_path):
    root = tmp_path / "root"
    png(root / "a" / "1.png")
    png(tmp_path / "elsewhere" / "2.png")
    os.symlink(tmp_path / "elsewhere", root / "a" / "link")
    os.symlink(root, root / "a" / "loop")
    loops: list[Path] = []
    files = [f for _, _, fs in walk(root, loops) for f in fs]
    assert files == [root / "a" / "1.png", root / "a" / "link" / "2.png"]
    assert loops == [root / "a" / "loop"]
    assert walk_images(root / "a") == [root / "a" / "1.png", root / "a" / "link" / "2.png"]


def test_an_image_path_at_the_train_folder_says_what_beside_it_is_not_read(tmp_path, caplog):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 8, "STJ - Assurity": 8}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")
    ds = load_dataset("pacemaker", root / "Train")
    assert len(ds.table) == 16 and "test and val carved from train" in ds.layout
    assert ds.warnings == [f"the image path is the Train/ split folder: Test/ beside it is not read and the splits "
                           f"are carved from it; pass {root} to keep the official split"]
