"""Dataset loaders: splits, manifests, skipped files, leaks, errors, splits.csv, file names the OS
allows, the registry (issues #4 and #11).  Every layout with its mess: test_datasets_layouts.py."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.data.registry import (
    DATASET_NAMES,
    KINDS,
    ORTHONET_CLASSES,
    SPLITS,
    Dataset,
    check_data_report,
    load_dataset,
    manufacturer_of,
    write_splits,
)
from common.demo.synthetic import make_synthetic
from common.errors import UserError

_counter = iter(range(10**9))


def png(path: Path, fmt: str = "PNG") -> Path:
    """A small valid image with unique content (so no accidental leaks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = next(_counter)
    arr = np.random.default_rng(n).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path, format=fmt)
    return path


def class_tree(root: Path, sizes: dict[str, int], split_dir: str | None = None) -> Path:
    for cls, n in sizes.items():
        folder = root / split_dir / cls if split_dir else root / cls
        for i in range(n):
            png(folder / f"{i:03d}.png")
    return root


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------------------- pacemaker


def test_pacemaker_official_test_split_is_kept(tmp_path):
    root = make_synthetic("pacemaker", tmp_path / "pm", classes=4, per_class=12)
    ds = load_dataset("pacemaker", root)
    assert ds.name == "pacemaker" and "Train/" in ds.layout and "Test/" in ds.layout
    assert ds.class_names == sorted(p.name for p in (root / "Train").iterdir())
    assert list(ds.table.columns) == ["path", "label", "class_name", "split"]
    t = ds.table
    in_test = t["path"].str.contains(f"{os.sep}Test{os.sep}")
    assert (t.loc[in_test, "split"] == "test").all()          # nothing left Test
    assert (t.loc[~in_test, "split"] != "test").all()         # nothing joined Test
    assert len(t) == 4 * 12 and set(t["split"]) == set(SPLITS)
    # labels follow class_names; class_name matches the folder
    for path, label, cls in zip(t["path"], t["label"], t["class_name"]):
        assert Path(path).parent.name == cls == ds.class_names[label]
    # val is carved from Train, about val_fraction of the whole
    assert (t["split"] == "val").sum() == round(0.15 * len(t))
    counts = ds.counts()
    assert list(counts.columns) == list(SPLITS) and (counts > 0).all().all()


def test_pacemaker_any_case_split_folders_and_val_folder(tmp_path):
    root = tmp_path / "pm"
    class_tree(root, {"MDT - Adapta": 3, "BOS - Accolade": 3}, "TRAIN")
    class_tree(root, {"MDT - Adapta": 2, "BOS - Accolade": 2}, "Valid")
    class_tree(root, {"MDT - Adapta": 2, "BOS - Accolade": 2}, "test")
    ds = load_dataset("pacemaker", root)
    assert "official split" in ds.layout and "carved" not in ds.layout
    expected = {"TRAIN": "train", "Valid": "val", "test": "test"}
    for path, split in zip(ds.table["path"], ds.table["split"]):
        assert expected[Path(path).parent.parent.name] == split
    assert ds.counts().loc["MDT - Adapta"].tolist() == [3, 2, 2]


def test_pacemaker_plain_class_folders_are_split_70_15_15(tmp_path):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 20, "MDT - Advisa": 20, "STJ - Assurity": 20})
    ds = load_dataset("pacemaker", root)
    assert "no split folders" in ds.layout
    sizes = ds.table["split"].value_counts()
    assert (sizes["train"], sizes["val"], sizes["test"]) == (42, 9, 9)
    assert (ds.counts() > 0).all().all()


def test_manufacturer_of():
    assert manufacturer_of("MDT - Adapta") == "MDT"
    assert manufacturer_of("STJ - Assurity MRI - v2") == "STJ"
    assert manufacturer_of("Unbranded") == "Unbranded"


# ---------------------------------------------------------------------------- splits


def test_stratified_split_is_seeded_and_has_every_class_everywhere(tmp_path):
    root = class_tree(tmp_path / "pm", {"A - a": 7, "A - b": 8, "B - c": 25, "C - d": 7})
    a = load_dataset("pacemaker", root, seed=3).table
    b = load_dataset("pacemaker", root, seed=3).table
    c = load_dataset("pacemaker", root, seed=4).table
    pd.testing.assert_frame_equal(a, b)
    assert not a.set_index("path")["split"].equals(c.set_index("path")["split"].loc[a["path"]])
    for table in (a, c):
        present = pd.crosstab(table["class_name"], table["split"])
        assert present.shape == (4, 3) and (present > 0).all().all()


