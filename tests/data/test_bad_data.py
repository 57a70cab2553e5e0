"""The bad-input matrix, third round, data layer: what users still trip over (the harness is
tests/badinput.py; every case asserts the exit code, one ``error:`` line naming the thing and what
to do or a warning with a count, no traceback, and the input tree byte-identical).

Classes: things quietly not used (folders and files the loader passes over, a setting without
effect in the layout found), one image under two labels, duplicates that disagree told apart
from exact ones, CSVs in other encodings and separators, file names that repeat their image
folder, truncated downloads, splits made impossible by the fractions, and DICOM files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import JPEGLSLossless

from badinput import (
    PACEMAKER_CLASSES,
    TRAIN_A,
    Case,
    Ctx,
    Result,
    _both,
    _count_rows,
    _offline,  # noqa: F401  (an autouse fixture, picked up by name)
    _pm,
    _splits_has,
    check_data,
    edit_csv,
    params,
    png_bytes,
    run_case,
    splits_table,
    trees,  # noqa: F401  (a fixture, picked up by name)
    write,
    write_png,
)
from datatrees import write_dicom


def _said_once(text: str):
    """``text`` appears in exactly one line of stderr (one warning, not one per file)."""
    def check(ctx: Ctx, result: Result) -> None:
        lines = [line for line in result.err.splitlines() if text in line]
        assert len(lines) == 1, f"{text!r} said {len(lines)} times:\n{result.err[-3000:]}"
    return check


def _silent(*texts: str):
    def check(ctx: Ctx, result: Result) -> None:
        for text in texts:
            assert text not in result.err, f"{text!r} should not be said:\n{result.err[-3000:]}"
    return check


# ---------------------------------------------------------------- things quietly not used

def nu_empty_class(ctx):
    root = _pm(ctx)
    (root / "Train" / "BOS - Accolade").mkdir()
    return check_data(root)


def nu_documents_folder(ctx):
    root = _pm(ctx)
    write(root / "Train" / "Protocols" / "acquisition.docx", b"PK\x03\x04")
    write(root / "Train" / "Protocols" / "notes.pdf", b"%PDF-1.4")
    return check_data(root)


def nu_zip_in_class(ctx):
    root = _pm(ctx)
    write(root / TRAIN_A / "more_adapta.zip", b"PK\x03\x04" + b"\x00" * 40)
    return check_data(root)


def nu_class_of_only_a_zip(ctx):
    root = _pm(ctx)
    write(root / "Train" / "BOS - Accolade" / "BOS - Accolade.zip", b"PK\x03\x04" + b"\x00" * 40)
    return check_data(root)


def nu_archive_beside_splits(ctx):
    root = _pm(ctx)
    write(root / "pacemaker_extra.tar.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 40)
    return check_data(root)


def nu_unsupported_types(ctx):
    root = _pm(ctx)
    write(root / TRAIN_A / "IMG_0001.HEIC", b"\x00\x00\x00\x18ftypheic")
    write(root / "Train" / "MDT - Advisa" / "scan.jp2", b"\x00\x00\x00\x0cjP  \r\n\x87\n")
    write(root / "Test" / "STJ - Assurity" / "labels.txt", b"STJ\n")
    return check_data(root)


def nu_symlinked_folder_in_class(ctx):
    root = _pm(ctx)
    for n in range(3):
        write_png(ctx.inp / "more adapta" / f"extra{n}.png")
    os.symlink(os.path.relpath(ctx.inp / "more adapta", root / TRAIN_A), root / TRAIN_A / "more")
    return check_data(root)


def nu_symlink_loop(ctx):
    root = _pm(ctx)
    os.symlink("..", root / TRAIN_A / "parent")
    return check_data(root)


def nu_aptos_unlisted_images(ctx):
    root = ctx.data("aptos_competition")
    write_png(root / "train_images" / "not_in_the_csv.png")
    return check_data(root)


def nu_train_folder_as_root(ctx):
    return check_data(_pm(ctx) / "Train")


UNUSED_CASES = [
    Case("pacemaker-empty-class-folder-named-in-one-warning-exit0", "pacemaker", nu_empty_class, 0,
         ("ignoring 1 folder(s)", "Train/BOS - Accolade/", "empty folder"), check=_count_rows(18)),
    Case("pacemaker-folder-of-documents-among-class-folders-named-with-what-it-holds-exit0", "pacemaker",
         nu_documents_folder, 0, ("ignoring 1 folder(s)", "Train/Protocols/", "no image: .docx, .pdf")),
    Case("pacemaker-zip-inside-a-class-folder-named-unzip-it-exit0", "pacemaker", nu_zip_in_class, 0,
         ("ignoring 1 file(s)", f"{TRAIN_A}/more_adapta.zip"), r"unzip it"),
    Case("pacemaker-class-folder-holding-only-a-zip-named-unzip-it-exit0", "pacemaker", nu_class_of_only_a_zip, 0,
         ("Train/BOS - Accolade/", "holds BOS - Accolade.zip"), r"unzip it"),
    Case("pacemaker-archive-beside-the-split-folders-named-exit0", "pacemaker", nu_archive_beside_splits, 0,
         ("pacemaker_extra.tar.gz",), r"an archive: unzip it"),
    Case("pacemaker-heic-jp2-txt-counted-and-named-in-one-warning-exit0", "pacemaker", nu_unsupported_types, 0,
         ("ignoring 3 file(s)", "IMG_0001.HEIC (not an image: .heic)", "scan.jp2", "labels.txt"),
         check=_both(_said_once("ignoring 3 file(s)"), _count_rows(18))),
    Case("pacemaker-symlinked-folder-inside-a-class-is-read-exit0", "pacemaker", nu_symlinked_folder_in_class, 0,
         check=_both(_count_rows(21), _splits_has(f"{TRAIN_A}/more/extra0.png"), _silent("ignoring"))),
    Case("pacemaker-symlink-loop-inside-a-class-named-not-read-twice-exit0", "pacemaker", nu_symlink_loop, 0,
         (f"{TRAIN_A}/parent/", "a loop"), r"not read twice", check=_count_rows(18)),
    Case("aptos-image-in-train-images-no-csv-lists-named-exit0", "aptos", nu_aptos_unlisted_images, 0,
         ("ignoring 1 file(s)", "train_images/not_in_the_csv.png"), r"no label CSV",
         check=_splits_has(absent=("not_in_the_csv",))),
    Case("orthonet-kaggle-mask-files-and-the-csvs-are-not-called-unused-exit0", "orthonet",
         lambda ctx: check_data(ctx.data("orthonet_kaggle")), 0, ("mask file(s) not samples",),
         check=_silent("ignoring")),
    Case("pacemaker-image-path-is-the-train-folder-warns-test-is-not-read-exit0", "pacemaker", nu_train_folder_as_root,
         0, ("the image path is the Train/ split folder", "Test/ beside it is not read"), r"pass .*/data to keep",
         check=_count_rows(15)),
    Case("aptos-competition-unlabelled-test-set-explained-not-warned-exit0", "aptos",
         lambda ctx: check_data(ctx.data("aptos_competition_doubled")), 0,
         ("the competition's unlabelled test set, not used",), check=_silent("ignoring")),
]


# ---------------------------------------------------------------- settings without effect

def se_val_fraction(ctx):
    return check_data(ctx.data("aptos_three_way")) + ["--set", "val_fraction=0.3"]


def se_test_fraction(ctx):
    return check_data(_pm(ctx)) + ["--set", "test_fraction=0.25"]


SETTING_CASES = [
    Case("aptos-three-way-val-fraction-has-no-effect-said-once-naming-the-key-exit0", "aptos", se_val_fraction, 0,
         ("val_fraction=0.3 has no effect", "official val split"),
         check=_both(_said_once("val_fraction=0.3 has no effect"), _count_rows(18))),
    Case("pacemaker-test-folder-test-fraction-has-no-effect-said-once-exit0", "pacemaker", se_test_fraction, 0,
         ("test_fraction=0.25 has no effect", "official test split"),
         check=_said_once("test_fraction=0.25 has no effect")),
]


# ---------------------------------------------------------------- one image, two labels; duplicates

def _manifest_rows(ctx) -> list[str]:
    rows = []
    for k in range(3):
        for n in range(6):
            write_png(ctx.inp / "images" / f"g{k}_{n}.png")
            split = "test" if n == 0 else "val" if n == 1 else "train"
            rows.append(f"../images/g{k}_{n}.png,{k},{split}")
    return rows


def _manifest(ctx, rows: list[str], header: str = "path,label,split", data: bytes | None = None) -> list[str]:
    csv = ctx.inp / "meta" / "labels.csv"
    write(csv, data if data is not None else (header + "\n" + "\n".join(rows) + "\n").encode())
    return ["--check_data", "--manifest", str(csv)]


def du_two_labels(ctx):
    rows = _manifest_rows(ctx)
    return _manifest(ctx, rows + ["../images/g0_3.png,2,train"])


def du_exact_repeat(ctx):
    rows = _manifest_rows(ctx)
    return _manifest(ctx, rows + [rows[4]])


def du_two_splits(ctx):
    rows = _manifest_rows(ctx)
    return _manifest(ctx, rows + ["../images/g0_3.png,0,test"])


def du_orthonet_train_and_test(ctx):
    root = ctx.data("orthonet_kaggle")
    train = pd.read_csv(root / "train.csv", dtype=str)
    first, label = train["filenames"].iloc[0], train["labels"].iloc[0]
    other = next(v for v in train["labels"] if v != label)
    edit_csv(root / "test.csv", lambda f: pd.concat([f, pd.DataFrame({"filenames": [first], "labels": [other]})]))
    return check_data(root)


def du_copy_in_two_classes(ctx):
    root = _pm(ctx)
    data = (root / TRAIN_A / "0002.png").read_bytes()
    write(root / "Train" / "MDT - Advisa" / "adapta_copy.png", data)
    return check_data(root)


def du_copy_same_class(ctx):
    root = ctx.data("aptos_three_way")
    folder = root / "train_images" / "train_images"
    first = pd.read_csv(root / "train_1.csv", dtype=str).iloc[0]
    write(folder / "copy0001.png", (folder / f"{first['id_code']}.png").read_bytes())
    edit_csv(root / "train_1.csv", lambda f: pd.concat([f, pd.DataFrame({"id_code": ["copy0001"],
                                                                         "diagnosis": [first["diagnosis"]]})]))
    return check_data(root)


DUPLICATE_CASES = [
    Case("manifest-one-image-under-two-labels-of-one-split-exit2-names-it", "aptos", du_two_labels, 2,
         ("images/g0_3.png", "two labels", "'0 - No DR' in train", "'2 - Moderate' in train"),
         r"keep one row per image"),
    Case("orthonet-kaggle-file-in-train-csv-and-test-csv-under-two-labels-exit2", "orthonet",
         du_orthonet_train_and_test, 2, ("image_", "two labels"), r"keep one row per image"),
    Case("manifest-exact-repeat-row-told-apart-as-exact-duplicate-exit0", "aptos", du_exact_repeat, 0,
         ("1 image(s) listed more than once with the same label and split (exact duplicates)", "g0_4.png"),
         check=_count_rows(18)),
    Case("manifest-one-image-in-two-splits-same-label-warned-as-a-leak-kept-in-train-exit0", "aptos",
         du_two_splits, 0, ("listed in two splits (a leak)", "g0_3.png"), r"give each image one split",
         check=_count_rows(18)),
    Case("pacemaker-identical-file-in-two-class-folders-of-train-warned-as-label-conflict-exit0", "pacemaker",
         du_copy_in_two_classes, 0, ("label conflict", "adapta_copy.png ('MDT - Advisa')",
                                     f"{TRAIN_A}/0002.png ('MDT - Adapta')"), r"check their labels"),
    Case("aptos-identical-images-same-grade-in-train-told-apart-as-exact-duplicates-exit0", "aptos",
         du_copy_same_class, 0, ("exact duplicates: each weighs twice", "copy0001.png"),
         check=_silent("label conflict")),
]


# ---------------------------------------------------------------- CSV encodings and separators

def en_aptos_utf16(ctx):
    root = ctx.data("aptos_competition")
    text = (root / "train.csv").read_text()
    write(root / "train.csv", text.encode("utf-16"))
    return check_data(root)


def en_aptos_unicode_text(ctx):
    """Excel's "Unicode text": UTF-16 with a BOM, tab-separated, CRLF."""
    root = ctx.data("aptos_competition")
    text = (root / "train.csv").read_text().replace(",", "\t").replace("\n", "\r\n")
    write(root / "train.csv", text.encode("utf-16"))
    return check_data(root)


