"""Folder trees (common/data/folders.py): wrapper folders, split folders, symlinked folders, file names
that repeat their image folder."""

from __future__ import annotations

from common.data.registry import SPLITS, load_dataset
from datatrees import class_tree


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
