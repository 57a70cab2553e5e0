"""The bad-input matrix (issue 13, deliverable 1): what a new user gets wrong, and what they see.

Every case runs an entry script's ``main(spec, argv)`` in-process on inputs built for it and
asserts, besides its own particulars:

* the exit code (2 for bad input or usage; 0 where skipping with a warning is right);
* for exit 2: exactly one ``error:`` line, naming the file, value or flag at fault and saying
  what to do; for exit 0: the warning names the file and says what was done about it;
* that no ``Traceback`` is printed;
* that the input tree - everything the user gave: dataset folder, manifest, neuron, weights and
  probe files, an ``--out`` that already existed - is byte-identical afterwards (names, bytes,
  permissions and mtimes).

Each case's id states the case and the behaviour a user would expect.  Cases where the current
code does not do that would be marked ``xfail(strict=True)`` with what happens instead (a strict
xfail that passes fails, so the mark goes as soon as the code is fixed); none is marked now.

Most cases stop before any model work (``--check_data``, config checks, file checks).  The few
that need a whole run (caches, decode errors, reference probes, odd names end to end) use the
demo's planted model on a small synthetic tree; they share one clean run and copies of its
cache, and are marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import re
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common.app.cli import main
from common.demo.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[2]


def _entry_spec(script: str):
    """The ``DATASET`` spec of an entry script (loaded by path: they are not a package)."""
    spec = importlib.util.spec_from_file_location(f"_entry_{script}", ROOT / f"test_{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DATASET


SPECS = {name: _entry_spec(name) for name in ("pacemaker", "orthonet", "aptos")}

# The demo runs' statistics and figures trimmed (one probe seed, fewer resamples and images).
FAST = ["--set", "probe_seeds=(0,)", "--set", "bootstrap_resamples=200", "--set", "figure_images=1",
        "--set", "analysis_images=16"]

PACEMAKER_CLASSES = ("MDT - Adapta", "MDT - Advisa", "STJ - Assurity")


# ============================================================================================
# images and files


def _noise(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _seed_of(path) -> int:
    return zlib.crc32(os.fsencode(path))


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    stream = io.BytesIO()
    Image.fromarray(_noise(seed, size)).save(stream, format="PNG")
    return stream.getvalue()


def jpeg_bytes(seed: int = 0, size: int = 32, mode: str = "RGB") -> bytes:
    stream = io.BytesIO()
    image = Image.fromarray(_noise(seed, size))
    if mode == "CMYK":
        image = image.convert("CMYK")
    image.save(stream, format="JPEG", quality=90)
    return stream.getvalue()


def write(path, data: bytes) -> None:
    """Write ``data`` at ``path`` (str, Path or bytes: names that are not UTF-8 go as bytes)."""
    path = os.fsencode(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def write_png(path) -> None:
    write(path, png_bytes(_seed_of(path)))


def truncated_png(path) -> None:
    data = png_bytes(_seed_of(path), 48)
    write(path, data[: len(data) // 2])


def truncated_jpeg(path) -> None:
    data = jpeg_bytes(_seed_of(path), 48)
    write(path, data[: len(data) // 2])


def appledouble(path) -> None:
    """What macOS leaves beside a file on a non-Mac disk: ``._name`` with the AppleDouble magic."""
    write(path, b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64)


def png16(path) -> None:
    """16-bit greyscale PNG using the full 0..65535 range."""
    values = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    stream = io.BytesIO()
    Image.fromarray(values).save(stream, format="PNG")
    write(path, stream.getvalue())


def corrupt_pixel_png(path) -> None:
    """A PNG whose chunks and CRCs are all valid (so ``verify()`` passes) but whose IDAT holds
    a broken zlib stream: the cheap check passes, the full decode fails."""
    data = png_bytes(_seed_of(path))
    out, pos = data[:8], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            body = b"\x78\x9c" + bytes((i * 37 + 11) % 256 for i in range(len(body) - 2))
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        pos += 12 + length
    write(path, out)


def bomb_png(path) -> None:
    """A small file whose PNG header claims 20000 x 20000 pixels (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    write(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
          + chunk(b"IEND", b""))


class _RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: proof that code from a file was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def code_pickle(path, marker: Path, *, torch_format: bool) -> None:
    """A file that runs code when unpickled: raw pickle, or torch.save's zip format."""
    payload = [(0, 0, 1.0), _RunsCode(str(marker))]
    if torch_format:
        torch.save(payload, str(path))
    else:
        write(path, pickle.dumps(payload, protocol=2))


def edit_csv(path: Path, edit: Callable[[pd.DataFrame], pd.DataFrame | None]) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    result = edit(frame)
    (frame if result is None else result).to_csv(path, index=False)


def snapshot(root: Path) -> dict:
    """Names (as bytes), permissions, mtimes and contents of everything under ``root``."""
    result = {}
    base = os.fsencode(root)
    if not os.path.lexists(base):
        return result
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            info = os.lstat(full)
            rel = os.path.relpath(full, base)
            if stat.S_ISLNK(info.st_mode):
                result[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(info.st_mode):
                result[rel] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                with open(full, "rb") as fh:
                    result[rel] = ("file", stat.S_IMODE(info.st_mode), info.st_mtime_ns, fh.read())
    return result


# ============================================================================================
# shared synthetic trees (session-scoped, copied per case)

TREE_LAYOUTS = {
    "pacemaker": ("pacemaker", "folders"),
    "orthonet_kaggle": ("orthonet", "kaggle"),
    "orthonet_folders": ("orthonet", "folders"),
    "orthonet_flat": ("orthonet", "flat"),
    "aptos_three_way": ("aptos", "three_way"),
    "aptos_three_way_single": ("aptos", "three_way_single"),
    "aptos_competition": ("aptos", "competition"),
    "aptos_competition_doubled": ("aptos", "competition_doubled"),
}


@pytest.fixture(scope="session")
def trees(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bad_input_trees")
    return {key: make_synthetic(name, base / key, classes=3, per_class=6, image_size=32, seed=0, layout=layout)
            for key, (name, layout) in TREE_LAYOUTS.items()}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No case may reach the network or the user's caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("TTR_CACHE_DIR", str(tmp_path / "ttr_cache_env"))


@dataclass
class Ctx:
    """What a case builds its inputs with: ``inp`` holds everything the user gives (snapshotted
    before and after), ``out`` and ``cache`` are where the run may write."""

    tmp: Path
    trees: dict[str, Path]
    inp: Path = field(init=False)
    out: Path = field(init=False)
    cache: Path = field(init=False)
    marker: Path = field(init=False)

    def __post_init__(self):
        self.inp = self.tmp / "in"
        self.inp.mkdir()
        self.out = self.tmp / "out"
        self.cache = self.tmp / "cache"
        self.marker = self.tmp / "code-was-executed"

    def data(self, tree: str, dest: str = "data") -> Path:
        """A private copy of a shared synthetic tree under ``inp``."""
        target = self.inp / dest
        shutil.copytree(self.trees[tree], target)
        return target


@dataclass
class Result:
    code: int
    out: str
    err: str
    message: str          # the error line (exit 2), else stdout + stderr
    errors: list = field(default_factory=list)   # every line that reads as an error line

    @property
    def text(self) -> str:
        return self.out + self.err


@dataclass
class Case:
    id: str
    script: str
    build: Callable[[Ctx], list[str]]
    exit: int | tuple[int, ...]
    names: tuple[str, ...] = ()           # each must appear in the message
    advice: str | None = None             # regex: what to do (exit 2) / what was done (exit 0)
    check: Callable[[Ctx, Result], None] | None = None
    xfail: str | None = None
    slow: bool = False
    subprocess: bool = False              # in a fresh process (see run_subprocess)

    def param(self):
        marks = []
        if self.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=self.xfail))
        if self.slow:
            marks.append(pytest.mark.slow)
        return pytest.param(self, id=self.id, marks=marks)


def _with_defaults(argv: list[str], ctx: Ctx) -> list[str]:
    """Every case writes only under its own tmp folder: --out and --cache_dir added if absent."""
    argv = list(argv)
    if "--out" not in argv:
        argv += ["--out", str(ctx.out)]
    if "--cache_dir" not in argv:
        argv += ["--cache_dir", str(ctx.cache)]
    return argv


def run_main(script: str, argv: list[str], capsys) -> Result:
    capsys.readouterr()
    try:
        code = main(SPECS[script], argv)
    except SystemExit as exit_:        # argparse's usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ") or ": error: " in line]
    message = errors[0] if len(errors) == 1 else out + err
    return Result(code, out, err, message, errors)


def run_subprocess(script: str, argv: list[str], tmp: Path) -> Result:
    """The entry script in a fresh interpreter with empty hub and torch caches: the only way to be
    sure no weights are cached (the hub library reads its cache location once, at import)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "1",
           "TORCH_HOME": str(tmp / "torch_home"), "XDG_CACHE_HOME": str(tmp / "xdg_cache")}
    done = subprocess.run([sys.executable, str(ROOT / f"test_{script}.py"), *argv], cwd=tmp, env=env,
                          capture_output=True, text=True, errors="backslashreplace", timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ") or ": error: " in line]
    message = errors[0] if len(errors) == 1 else done.stdout + done.stderr
    return Result(done.returncode, done.stdout, done.stderr, message, errors)


def check_common(case: Case, ctx: Ctx, result: Result, before: dict, after: dict) -> None:
    shown = f"exit {result.code}\n--- stdout\n{result.out[-3000:]}\n--- stderr\n{result.err[-5000:]}"
    # Safety first, so that a wording problem (an xfail) can never hide it.
    assert not ctx.marker.exists(), "code inside a user's file was executed"
    allowed = case.exit if isinstance(case.exit, tuple) else (case.exit,)
    assert result.code in allowed, shown
    assert "Traceback" not in result.text, shown
    assert before == after, "the user's input files were modified: " + ", ".join(
        sorted(os.fsdecode(k) for k in set(before) | set(after) if before.get(k) != after.get(k))[:10])
    if result.code == 2:
        assert len(result.errors) == 1, f"expected exactly one error line\n{shown}"
    for name in case.names:
        assert name in result.message, f"message does not name {name!r}:\n{result.message[-3000:]}"
    if case.advice is not None:
        assert re.search(case.advice, result.message), \
            f"message does not say what to do ({case.advice!r}):\n{result.message[-3000:]}"


def splits_bytes(ctx: Ctx) -> bytes:
    return (ctx.out / "splits.csv").read_bytes()


def splits_table(ctx: Ctx) -> pd.DataFrame:
    return pd.read_csv(ctx.out / "splits.csv", dtype=str, keep_default_na=False,
                       encoding="utf-8", encoding_errors="surrogateescape")


# ============================================================================================
# the cases that stop before any model work

def check_data(root) -> list[str]:
    return ["--check_data", "--image_path", str(root)]


def clip_run(ctx: Ctx, *extra: str) -> list[str]:
    """A real-model (CLIP ViT-B/16) run on a small tree: config errors come before weights."""
    return ["--model", "clip", "--image_path", str(ctx.data("pacemaker")), *extra]


def dinov2_run(ctx: Ctx, *extra: str) -> list[str]:
    return ["--model", "dinov2", "--image_path", str(ctx.data("pacemaker")), *extra]


def demo_on(ctx: Ctx, root, *extra: str, model: str = "clip") -> list[str]:
    return ["--model", model, "--demo", "--image_path", str(root), *FAST, *extra]


def _splits_has(*names: str, absent: tuple[str, ...] = ()):
    def check(ctx: Ctx, result: Result) -> None:
        data = splits_bytes(ctx)
        for name in names:
            assert os.fsencode(name) in data, f"{name!r} not in splits.csv"
        for name in absent:
            assert os.fsencode(name) not in data, f"{name!r} should not be in splits.csv"
    return check


def _no_skip_warning(ctx: Ctx, result: Result) -> None:
    assert "skipped" not in result.err.lower(), result.err
    assert "Skipped files: 0" in result.out, result.out


def _both(*checks):
    def check(ctx: Ctx, result: Result) -> None:
        for c in checks:
            c(ctx, result)
    return check


def _count_rows(expected: int):
    def check(ctx: Ctx, result: Result) -> None:
        assert len(splits_table(ctx)) == expected
    return check


# ---------------------------------------------------------------- pacemaker

TRAIN_A = "Train/MDT - Adapta"


def _pm(ctx: Ctx) -> Path:
    return ctx.data("pacemaker")


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
         ("pacemaker.zip", "not a folder"), r"expected class folders"),
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
    Case("pacemaker-readme-xlsx-thumbs-db-ds-store-ignored-silently-exit0", "pacemaker", pm_non_images, 0,
         check=_both(_no_skip_warning, _count_rows(18))),
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


# ---------------------------------------------------------------- flags

def _cuda_device_that_does_not_exist() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


FLAG_CASES = [
    Case("flag-num-workers-minus-1-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--num_workers", "-1"), 2,
         ("num_workers", "-1"), r"use an integer >= 0"),
    Case("flag-batch-size-0-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--batch_size", "0"), 2,
         ("batch_size=0",), r"at least 1"),
    Case("flag-detect-images-0-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--detect_images", "0"), 2,
         ("detect_images=0",), r"at least 1"),
    Case("flag-unknown-model-vit-exit2", "pacemaker",
         lambda ctx: ["--model", "vit", "--image_path", str(_pm(ctx))], 2,
         ("--model", "'vit'"), r"choose from"),
    Case("flag-device-cuda-not-available-exit2", "pacemaker",
         lambda ctx: clip_run(ctx, "--device", _cuda_device_that_does_not_exist()), 2,
         ("cuda",), r"use --device cpu|pick an index"),
    Case("flag-device-tpu-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--device", "tpu"), 2,
         ("'tpu'",), r"use auto, cpu, cuda"),
    Case("flag-model-missing-exit2", "pacemaker", lambda ctx: ["--image_path", str(_pm(ctx))], 2,
         ("--model",), r"clip, dinov2"),
    Case("flag-run-without-image-path-or-manifest-exit2", "pacemaker", lambda ctx: ["--model", "clip"], 2,
         ("--image_path",), r"--manifest FILE|--demo"),
    Case("flag-seed-not-an-integer-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--seed", "one"), 2,
         ("--seed", "'one'"), r"invalid int"),
    Case("flag-seed-negative-exit2-names-the-seed", "pacemaker",
         lambda ctx: check_data(_pm(ctx)) + ["--seed", "-1"], 2, ("seed", "-1"), r"use .*0"),
    Case("flag-demo-with-weights-exit2", "pacemaker",
         lambda ctx: ["--model", "clip", "--demo", "--weights", str(ctx.inp / "w.bin")], 2,
         ("--demo", "--weights"), r"do not apply"),
    Case("flag-detect-path-not-a-folder-exit2", "pacemaker",
         lambda ctx: demo_on(ctx, _pm(ctx), "--detect_path", str(ctx.inp / "no such folder")), 2,
         ("--detect_path", "no such folder"), r"pass a folder of images"),
]


# ---------------------------------------------------------------- --set

def _set(model_run, *pairs):
    def build(ctx):
        extra = []
        for pair in pairs:
            extra += ["--set", pair]
        return model_run(ctx, *extra)
    return build


SET_CASES = [
    Case("set-unknown-key-exit2-lists-valid-keys", "pacemaker", _set(clip_run, "top_kk=3"), 2,
         ("top_kk", "unknown config key"), r"valid keys: .*top_k"),
    Case("set-top-k-not-a-number-exit2", "pacemaker", _set(clip_run, "top_k=many"), 2,
         ("top_k", "many"), r"expected an integer"),
    Case("set-batch-size-float-exit2", "pacemaker", _set(clip_run, "batch_size=2.5"), 2,
         ("batch_size", "2.5"), r"expected an integer"),
    Case("set-without-equals-sign-exit2", "pacemaker", _set(clip_run, "top_k"), 2,
         ("top_k",), r"expected KEY=VALUE"),
    Case("set-detect-outliers-layer-12-above-clip-depth-exit2", "pacemaker",
         _set(clip_run, "detect_outliers_layer=12"), 2, ("detect_outliers_layer=12", "12-layer"), r"use -12\.\.11"),
    Case("set-detect-outliers-layer-minus-13-below-clip-depth-exit2", "pacemaker",
         _set(clip_run, "detect_outliers_layer=-13"), 2, ("detect_outliers_layer=-13",), r"use -12\.\.11"),
    Case("set-highest-layer-24-above-dinov2-depth-exit2", "pacemaker", _set(dinov2_run, "highest_layer=24"), 2,
         ("highest_layer=24", "24-layer"), r"use 0\.\.23"),
    Case("set-highest-layer-minus-1-exit2", "pacemaker", _set(dinov2_run, "highest_layer=-1"), 2,
         ("highest_layer=-1",), r"use 0\.\.23"),
    Case("set-highest-layer-6-above-demo-model-depth-exit2", "pacemaker",
         lambda ctx: demo_on(ctx, _pm(ctx), "--set", "highest_layer=6"), 2,
         ("highest_layer=6", "6-layer"), r"use 0\.\.5"),
    Case("set-top-k-0-exit2", "pacemaker", _set(clip_run, "top_k=0"), 2, ("top_k=0",), r"at least 1"),
    Case("set-top-k-above-the-models-neuron-count-exit2", "pacemaker", _set(clip_run, "top_k=100000"), 2,
         ("top_k=100000",), r"use 1\.\.36864"),
    Case("set-normal-values-median-exit2", "pacemaker", _set(clip_run, "normal_values=median"), 2,
         ("normal_values", "median"), r"use one of zero, mean, only_outliers, same"),
    Case("set-extra-modes-bogus-exit2", "pacemaker", _set(clip_run, "extra_modes=bogus"), 2,
         ("extra_modes", "bogus"), r"valid: "),
    Case("set-val-fraction-1.2-exit2", "pacemaker", _set(clip_run, "val_fraction=1.2"), 2,
         ("val_fraction=1.2",), r"each must be in \(0, 1\)"),
    Case("set-val-plus-test-fraction-1-exit2", "pacemaker",
         _set(clip_run, "val_fraction=0.5", "test_fraction=0.5"), 2, ("val_fraction=0.5", "test_fraction=0.5"),
         r"sum below 1"),
    Case("set-register-norm-threshold-negative-exit2", "pacemaker",
         _set(clip_run, "register_norm_threshold=-5"), 2, ("register_norm_threshold", "-5"),
         r"expected a positive number or 'auto'"),
    Case("set-num-registers-0-exit2", "pacemaker", _set(clip_run, "num_registers=0"), 2,
         ("num_registers=0",), r"at least 1"),
    Case("set-scale-nan-exit2", "pacemaker", _set(clip_run, "scale=nan"), 2, ("scale",),
         r"expected a finite number"),
    Case("set-dinov2-backbone-size-unknown-exit2", "pacemaker", _set(dinov2_run, "backbone_size=vitx99"), 2,
         ("vitx99",), r"vitl14"),
    Case("set-precision-fp16-exit2", "pacemaker", _set(clip_run, "precision=fp16"), 2,
         ("precision", "fp16"), r"use one of auto, fp32, bf16"),
    Case("set-feature-patch-exit2", "pacemaker", _set(clip_run, "feature=patch"), 2,
         ("feature", "patch"), r"use one of cls, patch_mean"),
    Case("set-probe-seeds-text-exit2", "pacemaker", _set(clip_run, "probe_seeds=abc"), 2,
         ("probe_seeds",), r"expected integers"),
]


# ---------------------------------------------------------------- weights

def w_missing(ctx):
    return clip_run(ctx, "--weights", str(ctx.inp / "open_clip_pytorch_model.bin"))


def w_garbage(ctx):
    write(ctx.inp / "weights.bin", b"<html>Access denied</html>\n" * 10)
    return clip_run(ctx, "--weights", str(ctx.inp / "weights.bin"))


def w_other_model(ctx):
    torch.save({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, str(ctx.inp / "probe.pth"))
    return clip_run(ctx, "--weights", str(ctx.inp / "probe.pth"))


def w_code(ctx):
    code_pickle(ctx.inp / "weights.pt", ctx.marker, torch_format=True)
    return clip_run(ctx, "--weights", str(ctx.inp / "weights.pt"))


def w_code_raw(ctx):
    code_pickle(ctx.inp / "weights.bin", ctx.marker, torch_format=False)
    return clip_run(ctx, "--weights", str(ctx.inp / "weights.bin"))


def w_folder(ctx):
    (ctx.inp / "checkpoints").mkdir()
    return clip_run(ctx, "--weights", str(ctx.inp / "checkpoints"))


def w_dinov2_garbage(ctx):
    write(ctx.inp / "dinov2_vits14_pretrain.pth", b"\x00" * 4096)
    return dinov2_run(ctx, "--set", "backbone_size=vits14", "--set", "highest_layer=9",
                      "--weights", str(ctx.inp / "dinov2_vits14_pretrain.pth"))


def _no_unsafe_hint(ctx: Ctx, result: Result) -> None:
    """A file that may be untrusted: the line must not pass on torch's hint to load it unsafely."""
    assert "set to `False`" not in result.message, result.message


CLIP_WEIGHTS_LINE = ("the CLIP loader's line is '--weights FILE: not an open_clip ViT-B-16 checkpoint (<first line "
                     "of the library's error>)' with nothing on what to do (the DINOv2 loader ends with '; pass a "
                     ".safetensors, .pth or .bin file')")

WEIGHTS_CASES = [
    Case("weights-missing-file-exit2", "pacemaker", w_missing, 2, ("--weights", "open_clip_pytorch_model.bin"),
         r"no such file; pass the path"),
    Case("weights-garbage-file-exit2", "pacemaker", w_garbage, 2, ("--weights", "weights.bin"),
         r"; pass ", check=_no_unsafe_hint),
    Case("weights-state-dict-of-another-model-exit2", "pacemaker", w_other_model, 2,
         ("--weights", "probe.pth"), r"; pass ", check=_no_unsafe_hint),
    Case("weights-torch-file-that-would-run-code-refused-without-running-it-exit2", "pacemaker", w_code, 2,
         ("--weights", "weights.pt"), r"; pass ", check=_no_unsafe_hint),
    Case("weights-raw-pickle-refused-without-running-it-exit2", "pacemaker", w_code_raw, 2,
         ("--weights", "weights.bin"), r"; pass ", check=_no_unsafe_hint),
    Case("weights-path-is-a-folder-exit2-says-it-is-a-folder", "pacemaker", w_folder, 2,
         ("--weights", "checkpoints", "folder"), r"pass the path of a downloaded checkpoint"),
    Case("weights-none-and-hub-offline-exit2-says-what-to-fetch", "pacemaker", lambda ctx: clip_run(ctx), 2,
         ("open_clip_pytorch_model.bin", "--weights"), r"download .* and pass it with --weights", subprocess=True),
    Case("weights-dinov2-garbage-file-exit2", "pacemaker", w_dinov2_garbage, 2,
         ("--weights", "dinov2_vits14_pretrain.pth"), r"; pass a .safetensors, .pth or .bin file"),
]


# ---------------------------------------------------------------- neuron files

def _neurons(ctx, name, data: bytes | None = None) -> str:
    path = ctx.inp / name
    if data is not None:
        write(path, data)
    return str(path)


def _json_ranking(identity: dict | None, ranked) -> bytes:
    return json.dumps({"format": "ttr-register-neurons/2", "source": "detected", "model": identity,
                       "register_norm_threshold": 150, "detect_outliers_layer": -2,
                       "ranked": ranked}).encode()


DINOV2_L = {"family": "dinov2", "architecture": "vit_large_patch14_dinov2", "layers": 24, "mlp_width": 4096,
            "weights": "vit_large_patch14_dinov2.lvd142m"}


def n_torch(ctx, name, obj):
    torch.save(obj, str(ctx.inp / name))
    return clip_run(ctx, "--neurons", str(ctx.inp / name))


def n_code(torch_format):
    def build(ctx):
        code_pickle(ctx.inp / "register_neurons.pt", ctx.marker, torch_format=torch_format)
        return clip_run(ctx, "--neurons", str(ctx.inp / "register_neurons.pt"))
    return build


def n_claims_demo_model(ctx):
    from common.demo.demo import demo_model

    identity = demo_model("clip", 0).backbone.identity.as_dict()
    path = _neurons(ctx, "edited_neurons.json", _json_ranking(identity, [[2, 999, 5.0], [2, 1, 4.0]]))
    return demo_on(ctx, _pm(ctx), "--neurons", path)


NEURON_CASES = [
    Case("neurons-json-with-a-text-layer-exit2", "pacemaker",
         lambda ctx: clip_run(ctx, "--neurons", _neurons(ctx, "register_neurons.json",
                                                        _json_ranking(None, [["fourteen", 2110, 9.0]]))), 2,
         ("--neurons", "register_neurons.json", "fourteen"), r"pass a register_neurons.json written by a run"),
    Case("neurons-json-of-this-model-with-an-entry-beyond-its-mlp-width-exit2", "pacemaker", n_claims_demo_model, 2,
         ("--neurons", "edited_neurons.json", "(2, 999)"), r"another model|pass|detect"),
    Case("neurons-missing-file-exit2", "pacemaker",
         lambda ctx: clip_run(ctx, "--neurons", _neurons(ctx, "register_neurons.json")), 2,
         ("--neurons", "register_neurons.json", "no such file"), r"pass a register_neurons.json"),
    Case("neurons-malformed-json-exit2", "pacemaker",
         lambda ctx: clip_run(ctx, "--neurons", _neurons(ctx, "register_neurons.json", b'{"ranked": [[1, 2,')), 2,
         ("--neurons", "register_neurons.json"), r"pass a register_neurons.json written by a run"),
    Case("neurons-json-of-another-model-exit2-names-both-models", "pacemaker",
         lambda ctx: clip_run(ctx, "--neurons", _neurons(ctx, "dinov2_neurons.json",
                                                        _json_ranking(DINOV2_L, [[14, 2110, 9.0], [15, 1714, 8.0]]))),
         2, ("--neurons", "dinov2_neurons.json", "vit_large_patch14_dinov2", "ViT-B-16"),
         r"detect on this model or pass its own"),
    Case("neurons-json-with-empty-ranking-exit2", "pacemaker",
         lambda ctx: clip_run(ctx, "--neurons", _neurons(ctx, "empty.json", _json_ranking(None, []))), 2,
         ("--neurons", "empty.json", "empty"), r"detect|pass"),
    Case("neurons-pt-holding-a-dict-not-a-ranking-exit2", "pacemaker",
         lambda ctx: n_torch(ctx, "best_model_ttr.pth", {"fc.weight": torch.zeros(2, 3)}), 2,
         ("--neurons", "best_model_ttr.pth", "dict"), r"pass the course project's register_neurons.pt"),
    Case("neurons-pt-ranking-layer-out-of-bounds-exit2", "pacemaker",
         lambda ctx: n_torch(ctx, "register_neurons.pt", [(30, 5, 2.0), (3, 7, 1.0)]), 2,
         ("--neurons", "register_neurons.pt", "(30, 5)"), r"belongs to another model"),
    Case("neurons-pt-ranking-neuron-beyond-mlp-width-exit2", "pacemaker",
         lambda ctx: n_torch(ctx, "register_neurons.pt", [(3, 5000, 2.0)]), 2,
         ("--neurons", "register_neurons.pt", "(3, 5000)"), r"belongs to another model"),
    Case("neurons-raw-pickle-that-would-run-code-refused-exit2", "pacemaker", n_code(False), 2,
         ("--neurons", "register_neurons.pt"), r"pass a course register_neurons.pt"),
    Case("neurons-torch-save-that-would-run-code-refused-exit2", "pacemaker", n_code(True), 2,
         ("--neurons", "register_neurons.pt"), r"pass a course register_neurons.pt"),
    Case("neurons-paper-with-clip-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--neurons", "paper"), 2,
         ("--neurons paper", "DINOv2 ViT-L/14"), r"detect instead or pass a JSON"),
    Case("neurons-paper-with-demo-exit2", "pacemaker",
         lambda ctx: ["--model", "dinov2", "--demo", "--neurons", "paper"], 2,
         ("--demo", "--neurons paper"), r"do not apply"),
    Case("neurons-path-is-a-folder-exit2", "pacemaker",
         lambda ctx: (ctx.inp / "neurons").mkdir() or clip_run(ctx, "--neurons", str(ctx.inp / "neurons")), 2,
         ("--neurons", "neurons"), r"pass a register_neurons.json"),
]