def en_manifest_semicolons(ctx):
    rows = [r.replace(",", ";") for r in _manifest_rows(ctx)]
    return _manifest(ctx, rows, header="path;label;split")


def en_manifest_bom_umlaut(ctx):
    rows = [r.replace(",0,", ",Hüfte,").replace(",1,", ",Knie,").replace(",2,", ",Schulter,")
            for r in _manifest_rows(ctx)]
    data = b"\xef\xbb\xbf" + ("path,label,split\n" + "\n".join(rows) + "\n").encode()
    return ["--check_data", "--manifest", str(_write_manifest(ctx, data))]


def _write_manifest(ctx, data: bytes) -> Path:
    csv = ctx.inp / "meta" / "labels.csv"
    write(csv, data)
    return csv


def en_manifest_latin1(ctx):
    rows = [r.replace(",0,", ",Hüfte,").replace(",1,", ",Knie,").replace(",2,", ",Schulter,")
            for r in _manifest_rows(ctx)]
    data = ("path,label,split\n" + "\n".join(rows) + "\n").encode("latin-1")
    return ["--check_data", "--manifest", str(_write_manifest(ctx, data))]


def en_manifest_backslashes(ctx):
    rows = [r.replace("../images/", "..\\images\\") for r in _manifest_rows(ctx)]
    return _manifest(ctx, rows)


