"""The bad-input matrix, faults and processes: what ends a run that is not the user's input.

Classes (the harness is tests/badinput.py; every case asserts the exit code, one ``error:`` line
naming the thing and what to do - or, where carrying on is right, a warning that says what was
done - no traceback, and the input tree byte-identical):

* faults of the machine: a full disk or quota under ``--out`` or the cache (simulated: ``os.fsync``
  raises ``ENOSPC``/``EDQUOT`` with no file name, as a full disk does; nothing is really filled),
  paths too long for the file system (real over-long paths in the case's tmp folder);
* two processes, one folder: the lock on ``--out`` (a live holder in another process, a stale lock
  left by a dead process, a lock of another host), SIGTERM to a real run;
* settings that make no sense, refused where they enter instead of after extraction and training;
* messages that named the wrong cause (a default cache blamed on ``--cache_dir``, a course ranking
  file's bad entry, a study folder given to the run report and back);
* the cross-run and study reports: folders they must refuse, never writing into a run they read.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import configs
from badinput import (
    DEFAULT_CACHE,
    FAST,
    ROOT,
    Case,
    Ctx,
    Result,
    _offline,  # noqa: F401  (an autouse fixture, picked up by name)
    _pm,
    check_data,
    clip_run,
    demo_on,
    ended_pid,
    lock_holder,
    params,
    run_case,
    run_main,
    snapshot,
    trees,  # noqa: F401  (a fixture, picked up by name)
    write,
)
from common.evaluation.compare import evaluate_modes
from common.evaluation.metrics import MetricSpec
from common.runtime.locks import LOCK

SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ============================================================================================
# helpers


def _fsync_fails(where, code: int = errno.ENOSPC, name: str | None = None):
    """A full disk (or quota) under ``where(ctx)``: ``os.fsync`` of a file there raises
    ``OSError(code)`` with no file name, as the OS does (only files whose name holds ``name``)."""
    def fault(ctx: Ctx, patch: pytest.MonkeyPatch) -> None:
        root = os.fspath(where(ctx)) + os.sep
        real = os.fsync

        def fsync(fd: int) -> None:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(root) and (name is None or name in os.path.basename(target)):
                raise OSError(code, os.strerror(code))
            real(fd)

        patch.setattr(os, "fsync", fsync)
    return fault


def _setitem(mapping: dict, key: str, value):
    """configs.py edited by hand (for the run only)."""
    def fault(ctx: Ctx, patch: pytest.MonkeyPatch) -> None:
        patch.setitem(mapping, key, value)
    return fault


def _setenv(**values):
    def fault(ctx: Ctx, patch: pytest.MonkeyPatch) -> None:
        for key, value in values.items():
            if value is None:
                patch.delenv(key, raising=False)
            else:
                patch.setenv(key, value(ctx) if callable(value) else value)
    return fault


def _both(*faults):
    def fault(ctx: Ctx, patch: pytest.MonkeyPatch) -> None:
        for f in faults:
            f(ctx, patch)
    return fault


def _deep(base: Path, total: int) -> Path:
    """A real folder path of about ``total`` bytes under ``base`` (components of 200)."""
    path = base
    while len(os.fsencode(path)) < total - 201:
        path = path / ("d" * 200)
    path = path / ("e" * max(1, total - len(os.fsencode(path)) - 1))
    path.mkdir(parents=True)
    return path


def run_folder(folder: Path, dataset: str = "aptos", model: str = "clip", status: str = "done",
               seed: int = 0) -> Path:
    """A finished run as the report reads it: ``metrics.csv`` of the real metrics code on seeded
    probabilities, ``config.json``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 30)
    proba = {}
    for mode, skill in (("no-ttr", 1.0), ("ttr", 1.4)):
        logits = rng.normal(size=(1, 30, 3))
        logits[:, np.arange(30), labels] += skill
        proba[mode] = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    table = evaluate_modes(labels, proba, MetricSpec(3, qwk=dataset == "aptos"), n_boot=50, seed=seed)
    write(folder / "metrics.csv", table.to_csv(index=False).encode())
    write(folder / "config.json", json.dumps({"status": status, "dataset": dataset, "model": model, "demo": False,
                                              "time": f"2026-01-0{seed + 1} 10:00:00"}).encode())
    return folder