# ---------------------------------------------------------------- output folders

def _finished(folder: Path, dataset: str, model: str) -> None:
    write(folder / "config.json", json.dumps({"dataset": dataset, "model": model, "status": "done"}).encode())
    write(folder / "metrics.csv", b"mode,top1\nno-ttr,0.9\nttr,0.91\n")


def out_file(ctx):
    write(ctx.inp / "results.txt", b"my notes\n")
    return clip_run(ctx, "--out", str(ctx.inp / "results.txt"))


def out_file_check(ctx):
    write(ctx.inp / "results.txt", b"my notes\n")
    return check_data(_pm(ctx)) + ["--out", str(ctx.inp / "results.txt")]


def out_below_file(ctx):
    write(ctx.inp / "results.txt", b"my notes\n")
    return clip_run(ctx, "--out", str(ctx.inp / "results.txt" / "run1"))


def out_unwritable(ctx):
    folder = ctx.inp / "readonly"
    folder.mkdir()
    os.chmod(folder, 0o500)
    try:
        probe = folder / "probe"
        probe.write_bytes(b"")
    except OSError:
        return clip_run(ctx, "--out", str(folder / "run1"))
    probe.unlink()
    os.chmod(folder, 0o700)
    pytest.skip("chmod 0o500 does not stop this user (root) from writing: cannot build the case")


