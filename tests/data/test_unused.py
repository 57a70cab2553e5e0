"""What a layout passes over (common/data/unused.py): every file and folder under the root that no
image or label CSV accounts for, named once with why - a folder in which nothing is used as one
entry, litter never."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from common.data.registry import check_data_report, load_dataset
from common.data.unused import unused_under
from datatrees import class_tree, litter, png, write_dicom


def test_unused_entries_and_their_reasons(tmp_path):
    root = tmp_path / "data"
    used = [png(root / "A" / "1.png"), png(root / "A" / "2.png"), png(root / "B" / "1.png")]
    (root / "A" / "notes.txt").write_text("x")
    (root / "A" / "more.zip").write_bytes(b"PK\x03\x04")
    (root / "Empty").mkdir()
    (root / "Docs").mkdir()
    (root / "Docs" / "a.docx").write_bytes(b"x")
    (root / "Docs" / "b.txt").write_bytes(b"x")
    (root / "Zipped").mkdir()
    (root / "Zipped" / "images.zip").write_bytes(b"PK")
    png(root / "Extra" / "x.png")
    write_dicom(root / "DICOMDIR", np.zeros((2, 2), np.uint8))
    litter(root / "A")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._1.png").write_bytes(b"x")
    entries = dict(unused_under(root, {str(p) for p in used}))
    sep = os.sep
    assert entries == {
        str(root / "A" / "notes.txt"): "not an image: .txt",
        str(root / "A" / "more.zip"): "an archive: unzip it to use the images inside",
        str(root / "Empty") + sep: "empty folder",
        str(root / "Docs") + sep: "2 file(s), no image: .docx, .txt",
        str(root / "Zipped") + sep: "holds images.zip: unzip it to use the images inside",
        str(root / "Extra") + sep: "1 file(s), 1 image(s) this layout does not read",
        str(root / "DICOMDIR"): "a DICOM index, not an image",
    }


def test_a_folder_accounted_for_is_not_unused(tmp_path):
    root = tmp_path / "data"
    png(root / "test_images" / "x.png")
    png(root / "train_images" / "y.png")
    assert unused_under(root, {str(root / "test_images"), str(root / "train_images" / "y.png")}) == []


def test_symlinked_folders_are_read_once_and_a_loop_is_named(tmp_path):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 6, "STJ - Assurity": 6})
    store = png(tmp_path / "store" / "extra.png").parent
    os.symlink(store, root / "MDT - Adapta" / "more")                 # a folder inside a class: read
    os.symlink(root / "MDT - Adapta", root / "MDT - Adapta" / "again")  # back to itself: a loop
    ds = load_dataset("pacemaker", root)
    assert str(root / "MDT - Adapta" / "more" / "extra.png") in set(ds.table["path"])
    assert len(ds.table) == 13
    assert [(Path(p).name, why) for p, why in ds.unused] == [("again", "a symlink to a folder read already (a loop): "
                                                                        "not read twice")]


def test_one_warning_names_and_counts_what_the_loader_passed_over(tmp_path, caplog):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 6, "STJ - Assurity": 6}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")
    (root / "Train" / "BOS - Empty").mkdir()
    (root / "Train" / "MDT - Adapta" / "labels.xlsx").write_bytes(b"PK")
    (root / "scans.zip").write_bytes(b"PK")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("pacemaker", root)
    warnings = [r.message for r in caplog.records if "not use" in r.message]
    assert len(warnings) == 1
    assert warnings[0].startswith("ignoring 1 folder(s) and 2 file(s) this layout does not use: ")
    for shown in ("Train/BOS - Empty/ (empty folder)", "Train/MDT - Adapta/labels.xlsx (not an image: .xlsx)",
                  "scans.zip (an archive: unzip it to use the images inside)"):
        assert shown in warnings[0]
    assert len(ds.unused) == 3 and "Not used (files and folders" in check_data_report(ds)
    assert "scans.zip: an archive" in check_data_report(ds)


def test_a_manifest_folder_is_not_scanned(tmp_path):
    folder = tmp_path / "anything"
    rows = [f"{png(folder / f'{c}{i}.png').name},{c}" for c in "ab" for i in range(6)]
    (folder / "unrelated.txt").write_text("x")
    (folder / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    assert load_dataset("manifest", manifest=folder / "m.csv").unused == []