def en_orthonet_latin1_header(ctx):
    root = ctx.data("orthonet_kaggle")
    frame = pd.read_csv(root / "train.csv", dtype=str)
    frame["größe"] = "1"
    write(root / "train.csv", frame.to_csv(index=False).encode("latin-1"))
    return check_data(root)


def _bom_names_right(ctx: Ctx, result: Result) -> None:
    assert set(splits_table(ctx)["class_name"]) == {"Hüfte", "Knie", "Schulter"}


ENCODING_CASES = [
    Case("aptos-train-csv-saved-as-utf16-read-right-exit0", "aptos", en_aptos_utf16, 0, check=_count_rows(18)),
    Case("aptos-train-csv-as-excel-unicode-text-utf16-tabs-read-right-exit0", "aptos", en_aptos_unicode_text, 0,
         check=_count_rows(18)),
    Case("manifest-separated-by-semicolons-read-right-exit0", "aptos", en_manifest_semicolons, 0,
         check=_count_rows(18)),
    Case("manifest-utf8-with-bom-and-umlaut-labels-read-right-exit0", "pacemaker", en_manifest_bom_umlaut, 0,
         check=_both(_count_rows(18), _bom_names_right)),
    Case("manifest-written-on-windows-with-backslash-paths-resolved-exit0", "aptos", en_manifest_backslashes, 0,
         check=_count_rows(18)),
    Case("manifest-latin1-labels-refused-save-it-as-utf8-exit2", "pacemaker", en_manifest_latin1, 2,
         ("labels.csv", "not UTF-8", "H\\xfcfte"), r"save it as UTF-8"),
    Case("orthonet-kaggle-train-csv-latin1-column-name-refused-save-it-as-utf8-exit2", "orthonet",
         en_orthonet_latin1_header, 2, ("train.csv", "not UTF-8", "column names"), r"save it as UTF-8"),
]