def out_other_dataset(ctx):
    _finished(ctx.inp / "run_aptos", "aptos", "clip")
    return clip_run(ctx, "--out", str(ctx.inp / "run_aptos"))


def out_other_model(ctx):
    _finished(ctx.inp / "run_dinov2", "pacemaker", "dinov2")
    return clip_run(ctx, "--out", str(ctx.inp / "run_dinov2"))


def out_check_data_finished(ctx):
    _finished(ctx.inp / "run_pacemaker", "pacemaker", "clip")
    return check_data(_pm(ctx)) + ["--out", str(ctx.inp / "run_pacemaker")]


def out_is_dataset(ctx):
    root = ctx.data("orthonet_folders")
    return check_data(root) + ["--out", str(root)]


def out_users_own_file(ctx):
    write(ctx.inp / "project" / "splits.csv", b"path,label,split\nmy/own/split.png,1,train\n")
    return check_data(_pm(ctx)) + ["--out", str(ctx.inp / "project")]


OUT_CASES = [
    Case("out-is-the-dataset-folder-exit2-dataset-untouched", "orthonet", out_is_dataset, 2,
         ("--out", "data"), r"pass another --out|outside"),
    Case("out-folder-holding-the-users-own-splits-csv-exit2-file-untouched", "pacemaker", out_users_own_file, 2,
         ("--out", "project", "splits.csv"), r"pass another --out|move"),
    Case("out-is-an-existing-file-exit2", "pacemaker", out_file, 2, ("--out", "results.txt", "is a file"),
         r"pass a folder"),
    Case("out-is-an-existing-file-with-check-data-exit2", "pacemaker", out_file_check, 2,
         ("--out", "results.txt", "is a file"), r"pass a folder"),
    Case("out-below-an-existing-file-exit2", "pacemaker", out_below_file, 2, ("--out", "results.txt"),
         r"pass a writable folder"),
    Case("out-in-an-unwritable-folder-exit2", "pacemaker", out_unwritable, 2, ("--out", "readonly"),
         r"pass a writable folder"),
    Case("out-holds-a-finished-run-of-another-dataset-exit2", "pacemaker", out_other_dataset, 2,
         ("--out", "run_aptos", "aptos"), r"pass another --out"),
    Case("out-holds-a-finished-run-of-another-model-exit2", "pacemaker", out_other_model, 2,
         ("--out", "run_dinov2", "dinov2"), r"pass another --out"),
    Case("check-data-into-a-finished-run-exit2-files-untouched", "pacemaker", out_check_data_finished, 2,
         ("--out", "run_pacemaker", "finished run"), r"pass another --out"),
]


