"""The shared shapes and text helpers (common/data/dataset.py): any file name the OS allows survives into
splits.csv and prints on one line; messages show paths relative to the root."""

from __future__ import annotations

import logging
import os

import pandas as pd
import pytest

from common.data.registry import check_data_report, load_dataset, write_splits
from datatrees import class_tree, png, raw_png


def test_any_file_name_survives_into_splits_csv_and_the_report(tmp_path, caplog):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 8, "STJ - Assurity": 8}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")
    folder = os.fsencode(root / "Train" / "MDT - Adapta")
    odd = folder + b"/caf\xe9 \xff.png"                  # not valid UTF-8
    cut = folder + b"/cut \xe9.png"
    try:
        raw_png(odd)
        raw_png(cut)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    with open(cut, "r+b") as fh:
        fh.truncate(30)
    unicode = png(root / "Train" / "STJ - Assurity" / "café ü 日本, \"quoted\".png")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("pacemaker", root)
    assert os.fsdecode(odd) in set(ds.table["path"]) and str(unicode) in set(ds.table["path"])

    out = tmp_path / "out" / "splits.csv"
    write_splits(ds, out)
    raw = out.read_bytes()
    assert b"caf\xe9 \xff.png" in raw and "café ü 日本".encode() in raw
    back = pd.read_csv(out, encoding="utf-8", encoding_errors="surrogateescape")
    assert list(back["path"]) == list(ds.table["path"])
    assert all(os.path.isfile(os.fsencode(p)) for p in back["path"])    # byte-exact names

    # Messages and the report are printable: the odd bytes shown as \xNN, nothing raises.
    report = check_data_report(ds)
    report.encode("utf-8")
    assert "Train/MDT - Adapta/cut \\xe9.png" in report
    skipped = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(skipped) == 1 and "cut \\xe9.png" in skipped[0]
    assert ds.display(os.fsdecode(odd)) == "Train/MDT - Adapta/caf\\xe9 \\xff.png"


def test_display_is_relative_to_the_root(tmp_path, caplog):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 8, "STJ - Assurity": 8}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")
    for cls in ("MDT - Adapta", "STJ - Assurity"):       # the same base name in both classes
        (root / "Train" / cls / "002.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("pacemaker", root)
    message = next(r.message for r in caplog.records if "skipped" in r.message)
    assert "Train/MDT - Adapta/002.png" in message and "Train/STJ - Assurity/002.png" in message
    assert str(root) not in message
    assert ds.display(root / "Test" / "MDT - Adapta" / "000.png") == "Test/MDT - Adapta/000.png"
    outside = tmp_path / "elsewhere.png"
    assert ds.display(outside) == str(outside)