# ---------------------------------------------------------------- file names that repeat the image folder

def _rewrite(tree: str, column: str, change, *csvs: str):
    """A copy of ``tree`` whose ``csvs`` have ``column`` rewritten by ``change`` (a Series -> Series)."""
    def build(ctx):
        root = ctx.data(tree)
        for csv in csvs:
            edit_csv(root / csv, lambda f: f.__setitem__(column, change(f[column])))
        return check_data(root)
    return build


fn_aptos_prefix = _rewrite("aptos_competition", "id_code", lambda ids: "train_images/" + ids, "train.csv")
fn_aptos_suffix = _rewrite("aptos_three_way", "id_code", lambda ids: ids + ".png",
                           "train_1.csv", "valid.csv", "test.csv")
fn_aptos_elsewhere = _rewrite("aptos_three_way", "id_code", lambda ids: "images/" + ids, "train_1.csv")
fn_orthonet_prefix = _rewrite("orthonet_kaggle", "filenames", lambda names: "orthonet data/" + names,
                              "train.csv", "test.csv")


FILE_NAME_CASES = [
    Case("aptos-id-code-repeating-train-images-folder-resolved-exit0", "aptos", fn_aptos_prefix, 0,
         check=_both(_count_rows(18), _silent("no image file"))),
    Case("aptos-three-way-id-codes-with-png-suffix-resolved-exit0", "aptos", fn_aptos_suffix, 0,
         check=_count_rows(18)),
    Case("aptos-three-way-id-codes-in-another-folder-exit2-names-where-it-looked-not-add-images", "aptos",
         fn_aptos_elsewhere, 2, ("none of the 12 file(s) listed in", "train_1.csv",
                                 "train_images/train_images/images/"), r"id_code must be the image's name"),
    Case("orthonet-kaggle-filenames-repeating-orthonet-data-resolved-exit0", "orthonet", fn_orthonet_prefix, 0,
         check=_silent("no image file", "ignoring")),
]