# ---------------------------------------------------------------- the reference probes flag (fast part)

def rp_missing(ctx):
    return clip_run(ctx, "--reference_probes", str(ctx.inp / "Trained_Models" / "pacemaker_clip"))


FAST_MISC_CASES = [
    Case("reference-probes-folder-does-not-exist-exit2", "pacemaker", rp_missing, 2,
         ("--reference_probes", "pacemaker_clip"), r"pass the course project's"),
]


# ---------------------------------------------------------------- decode errors

def dec_worker(ctx):
    root = _pm(ctx)
    corrupt_pixel_png(root / TRAIN_A / "0002.png")
    return demo_on(ctx, root, "--set", "num_workers=1")


def _decode_named(ctx, result):
    if result.code == 0:
        assert re.search(r"skipped 1 file", result.err), result.err


DECODE_CASES = [
    Case("pacemaker-png-with-corrupt-pixel-data-in-a-loader-worker-exit2-or-skipped-names-file-no-worker-traceback",
         "pacemaker", dec_worker, (0, 2), ("Train/MDT - Adapta/0002.png",), r"replace or remove|skipped",
         check=_decode_named, slow=True),
]


ALL_FAST_CASES = (PACEMAKER_CASES + ORTHONET_CASES + APTOS_CASES + MANIFEST_CASES + FLAG_CASES + SET_CASES
                  + WEIGHTS_CASES + NEURON_CASES + OUT_CASES + FAST_MISC_CASES + DECODE_CASES)


