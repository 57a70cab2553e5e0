"""From found rows to a Dataset (common/data/build.py): broken files skipped and counted, one row per
image (two labels refused, exact repeats kept once), identical files within a split."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from common.data.registry import load_dataset
from common.errors import UserError
from datatrees import (
    class_tree,
    litter,
    one_line_error,
    png,
)


def test_broken_files_are_skipped_and_reported(tmp_path, caplog):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 8, "STJ - Assurity": 8}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")
    cls = root / "Train" / "MDT - Adapta"
    for name, fmt in (("cut.png", "PNG"), ("cut.jpg", "JPEG")):
        path = png(cls / name, fmt)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (cls / "empty.png").write_bytes(b"")
    shutil.copy(cls / "000.png", cls / "._000.png")
    # ignored silently: litter; named as not used (not skipped): other files
    for litter in (".DS_Store", "Thumbs.db", "desktop.ini", ".hidden.png", "notes.txt", "meta.csv"):
        (cls / litter).write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("pacemaker", root)
    reasons = {Path(p).name: r for p, r in ds.skipped}
    cut = "truncated (incomplete download: download it again)"
    assert reasons == {"cut.png": cut, "cut.jpg": cut, "empty.png": "empty file",
                       "._000.png": "AppleDouble metadata file"}
    assert sorted(Path(p).name for p, _ in ds.unused) == ["meta.csv", "notes.txt"]
    assert len(ds.table) == 20
    warnings = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(warnings) == 1 and "skipped 4 file(s)" in warnings[0] and "cut.png" in warnings[0]
    with pytest.raises(UserError) as err:
        load_dataset("pacemaker", root, strict=True)
    assert "4 file(s)" in one_line_error(err)