# ---------------------------------------------------------------- truncated downloads

def tr_png_header(ctx):
    root = _pm(ctx)
    write(root / TRAIN_A / "cut_early.png", png_bytes(5, 48)[:40])      # cut just after the header
    return check_data(root)


def tr_csv_mid_line(ctx):
    root = ctx.data("aptos_competition")
    data = (root / "train.csv").read_bytes().rstrip(b"\n")
    write(root / "train.csv", data[: data.rindex(b",") + 1])
    return check_data(root)


def tr_dicom(ctx):
    root = _pm(ctx)
    path = write_dicom(root / TRAIN_A / "scan.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    write(path, path.read_bytes()[:-1000])
    return check_data(root)


TRUNCATED_CASES = [
    Case("pacemaker-png-cut-inside-its-header-skipped-as-truncated-not-another-type-exit0", "pacemaker",
         tr_png_header, 0, ("skipped 1 file(s)", "cut_early.png", "truncated"), r"download it again",
         check=_silent("not an image")),
    Case("aptos-train-csv-cut-mid-line-exit2-says-truncated-download-again", "aptos", tr_csv_mid_line, 2,
         ("train.csv", "the last, is cut short", "truncated"), r"download it again"),
    Case("pacemaker-truncated-dicom-skipped-as-truncated-exit0", "pacemaker", tr_dicom, 0,
         ("skipped 1 file(s)", "scan.dcm", "truncated"), r"download it again", check=_count_rows(18)),
]


# ---------------------------------------------------------------- splits made impossible by the fractions

def fr_pacemaker_flat(ctx):
    root = ctx.inp / "data"
    for k, name in enumerate(PACEMAKER_CLASSES):
        for n in range(6):
            write_png(root / name / f"{n:04d}.png")
    return check_data(root) + ["--set", "val_fraction=0.45", "--set", "test_fraction=0.45"]


def fr_orthonet_val(ctx):
    return check_data(ctx.data("orthonet_kaggle")) + ["--set", "val_fraction=0.8"]


FRACTION_CASES = [
    Case("pacemaker-val-0.45-test-0.45-impossible-exit2-names-the-fractions-not-add-images", "pacemaker",
         fr_pacemaker_flat, 2, ("test_fraction=0.45 and val_fraction=0.45",),
         r"use smaller fractions, e\.g\. test_fraction=0\.15 and val_fraction=0\.15"),
    Case("orthonet-kaggle-val-fraction-0.8-impossible-exit2-names-it", "orthonet", fr_orthonet_val, 2,
         ("val_fraction=0.8",), r"use smaller fractions, e\.g\. val_fraction=0\.15"),
]


# ---------------------------------------------------------------- DICOM

def dc_folders(ctx):
    root = _pm(ctx)
    write_dicom(root / TRAIN_A / "scan.dcm", np.arange(256, dtype=np.uint16).reshape(16, 16) * 16)
    write_dicom(root / "Train" / "MDT - Advisa" / "1.2.826.0.1.3680043.8.498.1", np.eye(16, dtype=np.uint8) * 200,
                photometric="MONOCHROME1")
    return check_data(root)


def dc_missing_decoder(ctx):
    root = _pm(ctx)
    write_dicom(root / TRAIN_A / "compressed.dcm", np.zeros((16, 16), np.uint8), syntax=JPEGLSLossless)
    return check_data(root)


def dc_manifest(ctx):
    rows = []
    for k in range(3):
        for n in range(6):
            path = write_dicom(ctx.inp / "images" / f"g{k}_{n}.dcm", np.full((8, 8), 10 * n + k, np.uint16))
            rows.append(f"../images/{path.name},{k},{'test' if n == 0 else 'val' if n == 1 else 'train'}")
    return _manifest(ctx, rows)


def dc_aptos(ctx):
    root = ctx.data("aptos_competition")
    first = pd.read_csv(root / "train.csv", dtype=str)["id_code"].iloc[0]
    (root / "train_images" / f"{first}.png").unlink()
    write_dicom(root / "train_images" / f"{first}.dcm", np.full((8, 8), 7, np.uint8))
    return check_data(root)


DICOM_CASES = [
    Case("pacemaker-dcm-and-suffixless-dicom-in-class-folders-used-exit0", "pacemaker", dc_folders, 0,
         check=_both(_count_rows(20), _splits_has("scan.dcm", "1.2.826.0.1.3680043.8.498.1"), _silent("ignoring"))),
    Case("pacemaker-jpeg-ls-dicom-without-a-decoder-exit2-names-file-and-package", "pacemaker", dc_missing_decoder, 2,
         ("compressed.dcm", "JPEG-LS"), r"pip install pylibjpeg pylibjpeg-libjpeg"),
    Case("manifest-listing-dcm-files-exit0", "aptos", dc_manifest, 0, check=_count_rows(18)),
    Case("aptos-id-code-image-saved-as-dcm-matched-exit0", "aptos", dc_aptos, 0,
         check=_both(_count_rows(18), _splits_has(".dcm"))),
]


ALL_CASES = (UNUSED_CASES + SETTING_CASES + DUPLICATE_CASES + ENCODING_CASES + FILE_NAME_CASES + TRUNCATED_CASES
             + FRACTION_CASES + DICOM_CASES)


@pytest.mark.parametrize("case", params(ALL_CASES))
def test_bad_input(case: Case, tmp_path, trees, capsys):
    problems = run_case(case, tmp_path, trees, capsys)
    assert not problems, "\n".join(problems)