@pytest.mark.parametrize("case", [c.param() for c in ALL_FAST_CASES])
def test_bad_input(case: Case, tmp_path, trees, capsys):
    ctx = Ctx(tmp_path, trees)
    argv = _with_defaults(case.build(ctx), ctx)
    before = snapshot(ctx.inp)
    result = run_subprocess(case.script, argv, tmp_path) if case.subprocess else run_main(case.script, argv, capsys)
    after = snapshot(ctx.inp)
    check_common(case, ctx, result, before, after)
    if case.check is not None:
        case.check(ctx, result)


# ============================================================================================
# cases that need a whole (demo-sized) run: caches, reference probes, finished runs, odd names


@dataclass
class Clean:
    """One clean demo run on a small Pacemaker tree, and its cache (copied per case)."""

    data: Path
    out: Path
    cache: Path


@pytest.fixture(scope="session")
def clean(tmp_path_factory) -> Clean:
    base = tmp_path_factory.mktemp("bad_input_clean")
    data = make_synthetic("pacemaker", base / "data", classes=3, per_class=12, image_size=64, seed=0)
    run = Clean(data, base / "out", base / "cache")
    code = main(SPECS["pacemaker"], ["--model", "clip", "--demo", "--image_path", str(data), "--out", str(run.out),
                                     "--cache_dir", str(run.cache), *FAST])
    assert code == 0, "the clean demo run every cache case compares with failed"
    return run


