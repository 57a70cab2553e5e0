"""The bad-input matrix, per dataset layout: Pacemaker folders, OrthoNet's layouts, APTOS's
releases and CSV manifests, as users have them on disk (the harness is tests/badinput.py).

Every case runs an entry script with ``--check_data`` (or a run that stops at the data) on a copy
of a synthetic tree it breaks in one way; see tests/badinput.py for what every case asserts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from badinput import (
    PACEMAKER_CLASSES,
    TRAIN_A,
    Case,
    Ctx,
    Result,
    _both,
    _count_rows,
    _no_skip_warning,
    _offline,  # noqa: F401  (an autouse fixture, picked up by name)
    _pm,
    _splits_has,
    appledouble,
    bomb_png,
    check_data,
    edit_csv,
    jpeg_bytes,
    params,
    png16,
    png_bytes,
    run_case,
    splits_bytes,
    splits_table,
    trees,  # noqa: F401  (a fixture, picked up by name)
    truncated_jpeg,
    truncated_png,
    write,
    write_png,
)


# ---------------------------------------------------------------- pacemaker


def _not_named(*names: str):
    def check(ctx: Ctx, result: Result) -> None:
        for name in names:
            assert name not in result.err, f"{name!r} should not be named:\n{result.err[-3000:]}"
    return check

def pm_missing(ctx):
    return check_data(ctx.inp / "no such folder")


def pm_is_file(ctx):
    write(ctx.inp / "pacemaker.zip", b"PK\x03\x04 not really")
    return check_data(ctx.inp / "pacemaker.zip")


def pm_empty(ctx):
    (ctx.inp / "empty").mkdir()
    return check_data(ctx.inp / "empty")


def pm_litter_only(ctx):
    root = ctx.inp / "litter"
    write(root / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(root / "Thumbs.db", b"\xd0\xcf\x11\xe0")
    return check_data(root)


def pm_no_train(ctx):
    root = _pm(ctx)
    shutil.rmtree(root / "Train")
    return check_data(root)


def pm_empty_class_folders(ctx):
    root = ctx.inp / "data"
    for split in ("Train", "Test"):
        for name in PACEMAKER_CLASSES:
            (root / split / name).mkdir(parents=True)
        write(root / split / "README.txt", b"images go in the class folders\n")
    return check_data(root)


def pm_one_class(ctx):
    root = _pm(ctx)
    for split in ("Train", "Test"):
        for name in PACEMAKER_CLASSES[1:]:
            shutil.rmtree(root / split / name)
    return check_data(root)


def pm_appledouble(ctx):
    root = _pm(ctx)
    appledouble(root / TRAIN_A / "._0001.png")
    appledouble(root / "Test/MDT - Advisa/._0000.png")
    return check_data(root)


def pm_truncated_png(ctx):
    root = _pm(ctx)
    truncated_png(root / TRAIN_A / "0002.png")
    return check_data(root)


def pm_zero_byte(ctx):
    root = _pm(ctx)
    write(root / TRAIN_A / "0003.png", b"")
    return check_data(root)


def pm_text_as_png(ctx):
    root = _pm(ctx)
    write(root / TRAIN_A / "0004.png", b"<html>404 Not Found</html>\n")
    return check_data(root)


def pm_truncated_jpeg(ctx):
    root = _pm(ctx)
    truncated_jpeg(root / TRAIN_A / "cut.jpg")
    return check_data(root)


def pm_strict_truncated(ctx):
    root = _pm(ctx)
    truncated_png(root / TRAIN_A / "0002.png")
    return check_data(root) + ["--strict"]


def pm_16bit(ctx):
    root = _pm(ctx)
    png16(root / TRAIN_A / "grey16.png")
    return check_data(root)


def pm_cmyk(ctx):
    root = _pm(ctx)
    write(root / TRAIN_A / "cmyk.jpg", jpeg_bytes(7, mode="CMYK"))
    return check_data(root)


def pm_spaces_unicode(ctx):
    root = _pm(ctx)
    write_png(root / TRAIN_A / "scan 01 ü.png")
    write_png(root / "Train/MDT - Advisa/Röntgen 中文 #2.png")
    return check_data(root)


def pm_non_utf8_file(ctx):
    root = _pm(ctx)
    write_png(os.fsencode(root / TRAIN_A) + b"/scan-\xff\xfe.png")
    write_png(os.fsencode(root / "Test/MDT - Advisa") + b"/r\xe9sum\xe9.png")
    return check_data(root)


def pm_non_utf8_class(ctx):
    root = _pm(ctx)
    for split in ("Train", "Test"):
        src = root / split / "STJ - Assurity"
        os.rename(os.fsencode(src), os.fsencode(root / split) + b"/BIO - \xc9via")
    return check_data(root)


def pm_newline_name(ctx):
    root = _pm(ctx)
    write_png(root / TRAIN_A / "two\nlines.png")
    return check_data(root)


def pm_too_small(ctx):
    root = _pm(ctx)
    for name in ("0002.png", "0003.png", "0004.png", "0005.png"):
        (root / "Train/STJ - Assurity" / name).unlink()
    return check_data(root)


def pm_wrapper(ctx):
    shutil.copytree(ctx.trees["pacemaker"], ctx.inp / "download" / "pacemaker-dataset")
    return check_data(ctx.inp / "download")


def pm_wrapper_macosx(ctx):
    shutil.copytree(ctx.trees["pacemaker"], ctx.inp / "download" / "pacemaker-dataset")
    appledouble(ctx.inp / "download" / "._pacemaker-dataset")
    appledouble(ctx.inp / "download" / "__MACOSX" / "pacemaker-dataset" / "._Train")
    return check_data(ctx.inp / "download")


def pm_train_and_training(ctx):
    root = _pm(ctx)
    shutil.copytree(root / "Train", root / "training")
    return check_data(root)


def pm_stray_image(ctx):
    root = _pm(ctx)
    write_png(root / "Train" / "stray.png")
    return check_data(root)


def pm_extra_folder(ctx):
    root = _pm(ctx)
    write_png(root / "docs" / "figure1.png")
    return check_data(root)


def pm_non_images(ctx):
    root = _pm(ctx)
    write(root / TRAIN_A / "README.txt", b"notes\n")
    write(root / TRAIN_A / "labels.xlsx", b"PK\x03\x04")
    write(root / TRAIN_A / "Thumbs.db", b"\xd0\xcf\x11\xe0")
    write(root / "Train" / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(root / "Train" / "desktop.ini", b"[.ShellClassInfo]\n")
    return check_data(root)


def pm_class_only_in_test(ctx):
    root = _pm(ctx)
    write_png(root / "Test" / "BOS - Accolade" / "0000.png")
    return check_data(root)


def pm_lowercase_and_valid(ctx):
    root = _pm(ctx)
    os.rename(root / "Train", root / "train")
    os.rename(root / "Test", root / "TEST")
    for name in PACEMAKER_CLASSES:
        (root / "valid" / name).mkdir(parents=True)
        os.rename(root / "train" / name / "0005.png", root / "valid" / name / "0005.png")
    return check_data(root)


def pm_leak(ctx):
    root = _pm(ctx)
    shutil.copy2(root / "Test/MDT - Adapta/0000.png", root / TRAIN_A / "copy of 0000.png")
    return check_data(root)


def pm_symlinks(ctx):
    root = _pm(ctx)
    store = ctx.inp / "store"
    store.mkdir()
    os.rename(root / "Train/STJ - Assurity", store / "assurity")
    os.symlink("../../store/assurity", root / "Train/STJ - Assurity")
    write_png(store / "extra.png")
    os.symlink("../../../store/extra.png", root / TRAIN_A / "link.png")
    return check_data(root)


def pm_dangling(ctx):
    root = _pm(ctx)
    os.symlink("../../../moved-away/gone.png", root / TRAIN_A / "gone.png")
    return check_data(root)


def pm_uppercase(ctx):
    root = _pm(ctx)
    write(root / TRAIN_A / "UPPER.PNG", png_bytes(11))
    write(root / TRAIN_A / "Photo.JPEG", jpeg_bytes(12))
    return check_data(root)


def pm_bomb(ctx):
    root = _pm(ctx)
    bomb_png(root / TRAIN_A / "huge.png")
    return check_data(root)


def _valid_split_used(ctx: Ctx, result: Result) -> None:
    table = splits_table(ctx)
    val = table[table["split"] == "val"]
    assert len(val) == 3 and all("/valid/" in p for p in val["path"]), val


PACEMAKER_CASES = [
    Case("pacemaker-image-path-does-not-exist-exit2", "pacemaker", pm_missing, 2,
         ("no such folder", "does not exist"), r"expected class folders"),
    Case("pacemaker-image-path-is-a-file-exit2", "pacemaker", pm_is_file, 2,
         ("pacemaker.zip", "not a folder"), r"unzip it and pass the folder it holds \(expected class folders"),
    Case("pacemaker-empty-folder-exit2", "pacemaker", pm_empty, 2, ("empty",), r"expected class folders"),
    Case("pacemaker-folder-with-only-ds-store-and-thumbs-db-is-empty-exit2", "pacemaker", pm_litter_only, 2,
         ("litter", "empty"), r"expected class folders"),
    Case("pacemaker-test-folder-without-train-folder-exit2", "pacemaker", pm_no_train, 2,
         ("Test", "no Train/"), r"add Train/"),
    Case("pacemaker-class-folders-without-images-exit2", "pacemaker", pm_empty_class_folders, 2,
         ("no images found",), r"expected class folders"),
    Case("pacemaker-single-class-exit2", "pacemaker", pm_one_class, 2,
         ("only one class", "MDT - Adapta"), r"at least 2"),
    Case("pacemaker-appledouble-files-skipped-with-warning-exit0", "pacemaker", pm_appledouble, 0,
         ("Train/MDT - Adapta/._0001.png", "AppleDouble"), r"skipped 2 file",
         check=_splits_has(absent=("._0001.png", "._0000.png"))),
    Case("pacemaker-truncated-png-skipped-with-warning-exit0", "pacemaker", pm_truncated_png, 0,
         ("Train/MDT - Adapta/0002.png", "truncated"), r"skipped 1 file",
         check=_splits_has("0001.png", absent=("Adapta/0002.png",))),
    Case("pacemaker-zero-byte-png-skipped-with-warning-exit0", "pacemaker", pm_zero_byte, 0,
         ("Train/MDT - Adapta/0003.png", "empty file"), r"skipped 1 file",
         check=_splits_has(absent=("Adapta/0003.png",))),
    Case("pacemaker-html-saved-as-png-skipped-with-warning-exit0", "pacemaker", pm_text_as_png, 0,
         ("Train/MDT - Adapta/0004.png", "not an image"), r"skipped 1 file",
         check=_splits_has(absent=("Adapta/0004.png",))),
    Case("pacemaker-truncated-jpeg-skipped-with-warning-exit0", "pacemaker", pm_truncated_jpeg, 0,
         ("Train/MDT - Adapta/cut.jpg", "truncated"), r"skipped 1 file",
         check=_splits_has(absent=("cut.jpg",))),
    Case("pacemaker-strict-with-truncated-png-exit2", "pacemaker", pm_strict_truncated, 2,
         ("--strict", "Train/MDT - Adapta/0002.png", "truncated"), r"fix or remove"),
    Case("pacemaker-16bit-grey-png-is-used-not-skipped-exit0", "pacemaker", pm_16bit, 0,
         check=_both(_no_skip_warning, _splits_has("grey16.png"))),
    Case("pacemaker-cmyk-jpeg-is-used-not-skipped-exit0", "pacemaker", pm_cmyk, 0,
         check=_both(_no_skip_warning, _splits_has("cmyk.jpg"))),
    Case("pacemaker-file-names-with-spaces-and-unicode-kept-in-splits-csv-exit0", "pacemaker",
         pm_spaces_unicode, 0,
         check=_both(_no_skip_warning, _splits_has("scan 01 ü.png", "Röntgen 中文 #2.png"))),
    Case("pacemaker-non-utf8-file-names-kept-byte-exact-in-splits-csv-exit0", "pacemaker",
         pm_non_utf8_file, 0,
         check=_both(_no_skip_warning, _splits_has(os.fsdecode(b"scan-\xff\xfe.png"),
                                                   os.fsdecode(b"r\xe9sum\xe9.png")))),
    Case("pacemaker-non-utf8-class-folder-name-kept-byte-exact-exit0", "pacemaker", pm_non_utf8_class, 0,
         ("BIO - \\xc9via",),
         check=_splits_has(os.fsdecode(b",BIO - \xc9via,"), os.fsdecode(b"/BIO - \xc9via/0000.png"))),
    Case("pacemaker-newline-in-file-name-round-trips-through-splits-csv-exit0", "pacemaker",
         pm_newline_name, 0,
         check=lambda ctx, r: assert_in_paths(ctx, "two\nlines.png")),
    Case("pacemaker-class-with-one-train-image-too-small-to-split-exit2", "pacemaker", pm_too_small, 2,
         ("STJ - Assurity", "only 1 image"), r"add images"),
    Case("pacemaker-wrapper-folder-of-an-unzipped-archive-read-from-inside-exit0", "pacemaker", pm_wrapper, 0,
         ("wrapper folder pacemaker-dataset",), check=_count_rows(18)),
    Case("pacemaker-wrapper-folder-with-macosx-litter-beside-it-read-from-inside-exit0", "pacemaker",
         pm_wrapper_macosx, 0, ("wrapper folder pacemaker-dataset",), check=_count_rows(18)),
    Case("pacemaker-train-and-training-folders-ambiguous-exit2", "pacemaker", pm_train_and_training, 2,
         ("Train", "training", "train split"), r"keep one of them"),
    Case("pacemaker-image-outside-class-folders-skipped-with-warning-exit0", "pacemaker", pm_stray_image, 0,
         ("Train/stray.png", "not inside a class folder"), r"skipped 1 file",
         check=_splits_has(absent=("stray.png",))),
    Case("pacemaker-extra-folder-beside-split-folders-ignored-with-warning-exit0", "pacemaker",
         pm_extra_folder, 0, ("docs", "ignoring 1 folder"), check=_splits_has(absent=("figure1.png",))),
    Case("pacemaker-readme-and-xlsx-named-as-not-used-thumbs-db-ds-store-silent-exit0", "pacemaker", pm_non_images, 0,
         ("ignoring 2 file(s)", "Train/MDT - Adapta/README.txt", "Train/MDT - Adapta/labels.xlsx"),
         check=_both(_no_skip_warning, _count_rows(18), _not_named("Thumbs.db", ".DS_Store", "desktop.ini"))),
    Case("pacemaker-class-only-in-test-warned-exit0", "pacemaker", pm_class_only_in_test, 0,
         ("BOS - Accolade", "no train images")),
    Case("pacemaker-lowercase-split-folders-and-valid-folder-used-as-val-exit0", "pacemaker",
         pm_lowercase_and_valid, 0, check=_valid_split_used),
    Case("pacemaker-identical-file-in-train-and-test-reported-as-leak-exit0", "pacemaker", pm_leak, 0,
         ("copy of 0000.png", "Test/MDT - Adapta/0000.png", "leak")),
    Case("pacemaker-symlinked-class-folder-and-image-are-read-exit0", "pacemaker", pm_symlinks, 0,
         check=_both(_no_skip_warning, _count_rows(19), _splits_has("Train/STJ - Assurity/0001.png", "link.png"))),
    Case("pacemaker-dangling-symlink-image-skipped-with-warning-exit0", "pacemaker", pm_dangling, 0,
         ("Train/MDT - Adapta/gone.png", "unreadable"), r"skipped 1 file", check=_count_rows(18)),
    Case("pacemaker-uppercase-PNG-and-JPEG-extensions-used-exit0", "pacemaker", pm_uppercase, 0,
         check=_both(_no_skip_warning, _splits_has("UPPER.PNG", "Photo.JPEG"))),
    Case("pacemaker-decompression-bomb-png-skipped-with-warning-exit0", "pacemaker", pm_bomb, 0,
         ("Train/MDT - Adapta/huge.png", "too large"), r"skipped 1 file", check=_count_rows(18)),
]


def assert_in_paths(ctx: Ctx, name: str) -> None:
    assert any(p.endswith(name) for p in splits_table(ctx)["path"]), name


# ---------------------------------------------------------------- orthonet

KAGGLE_IMAGES = "orthonet data/orthonet data"


def _ok(ctx) -> Path:
    return ctx.data("orthonet_kaggle")


def on_unknown_label(ctx):
    root = _ok(ctx)
    edit_csv(root / "train.csv", lambda f: f.__setitem__("labels", ["Hip_Mystery_Stem"] + list(f["labels"][1:])))
    return check_data(root)


def on_empty_label(ctx):
    root = _ok(ctx)
    edit_csv(root / "train.csv", lambda f: f.__setitem__("labels", list(f["labels"][:2]) + [""] + list(f["labels"][3:])))
    return check_data(root)


def on_missing_file(ctx):
    root = _ok(ctx)
    (root / KAGGLE_IMAGES / "image_00003.png").unlink()
    return check_data(root)


def on_no_train_csv(ctx):
    root = _ok(ctx)
    (root / "train.csv").unlink()
    return check_data(root)


def on_no_csvs(ctx):
    root = _ok(ctx)
    (root / "train.csv").unlink()
    (root / "test.csv").unlink()
    return check_data(root)


def on_wrong_columns(ctx):
    root = _ok(ctx)
    edit_csv(root / "train.csv", lambda f: f.rename(columns={"filenames": "image_id", "labels": "target"}))
    return check_data(root)


def on_codes(ctx):
    root = _ok(ctx)
    codes = {"Hip_DepuySynthes_Corail_Collar": "1", "Hip_DepuySynthes_Corail_NilCol": "02",
             "Knee_Depuy_Synthes_Sigma": "21"}
    for name in ("train.csv", "test.csv"):
        edit_csv(root / name, lambda f: f.__setitem__("labels", [codes[v] for v in f["labels"]]))
    return check_data(root)


def _codes_resolved(ctx, result):
    assert set(splits_table(ctx)["class_name"]) == {
        "Hip_DepuySynthes_Corail_Collar", "Hip_DepuySynthes_Corail_NilCol", "Knee_Depuy_Synthes_Sigma"}


def on_single_folder(ctx):
    root = _ok(ctx)
    inner = root / KAGGLE_IMAGES
    outer = inner.parent
    for f in list(inner.iterdir()):
        os.rename(f, outer / f.name)
    inner.rmdir()
    return check_data(root)


def on_wrapper(ctx):
    shutil.copytree(ctx.trees["orthonet_kaggle"], ctx.inp / "archive" / "orthonet")
    return check_data(ctx.inp / "archive")


def on_bad_quotes(ctx):
    root = _ok(ctx)
    write(root / "train.csv", b'filenames,labels\n"image_00001.png,Hip_DepuySynthes_Corail_Collar\n')
    return check_data(root)


def on_unknown_folder(ctx):
    root = ctx.data("orthonet_folders")
    write_png(root / "Hip_Mystery_Stem" / "0001.png")
    return check_data(root)


def on_code_folders(ctx):
    root = ctx.data("orthonet_folders")
    os.rename(root / "Hip_DepuySynthes_Corail_Collar", root / "01_Corail collar")
    os.rename(root / "Knee_Depuy_Synthes_Sigma", root / "21")
    return check_data(root)


def on_flat_unknown_code(ctx):
    root = ctx.data("orthonet_flat")
    write_png(root / "99_0001.png")
    return check_data(root)


def on_kaggle_plus_folders(ctx):
    root = _ok(ctx)
    write_png(root / "Hip_Stryker_Exeter" / "0001.png")
    return check_data(root)


def on_two_label_csvs(ctx):
    root = ctx.inp / "data"
    rows = []
    for k, code in enumerate(("01", "02", "21")):
        for n in range(6):
            write_png(root / "images" / f"x{k}{n}.png")
            rows.append((f"images/x{k}{n}.png", code))
    frame = pd.DataFrame(rows, columns=["path", "label"])
    frame.to_csv(root / "labels_v1.csv", index=False)
    frame.to_csv(root / "labels_v2.csv", index=False)
    return check_data(root)


def on_label_csv_missing_row(ctx):
    root = ctx.inp / "data"
    rows = []
    for k, code in enumerate(("01", "02", "21")):
        for n in range(6):
            if (k, n) != (1, 3):
                write_png(root / "images" / f"x{k}{n}.png")
            rows.append((f"images/x{k}{n}.png", code))
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / "labels.csv", index=False)
    return check_data(root)


def on_odd_names(ctx):
    root = _ok(ctx)
    folder = root / KAGGLE_IMAGES
    os.rename(folder / "image_00001.png", folder / "knee ü 1.png")
    os.rename(folder / "image_00002.png", os.fsencode(folder) + b"/hip-\xff.png")

    def rename(frame):
        frame["filenames"] = frame["filenames"].replace(
            {"image_00001.png": "knee ü 1.png", "image_00002.png": os.fsdecode(b"hip-\xff.png")})
    path = root / "train.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    rename(frame)
    path.write_bytes(frame.to_csv(index=False).encode("utf-8", "surrogateescape"))
    return check_data(root)


def on_crlf(ctx):
    root = _ok(ctx)
    for name in ("train.csv", "test.csv"):
        data = (root / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        write(root / name, data)
    return check_data(root)


def on_inner_folder(ctx):
    return check_data(_ok(ctx) / KAGGLE_IMAGES)


ORTHONET_CASES = [
    Case("orthonet-image-path-at-the-inner-images-folder-exit2-says-which-layout-is-expected", "orthonet",
         on_inner_folder, 2, ("no images found", "orthonet data"), r"expected the Kaggle release"),
    Case("orthonet-kaggle-train-csv-unknown-label-exit2", "orthonet", on_unknown_label, 2,
         ("train.csv", "Hip_Mystery_Stem"), r"labels must be the 12 OrthoNet classes"),
    Case("orthonet-kaggle-train-csv-empty-label-exit2", "orthonet", on_empty_label, 2,
         ("train.csv", "empty labels", "line(s) 4"), r"give every row a label"),
    Case("orthonet-kaggle-row-whose-file-is-missing-left-out-with-warning-exit0", "orthonet",
         on_missing_file, 0, ("train.csv", "image_00003.png", "no image file"), r"left out",
         check=_splits_has(absent=("image_00003.png",))),
    Case("orthonet-kaggle-test-csv-without-train-csv-exit2", "orthonet", on_no_train_csv, 2,
         ("test.csv", "no train.csv"), r"restore"),
    Case("orthonet-kaggle-images-folder-without-its-csvs-exit2", "orthonet", on_no_csvs, 2,
         ("orthonet data", "train.csv"), r"restore them|--manifest"),
    Case("orthonet-kaggle-train-csv-wrong-columns-exit2-names-the-columns-found", "orthonet",
         on_wrong_columns, 2, ("train.csv", "image_id", "filenames"), r"expected|restore|rename"),
    Case("orthonet-kaggle-labels-as-codes-1-02-21-accepted-exit0", "orthonet", on_codes, 0,
         check=_codes_resolved),
    Case("orthonet-kaggle-mask-files-are-never-samples-exit0", "orthonet", lambda ctx: check_data(_ok(ctx)), 0,
         check=_splits_has("image_00000.png", absent=("_mask.png",))),
    Case("orthonet-kaggle-single-images-folder-not-doubled-exit0", "orthonet", on_single_folder, 0,
         check=_count_rows(18)),
    Case("orthonet-kaggle-inside-a-wrapper-folder-read-from-inside-exit0", "orthonet", on_wrapper, 0,
         ("wrapper folder orthonet",), check=_count_rows(18)),
    Case("orthonet-kaggle-csv-with-unterminated-quote-exit2", "orthonet", on_bad_quotes, 2,
         ("train.csv", "cannot read"), r"check that it is a CSV"),
    Case("orthonet-kaggle-csv-with-crlf-line-endings-accepted-exit0", "orthonet", on_crlf, 0,
         check=_count_rows(18)),
    Case("orthonet-kaggle-file-names-with-spaces-unicode-and-non-utf8-matched-exit0", "orthonet",
         on_odd_names, 0, check=_both(_count_rows(18),
                                      _splits_has("knee ü 1.png", os.fsdecode(b"hip-\xff.png")))),
    Case("orthonet-class-folders-unknown-class-folder-exit2", "orthonet", on_unknown_folder, 2,
         ("unknown class folder", "Hip_Mystery_Stem"), r"name class folders by class name or code"),
    Case("orthonet-class-folders-named-by-code-accepted-exit0", "orthonet", on_code_folders, 0,
         check=_codes_resolved),
    Case("orthonet-flat-file-with-unknown-code-skipped-with-warning-exit0", "orthonet",
         on_flat_unknown_code, 0, ("99_0001.png", "unknown class code '99'"), r"skipped 1 file"),
    Case("orthonet-kaggle-csvs-and-class-folders-ambiguous-exit2", "orthonet", on_kaggle_plus_folders, 2,
         ("more than one OrthoNet layout", "Hip_Stryker_Exeter", "train.csv"), r"--manifest"),
    Case("orthonet-two-label-csvs-ambiguous-exit2", "orthonet", on_two_label_csvs, 2,
         ("labels_v1.csv", "labels_v2.csv"), r"pass the one to use with --manifest"),
    Case("orthonet-label-csv-row-whose-file-is-missing-left-out-with-warning-exit0", "orthonet",
         on_label_csv_missing_row, 0, ("labels.csv", "images/x13.png"), r"left out",
         check=_count_rows(17)),
]


# ---------------------------------------------------------------- aptos

def _ap(ctx, tree="aptos_three_way") -> Path:
    return ctx.data(tree)


def _first_id(csv: Path) -> str:
    return pd.read_csv(csv, dtype=str)["id_code"].iloc[0]


def ap_grade(value, line_index=2):
    def build(ctx):
        root = _ap(ctx)
        def edit(f):
            grades = list(f["diagnosis"])
            grades[line_index - 2] = value
            f["diagnosis"] = grades
        edit_csv(root / "train_1.csv", edit)
        return check_data(root)
    return build


def ap_no_valid(ctx):
    root = _ap(ctx)
    (root / "valid.csv").unlink()
    return check_data(root)


def ap_wrong_columns(ctx):
    root = _ap(ctx)
    edit_csv(root / "valid.csv", lambda f: f.rename(columns={"id_code": "id", "diagnosis": "label"}))
    return check_data(root)


def ap_no_val_images(ctx):
    root = _ap(ctx)
    shutil.rmtree(root / "val_images")
    return check_data(root)


def ap_missing_image(ctx):
    root = _ap(ctx)
    ident = _first_id(root / "train_1.csv")
    (root / "train_images/train_images" / f"{ident}.png").unlink()
    (ctx.tmp / "ident").write_text(ident)
    return check_data(root)


def _names_missing_id(ctx, result):
    ident = (ctx.tmp / "ident").read_text()
    assert f"{ident}.png" in result.err and "left out" in result.err, result.err
    assert ident not in splits_bytes(ctx).decode("utf-8", "surrogateescape")


def ap_both_layouts(ctx):
    root = _ap(ctx)
    shutil.copy2(root / "train_1.csv", root / "train.csv")
    return check_data(root)


def ap_only_test_csv(ctx):
    root = _ap(ctx, "aptos_competition")
    (root / "train.csv").unlink()
    return check_data(root)


def ap_no_csv(ctx):
    root = _ap(ctx, "aptos_competition")
    (root / "train.csv").unlink()
    (root / "test.csv").unlink()
    return check_data(root)


def ap_header_only(ctx):
    root = _ap(ctx, "aptos_competition")
    write(root / "train.csv", b"id_code,diagnosis\n")
    return check_data(root)


def ap_zero_byte_csv(ctx):
    root = _ap(ctx, "aptos_competition")
    write(root / "train.csv", b"")
    return check_data(root)


def ap_small_grade(ctx):
    root = _ap(ctx, "aptos_competition")
    frame = pd.read_csv(root / "train.csv", dtype=str)
    drop = frame[frame["diagnosis"] == "2"].index[2:]
    for ident in frame.loc[drop, "id_code"]:
        (root / "train_images" / f"{ident}.png").unlink()
    frame.drop(index=drop).to_csv(root / "train.csv", index=False)
    return check_data(root)


def ap_jpeg(ctx):
    root = _ap(ctx, "aptos_competition")
    ident = _first_id(root / "train.csv")
    (root / "train_images" / f"{ident}.png").unlink()
    write(root / "train_images" / f"{ident}.jpeg", jpeg_bytes(3))
    (ctx.tmp / "ident").write_text(ident)
    return check_data(root)


def _jpeg_used(ctx, result):
    ident = (ctx.tmp / "ident").read_text()
    assert f"{ident}.jpeg".encode() in splits_bytes(ctx)


def ap_non_utf8_id(ctx):
    root = _ap(ctx, "aptos_competition")
    ident = _first_id(root / "train.csv")
    new = b"\xff\xfe" + ident.encode()
    os.rename(root / "train_images" / f"{ident}.png", os.fsencode(root / "train_images") + b"/" + new + b".png")
    data = (root / "train.csv").read_bytes().replace(ident.encode(), new)
    write(root / "train.csv", data)
    return check_data(root)


def ap_excel_csv(ctx):
    root = _ap(ctx)
    for name in ("train_1.csv", "valid.csv", "test.csv"):
        data = (root / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        write(root / name, b"\xef\xbb\xbf" + data)
    return check_data(root)


def ap_duplicate_row(ctx):
    root = _ap(ctx, "aptos_competition")
    edit_csv(root / "train.csv", lambda f: pd.concat([f, f.iloc[[0]]], ignore_index=True))
    return check_data(root)


def ap_wrapper(ctx):
    shutil.copytree(ctx.trees["aptos_three_way"], ctx.inp / "downloads" / "aptos2019")
    return check_data(ctx.inp / "downloads")


def _layout_line(expected: str):
    def check(ctx, result):
        assert expected in result.out, result.out
        assert len(splits_table(ctx)) == 18
    return check


APTOS_CASES = [
    Case("aptos-train-csv-unknown-grade-7-exit2", "aptos", ap_grade("7"), 2,
         ("train_1.csv", "line 2", "'7'"), r"fix the rows"),
    Case("aptos-train-csv-grade-written-as-text-exit2", "aptos", ap_grade("severe", 3), 2,
         ("train_1.csv", "line 3", "'severe'"), r"fix the rows"),
    Case("aptos-train-csv-empty-grade-exit2", "aptos", ap_grade("", 4), 2,
         ("train_1.csv", "line 4"), r"fix the rows"),
    Case("aptos-three-way-without-valid-csv-exit2", "aptos", ap_no_valid, 2, ("valid.csv",),
         r"restore train_1.csv, valid.csv and test.csv|--manifest"),
    Case("aptos-three-way-csv-wrong-columns-exit2", "aptos", ap_wrong_columns, 2,
         ("valid.csv", "'id'", "'label'"), r"expected id_code,diagnosis"),
    Case("aptos-three-way-missing-image-folder-exit2", "aptos", ap_no_val_images, 2,
         ("valid.csv", "val_images/"), r"expected .*val_images"),
    Case("aptos-train-csv-row-whose-image-is-missing-left-out-with-warning-exit0", "aptos",
         ap_missing_image, 0, ("train_1.csv", "no image file"), r"left out", check=_names_missing_id),
    Case("aptos-three-way-and-competition-csvs-both-present-exit2", "aptos", ap_both_layouts, 2,
         ("two APTOS layouts", "train.csv", "train_1.csv"), r"move the files .* away|--manifest"),
    Case("aptos-only-the-unlabelled-competition-test-csv-exit2", "aptos", ap_only_test_csv, 2,
         ("no APTOS label CSV",), r"--image_path at that folder|--manifest"),
    Case("aptos-images-without-any-csv-exit2", "aptos", ap_no_csv, 2, ("no APTOS label CSV",),
         r"--manifest"),
    Case("aptos-train-csv-with-header-only-exit2", "aptos", ap_header_only, 2, ("train.csv", "no rows"),
         r"expected one row per image"),
    Case("aptos-zero-byte-train-csv-exit2", "aptos", ap_zero_byte_csv, 2, ("train.csv",),
         r"expected id_code,diagnosis"),
    Case("aptos-competition-grade-with-two-images-too-small-to-split-exit2", "aptos", ap_small_grade, 2,
         ("2 - Moderate", "only 2 image"), r"add images"),
    Case("aptos-jpeg-with-the-id-code-stem-accepted-exit0", "aptos", ap_jpeg, 0, check=_jpeg_used),
    Case("aptos-non-utf8-id-code-matched-and-kept-byte-exact-exit0", "aptos", ap_non_utf8_id, 0,
         check=_both(_count_rows(18), lambda ctx, r: _splits_has(os.fsdecode(b"\xff\xfe"))(ctx, r))),
    Case("aptos-csvs-saved-by-excel-with-bom-and-crlf-accepted-exit0", "aptos", ap_excel_csv, 0,
         check=_count_rows(18)),
    Case("aptos-duplicate-csv-row-kept-once-with-warning-exit0", "aptos", ap_duplicate_row, 0,
         ("listed more than once",), r"keeping the first", check=_count_rows(18)),
    Case("aptos-three-way-single-image-folders-detected-exit0", "aptos",
         lambda ctx: check_data(_ap(ctx, "aptos_three_way_single")), 0,
         check=_layout_line("APTOS three-way release")),
    Case("aptos-competition-doubled-image-folder-detected-exit0", "aptos",
         lambda ctx: check_data(_ap(ctx, "aptos_competition_doubled")), 0,
         check=_layout_line("train_images/train_images/")),
    Case("aptos-three-way-inside-a-wrapper-folder-read-from-inside-exit0", "aptos", ap_wrapper, 0,
         ("wrapper folder aptos2019",), check=_count_rows(18)),
]


# ---------------------------------------------------------------- manifests

def _manifest_tree(ctx, rows=None, header="path,label,split", name="labels.csv", folder="meta") -> Path:
    """Images under inp/images, a manifest under inp/<folder>/ with paths relative to it."""
    if rows is None:
        rows = []
        for k in range(3):
            for n in range(6):
                write_png(ctx.inp / "images" / f"g{k}_{n}.png")
                split = "test" if n == 0 else "val" if n == 1 else "train"
                rows.append(f"../images/g{k}_{n}.png,{k},{split}")
    csv = ctx.inp / folder / name
    write(csv, (header + "\n" + "\n".join(rows) + "\n").encode())
    return csv


def mf_missing(ctx):
    return ["--check_data", "--manifest", str(ctx.inp / "labels.csv")]


def mf_no_label(ctx):
    csv = _manifest_tree(ctx)
    write(csv, csv.read_bytes().replace(b"path,label,split", b"path,grade,split"))
    return ["--check_data", "--manifest", str(csv)]


def mf_listed_missing(ctx):
    csv = _manifest_tree(ctx)
    (ctx.inp / "images" / "g1_3.png").unlink()
    return ["--check_data", "--manifest", str(csv)]


def mf_unknown_label(ctx):
    csv = _manifest_tree(ctx)
    write(csv, csv.read_bytes().replace(b"g2_4.png,2,", b"g2_4.png,9,"))
    return ["--check_data", "--manifest", str(csv)]


def mf_unknown_split(ctx):
    csv = _manifest_tree(ctx)
    write(csv, csv.read_bytes().replace(b"g0_0.png,0,test", b"g0_0.png,0,holdout"))
    return ["--check_data", "--manifest", str(csv)]


def mf_blank_split(ctx):
    csv = _manifest_tree(ctx)
    write(csv, csv.read_bytes().replace(b"g0_0.png,0,test", b"g0_0.png,0,"))
    return ["--check_data", "--manifest", str(csv)]


def mf_with_image_path(ctx):
    csv = _manifest_tree(ctx)
    return ["--check_data", "--manifest", str(csv), "--image_path", str(ctx.data("aptos_three_way"))]


def mf_with_image_path_run(ctx):
    csv = _manifest_tree(ctx)
    return ["--model", "clip", "--manifest", str(csv), "--image_path", str(ctx.data("aptos_three_way"))]


def mf_header_only(ctx):
    csv = _manifest_tree(ctx, rows=[])
    return ["--check_data", "--manifest", str(csv)]


def mf_relative(ctx):
    csv = _manifest_tree(ctx)
    return ["--check_data", "--manifest", str(csv)]


def _relative_resolved(ctx, result):
    paths = list(splits_table(ctx)["path"])
    assert len(paths) == 18 and all(Path(p).is_absolute() and Path(p).is_file() for p in paths), paths[:3]


def mf_png(ctx):
    write_png(ctx.inp / "labels.png")
    return ["--check_data", "--manifest", str(ctx.inp / "labels.png")]


def mf_folder(ctx):
    (ctx.inp / "manifests").mkdir()
    return ["--check_data", "--manifest", str(ctx.inp / "manifests")]


MANIFEST_CASES = [
    Case("manifest-file-does-not-exist-exit2", "aptos", mf_missing, 2, ("labels.csv", "not found"),
         r"pass a CSV with columns path,label"),
    Case("manifest-without-a-label-column-exit2", "aptos", mf_no_label, 2, ("labels.csv", "grade"),
         r"expected path,label"),
    Case("manifest-listed-file-not-found-exit2", "aptos", mf_listed_missing, 2,
         ("labels.csv", "g1_3.png", "not found"), r"fix the paths or remove the rows"),
    Case("manifest-unknown-aptos-label-exit2", "aptos", mf_unknown_label, 2, ("labels.csv", "'9'"),
         r"labels must be APTOS grades 0-4"),
    Case("manifest-unknown-split-value-exit2", "aptos", mf_unknown_split, 2, ("labels.csv", "holdout"),
         r"use train, val .* or test"),
    Case("manifest-blank-split-on-one-row-exit2", "aptos", mf_blank_split, 2, ("labels.csv", "split"),
         r"use train, val .* or test|give every image a split"),
    Case("manifest-with-image-path-too-check-data-exit2", "aptos", mf_with_image_path, 2,
         ("--image_path", "--manifest"), r"pass one of them"),
    Case("manifest-with-image-path-too-in-a-run-exit2", "aptos", mf_with_image_path_run, 2,
         ("--image_path", "--manifest"), r"pass one of them"),
    Case("manifest-with-header-only-exit2", "aptos", mf_header_only, 2, ("labels.csv", "no rows"),
         r"add one row per image"),
    Case("manifest-relative-paths-resolve-against-the-csv-folder-exit0", "aptos", mf_relative, 0,
         check=_relative_resolved),
    Case("manifest-that-is-a-png-exit2", "aptos", mf_png, 2, ("labels.png",), r"expected path,label|CSV"),
    Case("manifest-that-is-a-folder-exit2-says-it-is-a-folder", "aptos", mf_folder, 2, ("manifests", "folder"),
         r"pass a CSV"),
]


ALL_CASES = PACEMAKER_CASES + ORTHONET_CASES + APTOS_CASES + MANIFEST_CASES


@pytest.mark.parametrize("case", params(ALL_CASES))
def test_bad_input(case: Case, tmp_path, trees, capsys):
    problems = run_case(case, tmp_path, trees, capsys)
    assert not problems, "\n".join(problems)