def test_every_class_in_every_split_for_many_seeds(tmp_path):
    root = class_tree(tmp_path / "pm", {f"M{i} - x": 7 + 3 * i for i in range(6)})
    for seed in range(15):
        ds = load_dataset("pacemaker", root, seed=seed)
        assert (ds.counts() > 0).all().all(), seed


def test_class_too_small_to_split_is_named(tmp_path):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 10, "BIO - Evia": 2})
    with pytest.raises(UserError) as err:
        load_dataset("pacemaker", root)
    msg = one_line_error(err)
    assert "BIO - Evia" in msg and "2 image" in msg and "manifest" in msg


def test_class_too_small_for_val_carving_from_train(tmp_path):
    root = tmp_path / "pm"
    class_tree(root, {"MDT - Adapta": 10, "BIO - Evia": 1}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "BIO - Evia": 2}, "Test")
    with pytest.raises(UserError) as err:
        load_dataset("pacemaker", root)
    assert "BIO - Evia" in one_line_error(err)


# ---------------------------------------------------------------------------- orthonet


def test_orthonet_flat_files_and_unknown_prefixes(tmp_path, caplog):
    root = make_synthetic("orthonet", tmp_path / "on", classes=4, per_class=10, layout="flat")
    png(root / "99_stray.png")
    png(root / "x1_stray.png")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("orthonet", root)
    assert "flat" in ds.layout
    codes = sorted({Path(p).name[:2] for p in ds.table["path"]})
    assert ds.class_names == [ORTHONET_CLASSES[c] for c in codes]
    for path, cls in zip(ds.table["path"], ds.table["class_name"]):
        assert ORTHONET_CLASSES[Path(path).name[:2]] == cls
    assert len(ds.table) == 40
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["99_stray.png", "x1_stray.png"]
    assert any("2 file(s)" in r.message and "99_stray.png" in r.message for r in caplog.records)


def test_orthonet_classes_table_has_the_twelve_codes():
    assert sorted(ORTHONET_CLASSES) == [f"{i:02d}" for i in (*range(1, 9), *range(21, 25))]
    assert ORTHONET_CLASSES["01"] == "Hip_DepuySynthes_Corail_Collar"
    assert ORTHONET_CLASSES["24"] == "Knee_ZimmerBiomet_Oxford"


def test_orthonet_class_folders_by_code_and_by_name(tmp_path):
    root = class_tree(tmp_path / "codes", {"01": 8, "21": 8})
    ds = load_dataset("orthonet", root)
    assert ds.class_names == [ORTHONET_CLASSES["01"], ORTHONET_CLASSES["21"]]
    assert "class-per-folder" in ds.layout

    root = class_tree(tmp_path / "names", {ORTHONET_CLASSES["05"]: 8, ORTHONET_CLASSES["23"]: 8})
    assert load_dataset("orthonet", root).class_names == [ORTHONET_CLASSES["05"], ORTHONET_CLASSES["23"]]

    root = class_tree(tmp_path / "bad", {"01": 8, "Mystery_Stem": 8})
    with pytest.raises(UserError) as err:
        load_dataset("orthonet", root)
    assert "Mystery_Stem" in one_line_error(err)


def test_orthonet_csv_in_folder(tmp_path):
    root = tmp_path / "on"
    rows = []
    for code in ("02", "22"):
        for i in range(8):
            png(root / "imgs" / f"img_{code}_{i}.png")
            rows.append((f"imgs/img_{code}_{i}.png", int(code)))
    pd.DataFrame(rows, columns=["Filename", "Label"]).to_csv(root / "labels.csv", index=False)
    ds = load_dataset("orthonet", root)
    assert "labels.csv" in ds.layout
    assert ds.class_names == [ORTHONET_CLASSES["02"], ORTHONET_CLASSES["22"]]
    assert (ds.table["class_name"] == [ORTHONET_CLASSES[Path(p).stem.split("_")[1]]
                                       for p in ds.table["path"]]).all()


# ---------------------------------------------------------------------------- aptos


def test_aptos_competition_layout_and_missing_rows(tmp_path, caplog):
    root = make_synthetic("aptos", tmp_path / "ap", per_class=10, layout="competition")
    train = pd.read_csv(root / "train.csv", dtype=str)
    gone = train["id_code"].iloc[:2].tolist()
    for ident in gone:
        (root / "train_images" / f"{ident}.png").unlink()
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("aptos", root)
    assert ds.class_names == ["0 - No DR", "1 - Mild", "2 - Moderate", "3 - Severe",
                              "4 - Proliferative DR"]
    assert len(ds.table) == len(train) - 2
    diagnosis = dict(zip(train["id_code"], train["diagnosis"].astype(int)))
    assert all(diagnosis[Path(p).stem] == label for p, label in zip(ds.table["path"], ds.table["label"]))
    assert not ds.table["path"].str.contains("test_images").any()   # test.csv ignored
    assert sum(gone[0] in p for p, _ in ds.skipped) == 1
    msgs = [r.message for r in caplog.records if "train.csv" in r.message]
    assert len(msgs) == 1 and "2 train.csv row(s)" in msgs[0] and gone[0] in msgs[0]