def _cache_files(cache: Path, kind: str) -> list[Path]:
    return sorted((cache / kind).rglob("*.npz"))


def _features_of_length(cache: Path, length: int) -> Path:
    for path in _cache_files(cache, "features"):
        with np.load(path, allow_pickle=False) as data:
            if len(data["pooled"]) == length:
                return path
    raise AssertionError(f"no features cache file with {length} rows")


def _rewrite_npz(path: Path, change: Callable[[dict], None]) -> None:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    change(arrays)
    stream = io.BytesIO()
    np.savez(stream, **arrays)
    path.write_bytes(stream.getvalue())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_features(path: Path) -> None:
    def change(arrays):
        arrays["pooled"] = np.zeros_like(arrays["pooled"])
        arrays["patch_mean"] = np.zeros_like(arrays["patch_mean"])
    _rewrite_npz(path, change)


def strip_key_and_checksum(path: Path) -> None:
    """What an older version or another tool would leave: the arrays alone, right names and shapes,
    different values."""
    def change(arrays):
        for name in list(arrays):
            if name.startswith("__"):
                del arrays[name]
        arrays["pooled"] = arrays["pooled"][::-1].copy()
    _rewrite_npz(path, change)


def reverse_ranking(path: Path) -> None:
    def change(arrays):
        for name in ("layers", "neurons", "scores"):
            arrays[name] = arrays[name][::-1].copy()
    _rewrite_npz(path, change)


