"""The bad-input harness: what a new user gets wrong, and what they see.

A case (:class:`Case`) builds its inputs in a private tmp folder (:class:`Ctx`), runs an entry
point's ``main`` in-process (:func:`run_main`: a dataset script, or ``report``, ``studyreport``,
``study``; or a dataset script in a fresh interpreter, :func:`run_subprocess`), optionally under a
simulated fault of the machine (``Case.fault``, monkeypatched for the run only), and
:func:`run_case` returns what of the following it did not hold (the test asserts that the list is
empty), and runs the case's own particulars:

* the exit code (2 for bad input or usage; 0 where skipping with a warning is right);
* for exit 2: exactly one ``error:`` line, naming the file, value or flag at fault and saying
  what to do; for exit 0: the warning names the file and says what was done about it;
* that no ``Traceback`` is printed;
* that the input tree - everything the user gave: dataset folder, manifest, neuron, weights and
  probe files, an ``--out`` that already existed - is byte-identical afterwards (names, bytes,
  permissions and mtimes).

Case files import what they need from here, the ``trees`` and ``_offline`` fixtures by name (pytest
picks up fixtures imported into a test module), and run their list with::

    @pytest.mark.parametrize("case", params(CASES))
    def test_bad_input(case, tmp_path, trees, capsys):
        problems = run_case(case, tmp_path, trees, capsys)
        assert not problems, "\n".join(problems)

Each case's id states the case and the behaviour a user would expect.  A case the code does not
meet yet would be marked ``xfail`` (strict: the mark goes as soon as the code is fixed).
"""

from __future__ import annotations

import importlib.util
import io
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

ROOT = Path(__file__).resolve().parents[1]


def _entry_spec(script: str):
    """The ``DATASET`` spec of an entry script (loaded by path: they are not a package)."""
    spec = importlib.util.spec_from_file_location(f"_entry_{script}", ROOT / f"test_{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DATASET


SPECS = {name: _entry_spec(name) for name in ("pacemaker", "orthonet", "aptos")}

# `make demo` runs with the full defaults; the tests' runs trim the statistics and figures (one probe
# seed, one probe grid member, one refit, fewer resamples, one figure image) so that the end-to-end
# runs fit the suite's budget.  The probe grid and the statistics have their own tests.
FAST = ["--set", "probe_seeds=(0,)", "--set", "bootstrap_resamples=200", "--set", "figure_images=1",
        "--set", "analysis_images=16", "--set", "probe_refits=1", "--set", "permutations=200",
        "--set", "probe_lr_grid=(0.01,)", "--set", "probe_weight_decay_grid=(0.0001,)"]

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
    fault: Callable[[Ctx, pytest.MonkeyPatch], None] | None = None   # a fault of the machine, simulated for the run

    def param(self):
        marks = []
        if self.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=self.xfail))
        if self.slow:
            marks.append(pytest.mark.slow)
        return pytest.param(self, id=self.id, marks=marks)


def _entry(script: str) -> Callable[[list[str]], int]:
    """The ``main(argv)`` of an entry point: a dataset script's name (``pacemaker``), or ``report``
    (``python -m common.report``), ``studyreport`` or ``study``."""
    if script == "report":
        from common.reporting.report import main as report_main
        return report_main
    if script == "studyreport":
        from common.reporting.studyreport import main as studyreport_main
        return studyreport_main
    if script == "study":
        from common.app.study import main as study_main
        return study_main
    return lambda argv: main(SPECS[script], argv)


# Put in a case's arguments to run without --cache_dir (the default cache; the harness adds a
# --cache_dir under the case's tmp folder otherwise).
DEFAULT_CACHE = "<the default cache>"