@pytest.mark.parametrize("remove", ["train.csv", "train_images"])
def test_aptos_missing_item_names_it(tmp_path, remove):
    root = make_synthetic("aptos", tmp_path / "ap", per_class=4, layout="competition")
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError) as err:
        load_dataset("aptos", root)
    msg = one_line_error(err)
    assert str(root) in msg and "train.csv" in msg and "train_images" in msg


# ---------------------------------------------------------------------------- manifests


def _manifest(tmp_path: Path, rows, header="path,label,split", name="m.csv") -> Path:
    csv = tmp_path / name
    csv.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return csv


def test_generic_manifest_with_splits_and_relative_paths(tmp_path):
    rows = []
    for label in (2, 10):
        for i, split in enumerate(["train"] * 4 + ["valid", "validation", "test", "TEST"]):
            rows.append((png(tmp_path / "img" / f"{label}_{i}.png").relative_to(tmp_path), label, split))
    ds = load_dataset("manifest", None, manifest=_manifest(tmp_path, rows))
    assert ds.class_names == ["2", "10"]                       # integer labels: numeric order
    assert ds.table.groupby("split").size().to_dict() == {"train": 8, "val": 4, "test": 4}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in ds.table["path"])
    assert "official split" in ds.layout


def test_manifest_paths_resolve_against_its_folder(tmp_path, monkeypatch):
    data = tmp_path / "lists"
    rows = [(f"../img/a{i}.png", "A - x") for i in range(7)] + [(f"../img/b{i}.png", "B - y") for i in range(7)]
    for p, _ in rows:
        png(data / p)
    _manifest(data, rows, header="path,label")
    monkeypatch.chdir(tmp_path)                     # not the CSV's folder
    ds = load_dataset("pacemaker", manifest=Path("lists") / "m.csv")
    assert ds.name == "pacemaker" and ds.root == data
    assert sorted(ds.table["path"]) == sorted(str((data / p).resolve()) for p, _ in rows)
    assert (ds.counts() > 0).all().all()
    assert "m.csv" in ds.layout


def test_image_path_and_manifest_together_is_an_error(tmp_path):
    data = make_synthetic("pacemaker", tmp_path / "pm", per_class=5, image_size=16)
    csv = _manifest(tmp_path, [("x.png", "A")], header="path,label")
    with pytest.raises(UserError) as err:
        load_dataset("pacemaker", data, manifest=csv)
    msg = one_line_error(err)
    assert "--image_path" in msg and "--manifest" in msg and "one of them" in msg


def test_manifest_aptos_grades_map_to_class_names(tmp_path):
    rows = [(png(tmp_path / f"g{g}_{i}.png").name, g) for g in range(5) for i in range(7)]
    ds = load_dataset("aptos", None, manifest=_manifest(tmp_path, rows, header="path,label"))
    assert ds.class_names[0] == "0 - No DR" and len(ds.class_names) == 5
    assert all(Path(p).name[1] == str(label) for p, label in zip(ds.table["path"], ds.table["label"]))


@pytest.mark.parametrize("name,bad", [("orthonet", "09"), ("aptos", "7")])
def test_manifest_unknown_labels(tmp_path, name, bad):
    rows = [(png(tmp_path / f"{i}.png").name, "01" if name == "orthonet" else 1) for i in range(4)]
    rows.append((png(tmp_path / "odd.png").name, bad))
    with pytest.raises(UserError) as err:
        load_dataset(name, None, manifest=_manifest(tmp_path, rows, header="path,label"))
    assert repr(bad) in one_line_error(err)


def test_manifest_errors(tmp_path):
    good = png(tmp_path / "a.png").name
    cases = {
        "split": _manifest(tmp_path, [(good, "x", "holdout")]),
        "missing": _manifest(tmp_path, [("nowhere.png", "x", "train")], name="m2.csv"),
    }
    with pytest.raises(UserError) as err:
        load_dataset("manifest", None, manifest=cases["split"])
    assert "'holdout'" in one_line_error(err)
    with pytest.raises(UserError) as err:
        load_dataset("manifest", None, manifest=cases["missing"])
    assert "nowhere.png" in one_line_error(err)
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    with pytest.raises(UserError) as err:
        load_dataset("manifest", None, manifest=empty)
    assert str(empty) in one_line_error(err)
    with pytest.raises(UserError) as err:
        load_dataset("manifest", None, manifest=tmp_path / "absent.csv")
    assert "absent.csv" in one_line_error(err)