def _numeric_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        if pd.api.types.is_numeric_dtype(a[column]):
            np.testing.assert_allclose(a[column].to_numpy(float), b[column].to_numpy(float), rtol=1e-6, atol=1e-9,
                                       err_msg=column, equal_nan=True)
        else:
            assert list(a[column]) == list(b[column]), column


def _same_results(clean: Clean, out: Path) -> None:
    for name in ("metrics.csv", "predictions_no-ttr.csv", "predictions_ttr.csv"):
        _numeric_equal(pd.read_csv(clean.out / name), pd.read_csv(out / name))
    ranked = json.loads((out / "register_neurons.json").read_text())["ranked"]
    assert ranked == json.loads((clean.out / "register_neurons.json").read_text())["ranked"]


@dataclass
class CacheCase:
    id: str
    kind: str                              # cache folder: features | images | detection
    pick: Callable[[Path], list[Path]]     # the entries to damage, from the case's cache copy
    damage: Callable[[Path], None] | None  # None: another entry's valid file copied over it
    reused: int | None                     # feature sets expected from the cache (of 6)
    xfail: str | None = None


CACHE_CASES = [
    CacheCase("cache-truncated-feature-npz-warns-once-naming-it-and-recomputes-same-results", "features",
              lambda cache: [_features_of_length(cache, 5)], truncate, 5),
    CacheCase("cache-zeroed-train-features-warns-once-naming-it-and-recomputes-same-results", "features",
              lambda cache: [_features_of_length(cache, 25)], zero_features, 5),
    CacheCase("cache-foreign-npz-without-key-or-checksum-warns-once-and-recomputes-same-results", "features",
              lambda cache: [_features_of_length(cache, 25)], strip_key_and_checksum, 5),
    CacheCase("cache-entry-of-another-key-copied-over-warns-once-and-recomputes-same-results", "features",
              lambda cache: [_features_of_length(cache, 6)], None, 5),
    # Every decoded-image entry damaged: a cached re-run reads only those its analysis pass needs.
    CacheCase("cache-truncated-decoded-images-each-read-one-warned-once-and-redecoded-same-results", "images",
              lambda cache: _cache_files(cache, "images"), truncate, 6),
    CacheCase("cache-altered-detection-ranking-warns-once-and-redetects-same-neurons", "detection",
              lambda cache: _cache_files(cache, "detection")[:1], reverse_ranking, 6),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                                               if c.xfail else []) for c in CACHE_CASES])
def test_damaged_cache(case: CacheCase, clean: Clean, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(clean.cache, cache)
    victims = case.pick(cache)
    assert victims
    for victim in victims:
        if case.damage is None:        # another entry's (valid, checksummed) file at this entry's path
            other = next(p for p in _cache_files(cache, case.kind) if p != victim)
            shutil.copyfile(other, victim)
        else:
            case.damage(victim)
    out = tmp_path / "out"
    before = snapshot(clean.data)
    result = run_main("pacemaker", ["--model", "clip", "--demo", "--image_path", str(clean.data), "--out", str(out),
                                    "--cache_dir", str(cache), *FAST], capsys)
    shown = f"exit {result.code}\n{result.err[-5000:]}"
    assert result.code == 0, shown
    assert "Traceback" not in result.text, shown
    assert snapshot(clean.data) == before
    warned = []
    for victim in victims:
        lines = [line for line in result.err.splitlines() if str(victim) in line]
        assert len(lines) <= 1, f"{victim} warned about {len(lines)} times:\n{shown}"
        assert all(re.search(r"recomput|ignor", line) for line in lines), lines
        warned += lines
    expected = len(victims) if case.kind != "images" else None
    assert len(warned) == (expected or len(warned)) and warned, f"expected one warning per damaged file:\n{shown}"
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "done"
    if case.reused is not None:
        assert sum(config["feature_cache_hits"].values()) == case.reused, config["feature_cache_hits"]
    if case.kind == "images":
        assert config["images_decoded"] == len(warned), (config.get("images_decoded"), warned)
    _same_results(clean, out)
    # The entry was rewritten whole: a run now reads it without a word.
    again = run_main("pacemaker", ["--model", "clip", "--demo", "--image_path", str(clean.data),
                                   "--out", str(tmp_path / "out2"), "--cache_dir", str(cache), *FAST], capsys)
    assert again.code == 0 and not any(str(v) in again.err for v in victims), again.err[-3000:]


def _probe_folder(folder: Path, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]] | None]) -> None:
    folder.mkdir(parents=True)
    for name, shape in shapes.items():
        if shape is not None:
            weight, bias = shape
            torch.save({"fc.weight": torch.zeros(weight), "fc.bias": torch.zeros(bias)}, str(folder / name))