def study_folder(base: Path, cells=(("aptos_clip", "aptos", "clip"), ("orthonet_clip", "orthonet", "clip")),
                 **record) -> Path:
    """A finished study: a run folder per cell and the study record over them."""
    entries = []
    for index, (name, dataset, model) in enumerate(cells):
        folder = run_folder(base / "cells" / name, dataset, model, seed=index)
        entries.append({"name": name, "dataset": dataset, "model": model, "settings": {}, "argv": [],
                        "folder": str(folder), "status": "done", "exit_code": 0, "error": "", "seconds": 1.0,
                        "command": f"python test_{dataset}.py ...", "script": f"test_{dataset}.py"})
    study = {"format": "ttr-study/1", "status": "done", "cells": entries, "skipped": [], "axes": {},
             "datasets": {dataset: None for _, dataset, _ in cells}, "models": ["clip"], "demo": False,
             "wall_seconds": 2.0, "command_line": ["python", "-m", "common.study"], "root": str(ROOT), **record}
    write(base / "study.json", json.dumps(study).encode())
    return base


_holders: list[subprocess.Popen] = []


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the lock of ``folder``, killed after the case."""
    process = lock_holder(folder)
    _holders.append(process)
    return process


@pytest.fixture(autouse=True)
def _no_holder_left():
    yield
    while _holders:
        process = _holders.pop()
        process.kill()
        process.wait()


def _lock_text(host: str, pid: int) -> bytes:
    return json.dumps({"host": host, "pid": pid, "started": "2026-01-01 10:00:00", "command": ["x"]}).encode()


def _said(*texts: str, absent: tuple[str, ...] = ()):
    """Each of ``texts`` on exactly one line of stderr (a warning said once), none of ``absent``."""
    def check(ctx: Ctx, result: Result) -> None:
        for text in texts:
            lines = [line for line in result.err.splitlines() if text in line]
            assert len(lines) == 1, f"{text!r} said {len(lines)} times:\n{result.err[-3000:]}"
        for text in absent:
            assert text not in result.text, f"{text!r} should not be said:\n{result.text[-3000:]}"
    return check


def _before_any_model_work(ctx: Ctx, result: Result) -> None:
    assert "[1/8]" not in result.err and not (ctx.out / "config.json").exists(), result.err[-2000:]


def _finished(ctx: Ctx, result: Result) -> None:
    assert json.loads((ctx.out / "config.json").read_text())["status"] == "done"


# ============================================================================================
# faults of the machine


def out_ctx(ctx: Ctx) -> Path:
    return ctx.out


def cache_ctx(ctx: Ctx) -> Path:
    return ctx.cache


def _no_temporary_left(ctx: Ctx, result: Result) -> None:
    left = [p for p in ctx.tmp.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left


def _cache_warned_once(ctx: Ctx, result: Result) -> None:
    _said("cannot be written")(ctx, result)
    line = next(line for line in result.err.splitlines() if "cannot be written" in line)
    assert str(ctx.cache) in line and "carrying on without caching" in line, line
    _finished(ctx, result)
    assert not list(ctx.cache.rglob("*.npz"))


def _failed_cleanly(ctx: Ctx, result: Result) -> None:
    _no_temporary_left(ctx, result)
    assert json.loads((ctx.out / "config.json").read_text())["status"] == "failed"
    assert not (ctx.out / "metrics.csv").exists() and not (ctx.out / LOCK).exists()


def _long_out(ctx: Ctx) -> list[str]:
    return check_data(_pm(ctx)) + ["--out", str(ctx.tmp / ("o" * 300))]


def _deep_out(ctx: Ctx) -> list[str]:
    """A run whose --out leaves no room for its own file names (register_neurons.json's temporary
    twin would pass the limit after detection)."""
    return demo_on(ctx, _pm(ctx), "--out", str(_deep(ctx.tmp / "deep", 4060)))


def _deep_cache(ctx: Ctx) -> list[str]:
    return demo_on(ctx, _pm(ctx), "--cache_dir", str(_deep(ctx.tmp / "deep", 4040)))


FAULT_CASES = [
    Case("fault-full-disk-under-out-exit2-names-the-file-being-written", "pacemaker",
         lambda ctx: check_data(_pm(ctx)), 2, (LOCK, "No space left on device"), r"free some space",
         fault=_fsync_fails(out_ctx), check=_no_temporary_left),
    Case("fault-full-disk-under-out-while-writing-splits-csv-exit2-names-splits-csv", "pacemaker",
         lambda ctx: check_data(_pm(ctx)), 2, ("splits.csv", "No space left on device"), r"free some space",
         fault=_fsync_fails(out_ctx, name="splits.csv"), check=_no_temporary_left),
    Case("fault-quota-reached-under-out-mid-run-exit2-names-metrics-csv-config-says-failed", "pacemaker",
         lambda ctx: demo_on(ctx, _pm(ctx)), 2, ("metrics.csv", "quota"), r"free some space",
         fault=_fsync_fails(out_ctx, errno.EDQUOT, name="metrics.csv"), slow=True, check=_failed_cleanly),
    Case("fault-full-cache-warns-once-and-the-run-finishes-uncached-exit0", "pacemaker",
         lambda ctx: demo_on(ctx, _pm(ctx)), 0, advice=r"carrying on without caching",
         fault=_fsync_fails(cache_ctx), check=_cache_warned_once, slow=True),
    Case("fault-out-name-longer-than-the-file-system-allows-exit2-use-a-shorter-path", "pacemaker", _long_out, 2,
         ("ooooo", "File name too long"), r"use a shorter path"),
    Case("fault-out-path-near-path-max-refused-up-front-exit2", "pacemaker", _deep_out, 2,
         ("--out", "too little room"), r"use a shorter path", check=_before_any_model_work),
    Case("fault-cache-path-near-path-max-refused-up-front-exit2", "pacemaker", _deep_cache, 2,
         ("--cache_dir", "too little room"), r"use a shorter path", check=_before_any_model_work),
    Case("fault-report-out-on-a-full-disk-exit2-names-report-csv", "report",
         lambda ctx: [str(run_folder(ctx.inp / "run_a"))], 2, ("report.csv", "No space left on device"),
         r"free some space", fault=_fsync_fails(out_ctx)),
    Case("fault-study-report-on-a-full-disk-exit2-names-the-file", "studyreport",
         lambda ctx: [str(study_folder(ctx.tmp / "study"))], 2, ("report", "No space left on device"),
         r"free some space", fault=_fsync_fails(lambda ctx: ctx.tmp / "study" / "report")),
]


# ---------------------------------------------------------------- the default cache, named as it is


def _file_at(ctx: Ctx, name: str) -> str:
    write(ctx.tmp / name, b"not a folder\n")
    return str(ctx.tmp / name)


def _default_cache(ctx: Ctx) -> list[str]:
    return [*demo_on(ctx, _pm(ctx)), DEFAULT_CACHE]


def _not_blaming_cache_dir(ctx: Ctx, result: Result) -> None:
    assert not result.message.startswith("error: --cache_dir"), result.message


CACHE_NAME_CASES = [
    Case("default-cache-from-ttr-cache-dir-is-a-file-exit2-names-the-variable-not-cache-dir", "pacemaker",
         _default_cache, 2, ("TTR_CACHE_DIR", "ttr_cache.txt"), r"pass --cache_dir DIR .*or --no_cache",
         fault=_setenv(TTR_CACHE_DIR=lambda ctx: _file_at(ctx, "ttr_cache.txt")), check=_not_blaming_cache_dir),
    Case("default-cache-under-xdg-cache-home-unwritable-exit2-names-the-variable", "pacemaker", _default_cache, 2,
         ("XDG_CACHE_HOME", "ttr-medical"), r"pass --cache_dir DIR", check=_not_blaming_cache_dir,
         fault=_setenv(TTR_CACHE_DIR=None, XDG_CACHE_HOME=lambda ctx: _file_at(ctx, "xdg.txt"))),
    Case("default-cache-under-home-unwritable-exit2-says-default-cache-folder", "pacemaker", _default_cache, 2,
         ("default cache folder", ".cache"), r"pass --cache_dir DIR", check=_not_blaming_cache_dir,
         fault=_setenv(TTR_CACHE_DIR=None, XDG_CACHE_HOME=None, HOME=lambda ctx: _file_at(ctx, "home.txt"))),
]


# ============================================================================================
# two processes, one folder


def _locked_out(ctx: Ctx) -> list[str]:
    process = hold_lock(ctx.out)
    ctx.holder = process.pid
    return check_data(_pm(ctx))


def _names_holder(ctx: Ctx, result: Result) -> None:
    assert f"pid {ctx.holder}" in result.message and f"host {socket.gethostname()}" in result.message, result.message
    assert (ctx.out / LOCK).is_file()     # the holder's lock is left as it is


def _locked_demo(ctx: Ctx) -> list[str]:
    process = hold_lock(ctx.out)
    ctx.holder = process.pid
    return demo_on(ctx, _pm(ctx))


def _stale(ctx: Ctx) -> list[str]:
    write(ctx.out / LOCK, _lock_text(socket.gethostname(), ended_pid()))
    return check_data(_pm(ctx))


def _stale_taken_over(ctx: Ctx, result: Result) -> None:
    _said("taking over the lock")(ctx, result)
    assert (ctx.out / "splits.csv").is_file() and not (ctx.out / LOCK).exists()


def _other_host(ctx: Ctx) -> list[str]:
    write(ctx.out / LOCK, _lock_text("gpu-node-17.cluster", 4242))
    return check_data(_pm(ctx))


def _empty_lock(ctx: Ctx) -> list[str]:
    write(ctx.out / LOCK, b"")
    return check_data(_pm(ctx))


def _study_locked(ctx: Ctx) -> list[str]:
    ctx.holder = hold_lock(ctx.out).pid
    return ["--demo", "--data", "aptos", "--models", "clip", "--out", str(ctx.out)]


def _report_of_running_study(ctx: Ctx) -> list[str]:
    study = study_folder(ctx.tmp / "study")
    ctx.holder = hold_lock(study).pid
    return [str(study)]


PROCESS_CASES = [
    Case("lock-second-check-data-on-an-out-in-use-exit2-names-host-and-pid", "pacemaker", _locked_out, 2,
         ("--out", "in use by another run"), r"wait for it to finish or pass another --out", check=_names_holder),
    Case("lock-second-run-on-an-out-in-use-exit2-before-any-model-work", "pacemaker", _locked_demo, 2,
         ("--out", "in use by another run"), r"wait for it to finish",
         check=lambda ctx, result: (_names_holder(ctx, result), _before_any_model_work(ctx, result))),
    Case("lock-stale-lock-of-a-dead-process-on-this-host-taken-over-with-a-warning-exit0", "pacemaker", _stale, 0,
         advice=r"taking over the lock of a run that is no longer running", check=_stale_taken_over),
    Case("lock-of-another-host-exit2-says-remove-it-once-that-run-is-over", "pacemaker", _other_host, 2,
         ("gpu-node-17.cluster", "pid 4242", LOCK), r"if that run is over, remove"),
    Case("lock-file-left-empty-by-a-crash-is-taken-silently-exit0", "pacemaker", _empty_lock, 0,
         check=_said(absent=("taking over",))),
    Case("lock-study-on-a-folder-another-study-uses-exit2", "study", _study_locked, 2,
         ("--out", "in use by another run"), r"wait for it to finish", check=_names_holder),
    Case("lock-study-report-while-the-study-runs-exit2-says-wait", "studyreport", _report_of_running_study, 2,
         ("STUDY_DIR", "in use"), r"the study writes its report when it finishes"),
]


# ============================================================================================
# settings checked where they enter


def _early(*pairs: str):
    def build(ctx: Ctx) -> list[str]:
        extra = []
        for pair in pairs:
            extra += ["--set", pair]
        return demo_on(ctx, _pm(ctx), *extra)
    return build


SETTINGS_CASES = [
    Case("set-probe-min-delta-negative-exit2-before-extraction", "pacemaker", _early("probe_min_delta=-1"), 2,
         ("probe_min_delta=-1",), r"use a number in \[0, 1\)", check=_before_any_model_work),
    Case("set-probe-patience-not-below-max-epochs-exit2", "pacemaker",
         _early("probe_patience=50", "probe_max_epochs=50"), 2, ("probe_patience=50", "probe_max_epochs=50"),
         r"use a patience below probe_max_epochs", check=_before_any_model_work),
    Case("set-bootstrap-resamples-10-exit2-too-few-for-a-95-interval", "pacemaker",
         _early("bootstrap_resamples=10"), 2, ("bootstrap_resamples=10",), r"at least 50",
         check=_before_any_model_work),
    Case("set-figure-images-1000-exit2", "pacemaker", _early("figure_images=1000"), 2, ("figure_images=1000",),
         r"use 0\.\.32", check=_before_any_model_work),
    Case("set-num-registers-1000-exit2", "pacemaker", _early("num_registers=1000"), 2, ("num_registers=1000",),
         r"use 1\.\.64", check=_before_any_model_work),
    Case("set-scale-1e30-exit2-names-scale-not-the-images", "pacemaker", _early("scale=1e30"), 2, ("scale=1e+30",),
         r"use a number in \(0, 1000\]", check=_before_any_model_work),
    Case("set-scale-negative-exit2", "pacemaker", _early("scale=-1"), 2, ("scale=-1",), r"use a number in \(0,"),
    Case("set-probe-lr-grid-10-exit2", "pacemaker", _early("probe_lr_grid=(10,)"), 2, ("probe_lr_grid",),
         r"use values in \(0, 1\]", check=_before_any_model_work),
    Case("set-probe-weight-decay-100-exit2", "pacemaker", _early("probe_weight_decay_grid=(0.01, 100)"), 2,
         ("probe_weight_decay_grid", "100"), r"use values in \[0, 1\]"),
    Case("set-probe-seeds-repeated-exit2", "pacemaker", _early("probe_seeds=(0, 0)"), 2, ("probe_seeds=(0, 0)",),
         r"give distinct seeds"),
    Case("set-probe-seeds-negative-exit2", "pacemaker", _early("probe_seeds=(-1, 2)"), 2, ("probe_seeds=(-1, 2)",),
         r"use integers from 0"),
    Case("configs-py-probe-lr-grid-emptied-exit2-not-a-traceback", "pacemaker", lambda ctx: check_data(_pm(ctx)), 2,
         ("probe_lr_grid=()",), r"expected a non-empty list",
         fault=_setitem(configs.RUN_DEFAULTS, "probe_lr_grid", ())),
    Case("configs-py-val-fraction-as-text-exit2-not-a-traceback", "pacemaker", lambda ctx: check_data(_pm(ctx)), 2,
         ("val_fraction='0.15'",), r"each must be in \(0, 1\)",
         fault=_setitem(configs.RUN_DEFAULTS, "val_fraction", "0.15")),
    Case("configs-py-highest-layer-5.5-exit2", "pacemaker", lambda ctx: clip_run(ctx), 2, ("highest_layer=5.5",),
         r"expected an integer", fault=_setitem(configs.CLIP, "highest_layer", 5.5)),
    Case("configs-py-zero-shot-as-text-exit2", "pacemaker", lambda ctx: clip_run(ctx), 2, ("zero_shot='yes'",),
         r"expected true or false", fault=_setitem(configs.RUN_DEFAULTS, "zero_shot", "yes")),
]


# ============================================================================================
# messages that named the wrong cause


def _pt(ctx: Ctx, ranking) -> list[str]:
    torch.save(ranking, str(ctx.inp / "register_neurons.pt"))
    return clip_run(ctx, "--neurons", str(ctx.inp / "register_neurons.pt"))


CAUSE_CASES = [
    Case("neurons-pt-with-a-text-neuron-exit2-names-the-entry-and-its-value", "pacemaker",
         lambda ctx: _pt(ctx, [(3, 7, 2.0), (3, "x12", 1.0)]), 2,
         ("register_neurons.pt", "entry 1", "'x12'", "neuron that is not an integer"), r"pass the course project's"),
    Case("neurons-pt-with-a-short-entry-exit2-names-the-entry", "pacemaker",
         lambda ctx: _pt(ctx, [(3, 7, 2.0)] * 5 + [(4, 2)]), 2, ("entry 5", "(4, 2)", "has 2 values, not 3"),
         r"pass the course project's"),
    Case("neurons-pt-with-a-negative-layer-exit2-names-the-entry", "pacemaker",
         lambda ctx: _pt(ctx, [(-1, 7, 2.0)]), 2, ("entry 0", "negative layer (-1)"), r"pass the course project's"),
    Case("neurons-pt-with-a-text-score-exit2-names-the-entry", "pacemaker",
         lambda ctx: _pt(ctx, [(1, 7, "high")]), 2, ("entry 0", "score that is not a number ('high')"),
         r"pass the course project's"),
]


# ============================================================================================
# the cross-run and the study report


def _two_runs(ctx: Ctx) -> tuple[Path, Path]:
    return run_folder(ctx.inp / "run_a", seed=0), run_folder(ctx.inp / "run_b", "orthonet", seed=1)


def _run_and_link(ctx: Ctx) -> list[str]:
    _two_runs(ctx)
    os.symlink(ctx.inp / "run_a", ctx.inp / "link")
    return [str(ctx.inp / "run_a"), str(ctx.inp / "link")]


def _run_and_copy(ctx: Ctx) -> list[str]:
    return [str(run_folder(ctx.inp / "run_a")), str(run_folder(ctx.inp / "copy_of_a"))]


def _out_is_a_file(ctx: Ctx) -> list[str]:
    write(ctx.inp / "notes.txt", b"mine\n")
    return [str(_two_runs(ctx)[0]), "--out", str(ctx.inp / "notes.txt")]


def _study_dir_is_a_file(ctx: Ctx) -> list[str]:
    write(ctx.inp / "study.txt", b"x\n")
    return [str(ctx.inp / "study.txt")]


def _moved_study(ctx: Ctx) -> list[str]:
    study = study_folder(ctx.tmp / "elsewhere")
    record = json.loads((study / "study.json").read_text())
    for cell in record["cells"]:       # recorded where the study ran before it was moved
        cell["folder"] = str(ctx.tmp / "gone" / "cells" / cell["name"])
    write(study / "study.json", json.dumps(record).encode())
    return [str(study)]


def _reported_both_cells(ctx: Ctx, result: Result) -> None:
    text = (ctx.tmp / "elsewhere" / "report" / "report.md").read_text()
    assert "aptos_clip" in text and "orthonet_clip" in text
    cells = pd.read_csv(ctx.tmp / "elsewhere" / "report" / "paper_table.csv")
    assert set(cells["cell"]) == {"aptos_clip", "orthonet_clip"}


def _foreign_cell(ctx: Ctx) -> list[str]:
    study = study_folder(ctx.inp / "study")
    run_folder(ctx.inp / "study" / "cells" / "orthonet_clip", "pacemaker", "dinov2", seed=3)
    return [str(study)]


def _record(ctx: Ctx, content: bytes) -> list[str]:
    write(ctx.inp / "study" / "study.json", content)
    return [str(ctx.inp / "study")]


REPORT_CASES = [
    Case("report-run-still-running-exit2-not-a-finished-run", "report",
         lambda ctx: [str(run_folder(ctx.inp / "run_a", status="running"))], 2, ("run_a", "status 'running'"),
         r"run it to the end .* or leave it out"),
    Case("report-run-terminated-exit2-not-a-finished-run", "report",
         lambda ctx: [str(run_folder(ctx.inp / "run_a", status="terminated"))], 2, ("run_a", "'terminated'"),
         r"the same command resumes it"),
    Case("report-the-same-run-folder-twice-exit2", "report",
         lambda ctx: [str(_two_runs(ctx)[0]), str(ctx.inp / "run_b"), str(ctx.inp / "run_a")], 2,
         ("run_a", "given twice"), r"give each run once"),
    Case("report-one-run-through-a-symlink-and-its-path-exit2", "report", _run_and_link, 2, ("link", "given twice"),
         r"give each run once"),
    Case("report-a-copy-of-a-run-exit2-it-would-count-twice-in-holm", "report", _run_and_copy, 2,
         ("copy_of_a", "run_a", "same run"), r"give each run once"),
    Case("report-out-is-a-run-folder-it-reads-exit2-run-untouched", "report",
         lambda ctx: [str(_two_runs(ctx)[0]), str(ctx.inp / "run_b"), "--out", str(ctx.inp / "run_b")], 2,
         ("--out", "run_b", "the run folder"), r"never writes into a run it reads: pass another --out"),
    Case("report-out-inside-a-run-folder-exit2-run-untouched", "report",
         lambda ctx: [str(_two_runs(ctx)[0]), "--out", str(ctx.inp / "run_a" / "report")], 2,
         ("--out", "inside the run folder", "run_a"), r"pass another --out"),
    Case("report-out-is-a-file-exit2", "report", _out_is_a_file, 2, ("--out", "notes.txt", "is a file"),
         r"pass a folder"),
    Case("report-given-a-study-folder-exit2-points-at-the-study-report", "report",
         lambda ctx: [str(study_folder(ctx.inp / "study"))], 2, ("study", "is a study folder"),
         r"python -m common.studyreport"),
    Case("studyreport-given-a-run-folder-exit2-points-at-the-run-report", "studyreport",
         lambda ctx: [str(run_folder(ctx.inp / "run_a"))], 2, ("run_a", "holds a run"), r"python -m common.report"),
    Case("studyreport-study-json-without-cells-exit2-not-a-traceback", "studyreport",
         lambda ctx: _record(ctx, b'{"format": "ttr-study/1", "axes": {}}'), 2, ("study.json", "'cells'"),
         r"pass the --out folder of a study"),
    Case("studyreport-study-json-is-a-list-exit2-not-a-traceback", "studyreport",
         lambda ctx: _record(ctx, b"[1, 2, 3]"), 2, ("study.json", "not a study record"),
         r"pass the --out folder of a study"),
    Case("studyreport-cell-without-a-folder-exit2-names-the-cell", "studyreport",
         lambda ctx: _record(ctx, json.dumps({"cells": [{"name": "x"}], "axes": {}, "datasets": {}, "skipped": []})
                             .encode()), 2, ("cell 0", "'dataset'"), r"run the study again"),
    Case("studyreport-a-cell-folder-holding-another-datasets-run-exit2", "studyreport", _foreign_cell, 2,
         ("orthonet_clip", "pacemaker with dinov2", "orthonet with clip"), r"run the study again"),
    Case("studyreport-study-dir-is-a-file-exit2", "studyreport", _study_dir_is_a_file, 2,
         ("study.txt", "not a folder"), r"pass the --out folder of a study"),
    Case("studyreport-a-moved-study-folder-reports-its-own-cells-exit0", "studyreport", _moved_study, 0,
         check=_reported_both_cells),
]


ALL_CASES = FAULT_CASES + CACHE_NAME_CASES + PROCESS_CASES + SETTINGS_CASES + CAUSE_CASES + REPORT_CASES


@pytest.mark.parametrize("case", params(ALL_CASES))
def test_bad_input(case: Case, tmp_path, trees, capsys):
    problems = run_case(case, tmp_path, trees, capsys)
    assert not problems, "\n".join(problems)


# ============================================================================================
# SIGTERM to a real run, and a second run beside a real one


def _start(args: list[str], out: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **SINGLE_THREAD}
    return subprocess.Popen([sys.executable, str(ROOT / "test_pacemaker.py"), *args, "--out", str(out),
                             "--cache_dir", str(cache)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, polls: int = 6000) -> None:
    """Until ``condition()`` holds, while ``process`` runs; at most ``polls`` looks, 0.05 s apart
    (a bound against a hang, not a timing)."""
    for _ in range(polls):
        if condition():
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"the run never reached the awaited state in {polls} looks")


@pytest.mark.slow
def test_sigterm_to_a_real_run_is_exit_143_terminated_and_resumable(trees, tmp_path):
    """sigterm-mid-extraction-exit143-config-says-terminated-same-command-resumes: what ``timeout``
    or a scheduler sends; handled like Ctrl-C."""
    data = tmp_path / "in" / "data"
    shutil.copytree(trees["pacemaker"], data)
    before = snapshot(tmp_path / "in")
    args = ["--demo", "--model", "clip", "--image_path", str(data), *FAST, "--set", "batch_size=2"]
    out, cache = tmp_path / "out", tmp_path / "cache"
    process = _start(args, out, cache)
    try:
        _wait_for(lambda: list((cache / "features").rglob("*.npz")), process)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(("terminated", "error"))]
    assert lines == ["terminated (SIGTERM): what was complete is cached; run the same command again to resume"], err
    assert json.loads((out / "config.json").read_text())["status"] == "terminated"
    assert not (out / LOCK).exists() and not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    again = _start(args, out, cache)
    stdout, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    reused = next(line for line in stdout.splitlines() if line.startswith("feature cache:"))
    assert int(reused.split()[2]) >= 1, reused
    assert json.loads((out / "config.json").read_text())["status"] == "done"
    assert snapshot(tmp_path / "in") == before


@pytest.mark.slow
def test_a_second_run_beside_a_real_one_exits_2_naming_it(trees, tmp_path, capsys):
    """lock-second-run-beside-a-real-demo-run-exit2-names-its-pid-the-first-finishes: the first run
    is a real demo run in another process; the second (in this one) stops at once."""
    data = tmp_path / "data"
    shutil.copytree(trees["pacemaker"], data)
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = _start(["--demo", "--model", "clip", "--image_path", str(data), *FAST, "--set", "batch_size=2"],
                   out, cache)
    try:
        _wait_for(lambda: (out / "config.json").is_file(), first)
        result = run_main("pacemaker", ["--demo", "--model", "clip", "--image_path", str(data), *FAST,
                                        "--out", str(out), "--cache_dir", str(tmp_path / "cache2")], capsys)
        _, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert result.code == 2 and len(result.errors) == 1, result.err[-3000:]
    assert re.search(rf"in use by another run \(host {re.escape(socket.gethostname())}, pid {first.pid}, started ",
                     result.message), result.message
    assert first.returncode == 0, err[-3000:]
    assert json.loads((out / "config.json").read_text())["status"] == "done"
