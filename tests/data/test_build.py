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


def _manifest(folder, rows) -> "Path":
    csv = folder / "m.csv"
    csv.write_text("path,label,split\n" + "".join(f"{p},{label},{split}\n" for p, label, split in rows))
    return csv


def _images(folder, n: int = 12) -> list[str]:
    return [png(folder / f"{i:02d}.png").name for i in range(n)]


def _base_rows(names: list[str]) -> list[tuple[str, str, str]]:
    """Two classes, train/val/test given, every class in every split."""
    splits = ["train"] * 4 + ["val", "test"]
    return [(name, "AB"[i % 2], splits[i // 2]) for i, name in enumerate(names)]


def test_one_image_under_two_labels_is_refused_naming_it(tmp_path):
    names = _images(tmp_path)
    rows = _base_rows(names) + [(names[0], "B", "train")]       # names[0] is A in train
    with pytest.raises(UserError) as err:
        load_dataset("manifest", manifest=_manifest(tmp_path, rows))
    message = one_line_error(err)
    assert "1 image(s) are listed under two labels" in message and "00.png" in message
    assert "'A' in train" in message and "'B' in train" in message and "keep one row per image" in message


def test_one_image_in_two_splits_is_kept_in_the_first_with_a_warning(tmp_path, caplog):
    names = _images(tmp_path)
    rows = _base_rows(names) + [(names[0], "A", "test")]
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("manifest", manifest=_manifest(tmp_path, rows))
    assert list(ds.table.loc[ds.table["path"].str.endswith("00.png"), "split"]) == ["train"]
    assert len(ds.table) == 12
    assert any("1 image(s) are listed in two splits (a leak)" in r.message and "00.png" in r.message
               for r in caplog.records)


def test_exact_repeats_are_kept_once_and_told_apart(tmp_path, caplog):
    names = _images(tmp_path)
    rows = _base_rows(names) + [_base_rows(names)[3]]
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("manifest", manifest=_manifest(tmp_path, rows))
    assert len(ds.table) == 12
    messages = [r.message for r in caplog.records if "03.png" in r.message]
    assert len(messages) == 1 and "same label and split (exact duplicates)" in messages[0]


def test_identical_files_within_a_split_conflict_or_repeat(tmp_path, caplog):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 6, "STJ - Assurity": 6}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Val")      # every split official:
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")     # the copies stay in train
    train = root / "Train"
    shutil.copy(train / "MDT - Adapta" / "001.png", train / "STJ - Assurity" / "copy_of_adapta.png")   # two labels
    shutil.copy(train / "STJ - Assurity" / "002.png", train / "STJ - Assurity" / "again.png")          # same label
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("pacemaker", root)
    assert ds.leaks == [] and len(ds.table) == 22
    conflict = [r.message for r in caplog.records if "label conflict" in r.message]
    repeat = [r.message for r in caplog.records if "exact duplicates: each weighs twice" in r.message]
    assert len(conflict) == 1 and "copy_of_adapta.png ('STJ - Assurity')" in conflict[0]
    assert "001.png ('MDT - Adapta')" in conflict[0]
    assert len(repeat) == 1 and "again.png" in repeat[0] and "copy_of_adapta" not in repeat[0]
