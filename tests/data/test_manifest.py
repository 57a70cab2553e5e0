"""Label CSVs (common/data/manifest.py): the path,label[,split][,mask] manifest, its errors, names that are
not UTF-8, encodings and separators, object masks."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.registry import check_data_report, load_dataset, write_splits
from common.demo.synthetic import make_synthetic
from common.errors import UserError
from datatrees import one_line_error, png, raw_png


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


def test_names_that_are_not_utf8_inside_a_csv(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = [f"a{i}.png".encode() for i in range(6)] + [b"b\xe9%d.png" % i for i in range(6)]
    try:
        for name in names:
            raw_png(os.fsencode(folder) + b"/" + name)
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


def test_image_path_and_manifest_together_is_an_error(tmp_path):
    data = make_synthetic("pacemaker", tmp_path / "pm", per_class=5, image_size=16)
    csv = _manifest(tmp_path, [("x.png", "A")], header="path,label")
    with pytest.raises(UserError) as err:
        load_dataset("pacemaker", data, manifest=csv)
    msg = one_line_error(err)
    assert "--image_path" in msg and "--manifest" in msg and "one of them" in msg


def _two_class_rows(folder: Path) -> list[str]:
    return [f"{png(folder / f'{c}{i}.png').name},{label}" for c, label in (("a", "Hüfte"), ("b", "Knie"))
            for i in range(6)]


@pytest.mark.parametrize("encoding, bom", [("utf-16", b""), ("utf-16-le", b""), ("utf-8", b"\xef\xbb\xbf"),
                                           ("utf-16-be", b"\xfe\xff")])
def test_csv_in_utf16_or_with_a_bom_is_read_right(tmp_path, encoding, bom):
    text = "path,label\n" + "\n".join(_two_class_rows(tmp_path)) + "\n"
    csv = tmp_path / "m.csv"
    csv.write_bytes(bom + text.encode(encoding))
    ds = load_dataset("manifest", manifest=csv)
    assert ds.class_names == ["Hüfte", "Knie"] and len(ds.table) == 12


@pytest.mark.parametrize("sep", [";", "\t"])
def test_csv_separated_by_semicolons_or_tabs_is_read(tmp_path, sep):
    lines = ["path,label"] + _two_class_rows(tmp_path)
    (tmp_path / "m.csv").write_text("\n".join(line.replace(",", sep) for line in lines) + "\n")
    assert load_dataset("manifest", manifest=tmp_path / "m.csv").class_names == ["Hüfte", "Knie"]


def test_latin1_labels_are_refused_with_save_as_utf8(tmp_path):
    text = "path,label\n" + "\n".join(_two_class_rows(tmp_path)) + "\n"
    (tmp_path / "m.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError) as err:
        load_dataset("manifest", manifest=tmp_path / "m.csv")
    message = one_line_error(err)
    assert "m.csv is not UTF-8 text" in message and "label on line(s) 2" in message
    assert "H\\xfcfte" in message and "save it as UTF-8" in message


def test_latin1_column_names_are_refused_with_save_as_utf8(tmp_path):
    rows = [row.replace("Hüfte", "Hip") for row in _two_class_rows(tmp_path)]
    text = "path,label,größe\n" + "\n".join(r + ",1" for r in rows) + "\n"
    (tmp_path / "m.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError) as err:
        load_dataset("manifest", manifest=tmp_path / "m.csv")
    assert "not UTF-8 text (column names" in one_line_error(err) and "save it as UTF-8" in one_line_error(err)


def test_a_last_line_cut_short_is_called_a_truncated_download(tmp_path):
    rows = _two_class_rows(tmp_path)
    cut = rows[-1].split(",")[0] + ","                      # the download stopped after the comma
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows[:-1] + [cut]))
    with pytest.raises(UserError) as err:
        load_dataset("manifest", manifest=tmp_path / "m.csv")
    message = one_line_error(err)
    assert "line 13, the last, is cut short" in message and "download it again" in message
    # the same empty label with a final line break is an empty label, as before
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows[:-1] + [cut]) + "\n")
    with pytest.raises(UserError) as err:
        load_dataset("manifest", manifest=tmp_path / "m.csv")
    assert "empty label on line(s) 13" in one_line_error(err)


def test_a_manifest_written_on_windows_names_files_with_backslashes(tmp_path):
    rows = [f"imgs\\{png(tmp_path / 'imgs' / f'{c}{i}.png').name},{c}" for c in "ab" for i in range(6)]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    ds = load_dataset("manifest", manifest=tmp_path / "m.csv")
    assert sorted(ds.table["path"]) == sorted(str(tmp_path / "imgs" / f"{c}{i}.png") for c in "ab" for i in range(6))


# ---------------------------------------------------------------- the mask column


def _mask_png(path: Path, size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], 255, np.uint8)).save(path)
    return path


def _masked_rows(tmp_path: Path, mask_of=lambda label, i: f"masks/{label}_{i}.png" if i % 2 else ""):
    rows = []
    for label in ("a", "b"):
        for i, split in enumerate(["train"] * 4 + ["val", "test", "test"]):
            image = png(tmp_path / "img" / f"{label}_{i}.png").relative_to(tmp_path)
            mask = mask_of(label, i)
            if mask:
                _mask_png(tmp_path / mask)
            rows.append((image, label, split, mask))
    return rows


def test_mask_column_attaches_masks_by_image(tmp_path):
    """Masks resolve like the images (relative to the CSV's folder); empty cells: no mask."""
    rows = _masked_rows(tmp_path)
    ds = load_dataset("manifest", None, manifest=_manifest(tmp_path, rows, header="path,label,split,Mask"))
    expected = {str((tmp_path / image).resolve()): str((tmp_path / mask).resolve())
                for image, _, _, mask in rows if mask}
    assert ds.masks == expected and len(expected) == 6
    assert "object masks for 6 image(s)" in ds.layout and "mask" in ds.layout
    assert "Object masks: 6 image(s), 2 of them in test" in check_data_report(ds)


def test_manifest_without_mask_column_has_no_masks(tmp_path):
    rows = [r[:3] for r in _masked_rows(tmp_path)]
    assert load_dataset("manifest", None, manifest=_manifest(tmp_path, rows)).masks == {}


@pytest.mark.parametrize("problem, message", [
    ("wrong size", r"mask .*masks/a_1\.png is 15x16 px but its image .*img/a_1\.png is 16x16; give a binary mask"),
    ("unreadable", r"mask .*masks/a_1\.png cannot be read .*; give a binary mask image"),
    ("missing", r"mask .*masks/a_1\.png \(of image .*img/a_1\.png\) not found; fix the mask column"),
])
def test_a_bad_mask_is_a_one_line_error_naming_it(tmp_path, problem, message):
    rows = _masked_rows(tmp_path)
    bad = tmp_path / "masks" / "a_1.png"
    if problem == "wrong size":
        _mask_png(bad, size=(15, 16))
    elif problem == "unreadable":
        bad.write_text("<html>not a mask</html>")
    else:
        bad.unlink()
    with pytest.raises(UserError) as excinfo:
        load_dataset("manifest", None, manifest=_manifest(tmp_path, rows, header="path,label,split,mask"))
    assert re.search(message, one_line_error(excinfo)), one_line_error(excinfo)