def _with_defaults(argv: list[str], ctx: Ctx, script: str = "pacemaker") -> list[str]:
    """Every case writes only under its own tmp folder: --out (and for a run --cache_dir, unless
    :data:`DEFAULT_CACHE`) added if absent (the study report writes into the study folder it is given)."""
    argv = list(argv)
    if "--out" not in argv and script != "studyreport":
        argv += ["--out", str(ctx.out)]
    if DEFAULT_CACHE in argv:
        argv.remove(DEFAULT_CACHE)
    elif "--cache_dir" not in argv and script in SPECS:
        argv += ["--cache_dir", str(ctx.cache)]
    return argv


def run_main(script: str, argv: list[str], capsys) -> Result:
    capsys.readouterr()
    try:
        code = _entry(script)(argv)
    except SystemExit as exit_:        # argparse's usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ") or ": error: " in line]
    message = errors[0] if len(errors) == 1 else out + err
    return Result(code, out, err, message, errors)


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 600,
               launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python <script> args`` from the repository root, as a user runs it (optionally under a
    launcher such as torchrun)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    command = (launcher or [sys.executable]) + [str(ROOT / script), *args]
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


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


def common_problems(case: Case, ctx: Ctx, result: Result, before: dict, after: dict) -> list[str]:
    """What every case must hold (module docstring) and this run did not: empty when all held.
    Safety first, so that it leads the failure message whatever else went wrong."""
    shown = f"exit {result.code}\n--- stdout\n{result.out[-3000:]}\n--- stderr\n{result.err[-5000:]}"
    problems = []
    if ctx.marker.exists():
        problems.append("code inside a user's file was executed")
    allowed = case.exit if isinstance(case.exit, tuple) else (case.exit,)
    if result.code not in allowed:
        problems.append(f"expected exit {allowed}\n{shown}")
    if "Traceback" in result.text:
        problems.append(f"a traceback was printed\n{shown}")
    if before != after:
        problems.append("the user's input files were modified: " + ", ".join(
            sorted(os.fsdecode(k) for k in set(before) | set(after) if before.get(k) != after.get(k))[:10]))
    if result.code == 2 and len(result.errors) != 1:
        problems.append(f"expected exactly one error line\n{shown}")
    problems += [f"message does not name {name!r}:\n{result.message[-3000:]}"
                 for name in case.names if name not in result.message]
    if case.advice is not None and not re.search(case.advice, result.message):
        problems.append(f"message does not say what to do ({case.advice!r}):\n{result.message[-3000:]}")
    return problems


def lock_holder(folder: Path, name: str | None = None) -> subprocess.Popen:
    """Another process holding the lock of ``folder`` (common.runtime.locks; the lock file ``name``, default
    the usual one; it waits until killed, at most 10 min): the caller kills it."""
    named = f", name={name!r}" if name else ""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from common.runtime.locks import FolderLock\n"
            f"with FolderLock({str(folder)!r}{named}):\n    print('locked', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout.readline().strip() == "locked"
    return process


def ended_pid() -> int:
    """The pid of a process of this host that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


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


TRAIN_A = "Train/MDT - Adapta"


def _pm(ctx: Ctx) -> Path:
    return ctx.data("pacemaker")


def params(cases: list[Case]) -> list:
    """``pytest.param`` of each case, with its id and marks."""
    return [c.param() for c in cases]


def run_case(case: Case, tmp_path: Path, trees: dict[str, Path], capsys) -> list[str]:
    """Build the case's inputs and run it: what every case must hold and it did not (empty when all
    held; the test asserts that), then, when all held, the case's own check."""
    ctx = Ctx(tmp_path, trees)
    argv = _with_defaults(case.build(ctx), ctx, case.script)
    before = snapshot(ctx.inp)
    with pytest.MonkeyPatch.context() as patch:
        if case.fault is not None:
            case.fault(ctx, patch)
        result = run_subprocess(case.script, argv, tmp_path) if case.subprocess else run_main(case.script, argv, capsys)
    after = snapshot(ctx.inp)
    problems = common_problems(case, ctx, result, before, after)
    if not problems and case.check is not None:
        case.check(ctx, result)          # the case's own particulars (they assert)
    return problems