# ---------------------------------------------------------------------------- bad input


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


def test_broken_files_are_skipped_and_reported(tmp_path, caplog):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 8, "STJ - Assurity": 8}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")
    cls = root / "Train" / "MDT - Adapta"
    for name, fmt in (("cut.png", "PNG"), ("cut.jpg", "JPEG")):
        path = png(cls / name, fmt)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (cls / "empty.png").write_bytes(b"")
    shutil.copy(cls / "000.png", cls / "._000.png")
    # ignored silently: litter and non-image files
    for litter in (".DS_Store", "Thumbs.db", "desktop.ini", ".hidden.png", "notes.txt", "meta.csv"):
        (cls / litter).write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("pacemaker", root)
    reasons = {Path(p).name: r for p, r in ds.skipped}
    assert reasons == {"cut.png": "truncated", "cut.jpg": "truncated", "empty.png": "empty file",
                       "._000.png": "AppleDouble metadata file"}
    assert len(ds.table) == 20
    warnings = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(warnings) == 1 and "skipped 4 file(s)" in warnings[0] and "cut.png" in warnings[0]
    with pytest.raises(UserError) as err:
        load_dataset("pacemaker", root, strict=True)
    assert "4 file(s)" in one_line_error(err)


# ---------------------------------------------------------------------------- outputs


def test_write_splits_and_leaks(tmp_path, caplog):
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

    out = tmp_path / "run" / "splits.csv"
    write_splits(ds, out)
    written = pd.read_csv(out)
    assert list(written.columns) == ["path", "label", "class_name", "split"]
    assert set(written["split"]) <= set(SPLITS)
    pd.testing.assert_frame_equal(written, ds.table, check_dtype=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["splits.csv"]   # no temp file left


def test_no_leaks_for_distinct_files(tmp_path):
    ds = load_dataset("pacemaker", make_synthetic("pacemaker", tmp_path / "pm"))
    assert ds.leaks == []


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


# ---------------------------------------------------------------------------- file names, display


def _raw_png(path: bytes) -> None:
    """A PNG at a bytes path (a name that need not be valid UTF-8)."""
    arr = np.random.default_rng(next(_counter)).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with open(path, "wb") as fh:
        Image.fromarray(arr, "RGB").save(fh, format="PNG")


def test_any_file_name_survives_into_splits_csv_and_the_report(tmp_path, caplog):
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 8, "STJ - Assurity": 8}, "Train")
    class_tree(root, {"MDT - Adapta": 2, "STJ - Assurity": 2}, "Test")
    folder = os.fsencode(root / "Train" / "MDT - Adapta")
    odd = folder + b"/caf\xe9 \xff.png"                  # not valid UTF-8
    cut = folder + b"/cut \xe9.png"
    try:
        _raw_png(odd)
        _raw_png(cut)
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


def test_names_that_are_not_utf8_inside_a_csv(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = [f"a{i}.png".encode() for i in range(6)] + [b"b\xe9%d.png" % i for i in range(6)]
    try:
        for name in names:
            _raw_png(os.fsencode(folder) + b"/" + name)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    lines = [b"path,label"] + [b"imgs/" + n + (b",A" if n.startswith(b"a") else b",B") for n in names]
    csv = tmp_path / "m.csv"
    csv.write_bytes(b"\n".join(lines) + b"\n")
    ds = load_dataset("manifest", manifest=csv)
    assert sorted(os.fsencode(p) for p in ds.table["path"]) == sorted(os.fsencode(folder) + b"/" + n for n in names)
    out = tmp_path / "splits.csv"
    write_splits(ds, out)
    assert all(os.fsencode(folder) + b"/" + n in out.read_bytes() for n in names)


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


# ---------------------------------------------------------------------------- wrappers, registry


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


def test_registry_finds_every_dataset_module():
    assert set(KINDS) == {"pacemaker", "orthonet", "aptos"}
    assert DATASET_NAMES == (*KINDS, "manifest")
    for name, kind in KINDS.items():
        assert kind.name == name and kind.expected and kind.synthetic is not None
        assert kind.synthetic.layouts and kind.synthetic.default_classes >= 2
    with pytest.raises(UserError) as err:
        load_dataset("mnist", "x")
    assert "pacemaker" in one_line_error(err)


def test_report_names_course_order_and_particulars(tmp_path):
    ds = load_dataset("aptos", make_synthetic("aptos", tmp_path / "ap", per_class=5, image_size=16))
    report = check_data_report(ds)
    assert "three-way" in report and "the same as ours" in report
    assert "Manufacturers" not in report
