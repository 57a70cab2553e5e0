"""The registry (common/data/registry.py): load_dataset's argument checks, the dataset modules it finds,
splits.csv, the --check_data report, and that nothing under the input is modified."""

from __future__ import annotations

import pandas as pd
import pytest

from common.data.registry import (
    DATASET_NAMES,
    KINDS,
    SPLITS,
    Dataset,
    check_data_report,
    load_dataset,
    write_splits,
)
from common.demo.synthetic import make_synthetic
from common.errors import UserError
from datatrees import class_tree, listing, one_line_error


def test_registry_finds_every_dataset_module():
    assert set(KINDS) == {"pacemaker", "orthonet", "aptos"}
    assert DATASET_NAMES == (*KINDS, "manifest")
    for name, kind in KINDS.items():
        assert kind.name == name and kind.expected and kind.synthetic is not None
        assert kind.synthetic.layouts and kind.synthetic.default_classes >= 2
    with pytest.raises(UserError) as err:
        load_dataset("mnist", "x")
    assert "pacemaker" in one_line_error(err)


def test_missing_and_empty_paths(tmp_path):
    for name in ("pacemaker", "orthonet", "aptos"):
        with pytest.raises(UserError) as err:
            load_dataset(name, tmp_path / "nope")
        assert str(tmp_path / "nope") in one_line_error(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")     # litter does not make a folder non-empty
    for name in ("pacemaker", "orthonet"):
        with pytest.raises(UserError) as err:
            load_dataset(name, empty)
        msg = one_line_error(err)
        assert str(empty) in msg and "expected" in msg


def test_folder_without_images(tmp_path):
    root = tmp_path / "pm"
    (root / "Train" / "MDT - Adapta").mkdir(parents=True)
    (root / "Train" / "MDT - Adapta" / "readme.txt").write_text("hi")
    with pytest.raises(UserError) as err:
        load_dataset("pacemaker", root)
    assert "no images found" in one_line_error(err)


def test_check_data_report(tmp_path):
    root = make_synthetic("pacemaker", tmp_path / "pm")
    (root / "Train" / "MDT - Adapta" / "._0005.png").write_bytes(b"\x00\x05\x16\x07")
    ds = load_dataset("pacemaker", root)
    report = check_data_report(ds)
    assert "pacemaker" in report and ds.layout in report and str(root) in report
    for cls in ds.class_names:
        assert cls in report
    assert "Skipped files: 1" in report and "._0005.png" in report
    assert "Manufacturers" in report and "MDT" in report
    assert isinstance(ds, Dataset)


def test_report_names_course_order_and_particulars(tmp_path):
    ds = load_dataset("aptos", make_synthetic("aptos", tmp_path / "ap", per_class=5, image_size=16))
    report = check_data_report(ds)
    assert "three-way" in report and "the same as ours" in report
    assert "Manufacturers" not in report


def test_nothing_under_the_input_is_modified(tmp_path):
    root = make_synthetic("pacemaker", tmp_path / "pm")
    (root / "Train" / "MDT - Adapta" / "._x.png").write_bytes(b"")
    before = listing(root)
    ds = load_dataset("pacemaker", root)
    check_data_report(ds)
    write_splits(ds, tmp_path / "out" / "splits.csv")
    assert listing(root) == before
    for name, spec in ((n, k.synthetic) for n, k in KINDS.items()):
        for layout in spec.layouts:
            data = make_synthetic(name, tmp_path / f"{name}-{layout}", per_class=5, image_size=16, layout=layout)
            before = listing(data)
            load_dataset(name, data)
            assert listing(data) == before, (name, layout)


def test_write_splits(tmp_path):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 8, "STJ - Assurity": 8}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")
    ds = load_dataset("pacemaker", root)
    out = tmp_path / "run" / "splits.csv"
    write_splits(ds, out)
    written = pd.read_csv(out)
    assert list(written.columns) == ["path", "label", "class_name", "split"]
    assert set(written["split"]) <= set(SPLITS)
    pd.testing.assert_frame_equal(written, ds.table, check_dtype=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["splits.csv"]   # no temp file left
