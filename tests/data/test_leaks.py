"""Identical files (common/data/leaks.py): across splits (a leak) and within one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from common.data.registry import load_dataset
from common.demo.synthetic import make_synthetic
from datatrees import class_tree


def test_no_leaks_for_distinct_files(tmp_path):
    ds = load_dataset("pacemaker", make_synthetic("pacemaker", tmp_path / "pm"))
    assert ds.leaks == []


def test_identical_file_in_train_and_test_is_a_leak(tmp_path, caplog):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 8, "STJ - Assurity": 8}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")
    leaked = root / "Test" / "STJ - Assurity" / "copy.png"
    shutil.copy(root / "Train" / "STJ - Assurity" / "003.png", leaked)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("pacemaker", root)
    assert len(ds.leaks) == 1
    a, sa, b, sb = ds.leaks[0]
    assert {Path(a).name, Path(b).name} == {"003.png", "copy.png"} and sa != sb and "test" in (sa, sb)
    assert any("leak" in r.message and "copy.png" in r.message for r in caplog.records)