# The planted CLIP fixture's pooled feature is 32-d; the clean tree has 3 classes.
PROBE_CASES = [
    ("reference-probes-wrong-feature-width-exit2-names-file-and-shapes",
     {"best_model_no_ttr.pth": ((3, 7), (3,)), "best_model_ttr.pth": ((3, 7), (3,))},
     ("--reference_probes", "best_model_no_ttr.pth", "[3, 7]"), r"use the probes saved for this backbone"),
    ("reference-probes-wrong-class-count-exit2-names-file-and-classes",
     {"best_model_no_ttr.pth": ((5, 32), (5,)), "best_model_ttr.pth": ((5, 32), (5,))},
     ("--reference_probes", "best_model_no_ttr.pth", "5 classes"), r"use the probes saved for this dataset"),
    ("reference-probes-folder-without-the-ttr-probe-exit2",
     {"best_model_no_ttr.pth": ((3, 32), (3,)), "best_model_ttr.pth": None},
     ("--reference_probes", "best_model_ttr.pth", "not found"), r"the folder must hold"),
]


@pytest.mark.slow
@pytest.mark.parametrize("shapes, names, advice", [pytest.param(s, n, a, id=i) for i, s, n, a in PROBE_CASES])
def test_reference_probes_of_wrong_shape(shapes, names, advice, clean: Clean, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(clean.cache, cache)
    probes = tmp_path / "in" / "Trained_Models" / "pacemaker_clip"
    _probe_folder(probes, shapes)
    before = snapshot(tmp_path / "in"), snapshot(clean.data)
    result = run_main("pacemaker", ["--model", "clip", "--demo", "--image_path", str(clean.data),
                                    "--out", str(tmp_path / "out"), "--cache_dir", str(cache),
                                    "--reference_probes", str(probes), *FAST], capsys)
    shown = f"exit {result.code}\n{result.err[-5000:]}"
    assert result.code == 2, shown
    assert "Traceback" not in result.text, shown
    assert len(result.errors) == 1, shown
    for name in names:
        assert name in result.message, result.message
    assert re.search(advice, result.message), result.message
    assert (snapshot(tmp_path / "in"), snapshot(clean.data)) == before


@pytest.mark.slow
@pytest.mark.parametrize("model, check_data_flag", [
    pytest.param("dinov2", False, id="out-holds-a-real-finished-demo-run-of-another-model-exit2-files-untouched"),
    pytest.param(None, True, id="check-data-into-a-real-finished-run-exit2-files-untouched"),
])
def test_finished_run_folder_is_not_overwritten(model, check_data_flag, clean: Clean, tmp_path, capsys):
    out = tmp_path / "finished"
    shutil.copytree(clean.out, out)
    before = snapshot(out)
    if check_data_flag:
        argv = ["--check_data", "--image_path", str(clean.data), "--out", str(out)]
    else:
        argv = ["--model", model, "--demo", "--image_path", str(clean.data), "--out", str(out),
                "--cache_dir", str(tmp_path / "cache"), *FAST]
    result = run_main("pacemaker", argv, capsys)
    assert result.code == 2, result.err[-3000:]
    assert "Traceback" not in result.text
    assert len(result.errors) == 1 and str(out) in result.message and "pass another --out" in result.message, \
        result.message
    assert snapshot(out) == before


@pytest.mark.slow
def test_odd_file_names_go_through_a_whole_run_into_every_csv(trees, tmp_path, capsys):
    """pacemaker-spaces-unicode-and-non-utf8-names-through-a-whole-run-exit0: every stage, every CSV,
    the names byte-exact."""
    root = tmp_path / "in" / "data"
    shutil.copytree(trees["pacemaker"], root)
    odd = [b"scan 1 \xc3\xbc.png", b"\xe4\xb8\xad\xe6\x96\x87.png", b"bad-\xff\xfe.png"]
    for k, name in enumerate(odd):
        folder = os.fsencode(root / "Test" / PACEMAKER_CLASSES[k])
        write_png(folder + b"/" + name)
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out"
    result = run_main("pacemaker", ["--model", "clip", "--demo", "--image_path", str(root), "--out", str(out),
                                    "--cache_dir", str(tmp_path / "cache"), *FAST], capsys)
    assert result.code == 0, result.err[-5000:]
    assert "Traceback" not in result.text
    assert snapshot(tmp_path / "in") == before
    for csv in ("splits.csv", "predictions_no-ttr.csv", "predictions_ttr.csv"):
        data = (out / csv).read_bytes()
        for name in odd:
            assert name in data, f"{name!r} not byte-exact in {csv}"


@pytest.mark.slow
def test_cache_dir_that_is_a_file_exit2(trees, tmp_path, capsys):
    """cache-dir-is-an-existing-file-exit2: --cache_dir names a file; the run says so up front."""
    root = tmp_path / "in" / "data"
    shutil.copytree(trees["pacemaker"], root)
    write(tmp_path / "in" / "cache.txt", b"not a folder\n")
    before = snapshot(tmp_path / "in")
    result = run_main("pacemaker", ["--model", "clip", "--demo", "--image_path", str(root),
                                    "--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "in" / "cache.txt"),
                                    *FAST], capsys)
    shown = f"exit {result.code}\n{result.err[-5000:]}"
    assert result.code == 2, shown
    assert "Traceback" not in result.text, shown
    assert len(result.errors) == 1 and "--cache_dir" in result.message and "cache.txt" in result.message, shown
    assert snapshot(tmp_path / "in") == before
