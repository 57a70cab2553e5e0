"""The study (docs/study.md): every (dataset, backbone) cell of a paper's grid, resumed, then one report.

::

    python -m common.study --data pacemaker=DIR orthonet=DIR aptos=DIR --out DIR
        [--models clip dinov2] [--axes normal_values=zero,mean backbone_size=vitl14,vitl14_reg
        neurons=detected,paper top_k=10,20,50 feature=cls,patch_mean] [--zero_shot]
        [--weights clip=PATH dinov2=PATH dinov2:vitl14_reg=PATH] [--set KEY=VALUE ...]
        [--cache_dir DIR] [--device DEVICE]
    python -m common.study --demo --out DIR [--data aptos orthonet] [--models clip] [--axes ...]
    torchrun --nproc_per_node=N -m common.study ...

The grid (which axis value applies where, cell names, each cell's arguments) is planned by
:mod:`common.app.grid`.  Each cell is an ordinary run folder ``OUT/cells/<cell name>/`` made by
calling :func:`common.app.cli.main` in this process with exactly the arguments a user would type
after ``python test_<dataset>.py``.  All cells share one cache folder (``--cache_dir``, else the
tool's default), so decoded images, no-ttr features and detection computed for one cell are
reused by the next.

Resume: a cell whose ``config.json`` says ``"status": "done"`` and whose recorded command line
is the one the study would run (same entry script, same arguments) is not run again; anything
else (no folder, a failed or interrupted run, another command) is run (the caches make a re-run
of unchanged work cheap).  A failing cell (exit code != 0) is recorded with its exit code and
last error line and the study goes on; it exits 1 at the end if any cell failed, 130 when
interrupted, 143 when terminated by SIGTERM (finished cells stay finished: run the same command
again), 2 for bad study arguments or a study folder another study is using (one line naming the
argument, before any run starts).

Under torchrun every rank runs every cell inside one :func:`common.distributed.session` (the runs
shard their own work; rank 0 decides which cells to resume and tells the others); only rank 0
writes ``study.json``, the cell logs and the report.

Writes ``OUT/study.json`` (the plan, each cell's command, status, exit code, seconds, and the
skipped combinations), ``OUT/logs/<cell>.log`` (the tail of each cell's output), ``OUT/cells/``
and ``OUT/report/`` (:mod:`common.reporting.studyreport`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import importlib.util
import logging
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from common.app.cli import MODELS, setup_logging
from common.app.outdir import finished_run
from common.app.grid import AXES, DEMO_AXES, DEMO_SETS, Cell, Request, Skipped, plan_grid
from common.app.settings import DatasetSpec, parse_key_values, resolve_config, set_keys
from common.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, UserError, run_entry

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DATASETS = ("pacemaker", "orthonet", "aptos")
DEFAULT_MODELS = ("clip", "dinov2")
STUDY_FILE = "study.json"
STUDY_FORMAT = "ttr-study/1"
LOG_TAIL_LINES = 400


# --------------------------------------------------------------------------------------------
# arguments


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), like every other bad argument of the study."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m common.study",
        description="Run the grid a paper needs (each dataset x each backbone x the axes you name), one ordinary "
                    "run folder per cell, resuming finished cells, then write one report (paper table with "
                    "Holm-adjusted p-values, per-class deltas, calibration, register-neuron overlap, scores by "
                    "layer, outlier statistics).")
    parser.add_argument("--data", nargs="+", default=[], metavar="DATASET=DIR",
                        help=f"dataset folders, e.g. aptos=/data/aptos; datasets: {', '.join(DATASETS)} "
                             "(with --demo: dataset names only, default all three)")
    parser.add_argument("--out", help="study folder: cells/, logs/, report/, study.json")
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help=f"backbone families ({', '.join(MODELS)}; default {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--axes", nargs="*", default=None, metavar="AXIS=V1,V2",
                        help="grid axes: " + "; ".join(
                            f"{a.name} ({', '.join(a.choices) if a.choices else 'positive integers'})"
                            for a in AXES.values()) + " (--demo default: normal_values=zero,mean)")
    parser.add_argument("--zero_shot", action="store_true",
                        help="clip cells also score class-name prompts, no-ttr vs ttr (other models have no text "
                             "tower; on in --demo)")
    parser.add_argument("--weights", nargs="+", default=[], metavar="MODEL[:SIZE]=PATH",
                        help="local checkpoints per model, e.g. clip=PATH dinov2=PATH dinov2:vitl14_reg=PATH "
                             "(MODEL=PATH serves the configured size only)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides for every cell (an axis key cannot also be set here)")
    parser.add_argument("--cache_dir", help="one cache for every cell (default: the tool's default)")
    parser.add_argument("--device", help="device of every cell: auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--demo", action="store_true",
                        help="a small grid on the planted fixture: synthetic data in each dataset's real layout "
                             "under OUT/data/, clip and dinov2, normal_values=zero,mean, trimmed statistics")
    return parser


def _parse_data(items: Sequence[str], demo: bool) -> dict[str, Path | None]:
    """``--data DATASET=DIR ...``; with ``--demo`` dataset names only (it generates its data)."""
    form = ("a dataset name only: --demo generates its data (e.g. --data aptos orthonet)" if demo
            else lambda key: f"{key}=DIR (the {key} dataset folder)")
    datasets: dict[str, Path | None] = {}
    for pair in parse_key_values(items, "--data", keys=DATASETS, noun="dataset", unique=True, value=not demo,
                                 form=form):
        folder = None if demo else Path(pair.value).expanduser()
        if folder is not None and not folder.is_dir():
            raise pair.error(f"no such folder {folder}; pass the {pair.key} dataset folder")
        datasets[pair.key] = folder
    return datasets


def _parse_axes(items: Sequence[str]) -> dict[str, tuple[str, ...]]:
    def form(name: str) -> str:
        return f"the values, e.g. {name}=" + ",".join((AXES[name].choices or ("10", "20"))[:2])

    axes: dict[str, tuple[str, ...]] = {}
    for pair in parse_key_values(items, "--axes", keys=tuple(AXES), noun="axis", unique=True, form=form):
        raw = [v for v in pair.value.split(",") if v.strip()]
        if not raw:
            raise pair.error(f"expected {form(pair.key)}")
        axes[pair.key] = tuple(dict.fromkeys(AXES[pair.key].parse(v) for v in raw))
    return axes


def _parse_weights(items: Sequence[str], models: Sequence[str]) -> dict[str, Path]:
    usage = f"MODEL=PATH or MODEL:SIZE=PATH with MODEL one of {', '.join(MODELS)}"
    sizes = AXES["backbone_size"].choices
    weights: dict[str, Path] = {}
    for pair in parse_key_values(items, "--weights", form=usage):
        model, _, size = pair.key.partition(":")
        if model not in MODELS:
            raise pair.error(f"expected {usage}")
        if model not in models:
            raise pair.error(f"{model} is not among --models ({' '.join(models)})")
        if size and size not in sizes:
            raise pair.error(f"unknown size {size!r}; valid: {', '.join(sizes)}")
        path = Path(pair.value).expanduser()
        if not path.is_file():
            raise pair.error(f"no such file {path}")
        weights[pair.key] = path
    return weights


def _check_sets(sets: Sequence[str], models: Sequence[str], axes: dict[str, tuple[str, ...]],
                demo: bool) -> tuple[int, dict[str, str]]:
    """Every override valid for every model (as its runs will resolve it); returns the seed and
    each model's configured backbone_size."""
    for pair in set_keys(sets):
        if pair.key in axes:
            raise pair.error(f"{pair.key} is a grid axis here (--axes {pair.key}=...); set it in one place")
        if pair.key == "zero_shot":
            raise pair.error("use the study's --zero_shot flag (it applies to clip cells only)")
    seed, sizes = 0, {}
    for model in models:
        config = resolve_config(model, [*(DEMO_SETS if demo else ()), *sets], demo=demo)
        seed = int(config["seed"])
        if "backbone_size" in config:
            sizes[model] = str(config["backbone_size"])
    return seed, sizes


def parse_args(argv: Sequence[str]) -> Request:
    """The checked request (UserError naming the argument otherwise); runs nothing."""
    args = build_parser().parse_args(list(argv))
    if not args.out:
        raise UserError("--out is required: the study folder (cells/, report/, study.json)")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the study")
    if not args.demo and not args.data:
        raise UserError("--data is required: e.g. --data pacemaker=DIR orthonet=DIR aptos=DIR (or --demo)")
    if args.demo and args.weights:
        raise UserError("--weights: --demo runs the planted models; drop --weights")
    datasets = _parse_data(args.data, args.demo) if args.data else dict.fromkeys(DATASETS)
    models = tuple(args.models) if args.models else DEFAULT_MODELS
    for model in models:
        if model not in MODELS:
            raise UserError(f"--models {model}: unknown model; use {', '.join(MODELS)}")
    if len(set(models)) != len(models):
        raise UserError(f"--models {' '.join(models)}: a model is given twice")
    if args.axes is None:
        axes = dict(DEMO_AXES) if args.demo else {}
    else:
        axes = _parse_axes(args.axes)
    weights = _parse_weights(args.weights, models)
    seed, sizes = _check_sets(args.set, models, axes, args.demo)
    if args.device:
        from common.models.devices import resolve_device

        resolve_device(args.device)
    return Request(out=out, datasets=datasets, models=models, axes=axes, zero_shot=args.zero_shot or args.demo,
                   weights=weights, sets=tuple(args.set), cache_dir=Path(args.cache_dir).expanduser()
                   if args.cache_dir else None, device=args.device, demo=args.demo, seed=seed, default_sizes=sizes,
                   command_line=["python", "-m", "common.study", *argv])


# --------------------------------------------------------------------------------------------
# running one cell


def load_entry(dataset: str) -> DatasetSpec:
    """The ``DATASET`` spec of ``test_<dataset>.py`` at the repository root (loaded by path, so the
    study runs exactly what the script runs)."""
    path = ROOT / f"test_{dataset}.py"
    spec = importlib.util.spec_from_file_location(f"_study_entry_{dataset}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DATASET


def invoke(spec: DatasetSpec, argv: list[str]) -> int:
    """``common.app.cli.main`` in this process; argparse's own exits become exit codes."""
    from common.app.cli import main as run_main

    try:
        return int(run_main(spec, list(argv)))
    except SystemExit as stop:
        code = stop.code
        return 0 if code is None else code if isinstance(code, int) else 2


class _Tee:
    """stderr that is also remembered (the last lines), for the cell's log and its error line."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._partial = ""

    def write(self, text: str) -> int:
        self._stream.write(text)
        parts = (self._partial + text).split("\n")
        self._partial = parts.pop()
        for part in parts:
            # progress bars redraw with \r: keep only what a terminal would end up showing
            self.lines.append(part.rstrip("\r").rsplit("\r", 1)[-1])
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def text(self) -> str:
        tail = self._partial.rsplit("\r", 1)[-1]
        return "\n".join([*self.lines, *([tail] if tail.strip() else [])]) + "\n"

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")


def last_error_line(text: str) -> str:
    """The line that says what went wrong: the CLI's ``error: ...`` line, else (an unexpected
    failure) the traceback's last line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") and not line.startswith("error: unexpected failure"):
            return line
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line
    return lines[-1] if lines else ""


def finished(cell: Cell) -> bool:
    """True when the cell's folder holds a finished run of exactly this cell's command."""
    info = finished_run(Path(cell.folder))
    recorded = info.get("command_line") if info is not None else None
    return (isinstance(recorded, list) and len(recorded) >= 1
            and Path(str(recorded[0])).name == cell.script and list(recorded[1:]) == cell.argv)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 600:
        return f"{seconds / 60:.1f} min"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _release_memory() -> None:
    """A cell's backbone is garbage once it returns; free it before the next one loads."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def run_cell(cell: Cell, spec: DatasetSpec, main: bool) -> tuple[int, str]:
    """Run one cell (every rank calls it; ``main`` is rank 0); returns (exit code, the tail of what
    it printed on stderr)."""
    tee = _Tee(sys.stderr)
    previous = sys.stderr
    sys.stderr = tee
    try:
        code = invoke(spec, cell.argv)
    finally:
        sys.stderr = previous
        setup_logging()  # the run pointed logging at the tee; point it back
        _release_memory()
    return code, tee.text()


# --------------------------------------------------------------------------------------------
# the study


def study_record(request: Request, cells: list[Cell], skipped: list[Skipped], status: str,
                 seconds: float | None = None) -> dict:
    """What ``study.json`` holds (and :mod:`common.reporting.studyreport` reads)."""
    return {
        "format": STUDY_FORMAT,
        "status": status,
        "demo": request.demo,
        "root": str(ROOT),
        "command_line": request.command_line,
        "out": str(request.out.resolve()),
        "datasets": {k: (str(v.resolve()) if v else None) for k, v in request.datasets.items()},
        "models": list(request.models),
        "axes": {k: list(v) for k, v in request.axes.items()},
        "zero_shot": request.zero_shot,
        "sets": [*(DEMO_SETS if request.demo else ()), *request.sets],
        "cache_dir": str(request.cache_dir.resolve()) if request.cache_dir else None,
        "device": request.device,
        "weights": {k: str(v.resolve()) for k, v in request.weights.items()},
        "wall_seconds": seconds,
        "cells": [{**asdict(cell), "command": cell.command(), "script": cell.script} for cell in cells],
        "skipped": [asdict(s) for s in skipped],
    }


def _demo_data(request: Request) -> None:
    from common.demo.demo import demo_data_at

    for dataset in request.datasets:
        demo_data_at(dataset, request.out / "data" / dataset, request.seed)


def _session_device(request: Request):
    from common.models.devices import resolve_device

    return resolve_device(request.device or ("cpu" if request.demo else "auto"))


Runner = Callable[[Cell, DatasetSpec, bool], tuple[int, str]]


def run_grid(cells: list[Cell], dist, save: Callable[[], None], runner: Runner = run_cell) -> bool:
    """Run (or resume) every cell in order; returns False when interrupted."""
    from common.io import write_text

    main = dist.is_main
    specs = {dataset: load_entry(dataset) for dataset in {cell.dataset for cell in cells}}
    to_run = [not finished(cell) for cell in cells]   # for the ETA only; decided again per cell
    durations: list[float] = []
    total = len(cells)
    for index, cell in enumerate(cells):
        label = f"cell {index + 1}/{total} {cell.name}"
        resume = dist.broadcast(finished(cell) if main else None)
        if resume:
            cell.status, cell.exit_code = "resumed", 0
            if main:
                _progress(f"{label}: resumed (finished earlier: {cell.folder})")
                save()
            continue
        if main:
            _progress(f"{label}: running: {cell.command()}")
        started = time.monotonic()
        try:
            code, output = runner(cell, specs[cell.dataset], main)
        except Terminated:
            code, output = EXIT_TERMINATED, ""
        except KeyboardInterrupt:
            code, output = EXIT_INTERRUPTED, ""
        cell.seconds = round(time.monotonic() - started, 1)
        cell.exit_code = code
        if main:
            write_text(Path(cell.folder).parent.parent / "logs" / f"{cell.name}.log",
                       f"$ {cell.command()}\n{output}")
        if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            cell.status = "interrupted" if code == EXIT_INTERRUPTED else "terminated"
            if main:
                save()
            return False
        durations.append(cell.seconds)
        left = sum(to_run[index + 1:])
        eta = f"; ETA {_duration(left * sum(durations) / len(durations))}" if left else ""
        if code == 0:
            cell.status = "done"
            message = f"done in {_duration(cell.seconds)}{eta}"
        else:
            cell.status = "failed"
            cell.error = last_error_line(output)
            message = f"FAILED (exit {code}) in {_duration(cell.seconds)}: {cell.error}{eta}"
        if main:
            _progress(f"{label}: {message}")
            save()
    return True


def run_study(request: Request, runner: Runner = run_cell) -> int:
    """Plan, run the grid, write the report; returns the exit code (0, 1 a cell failed, 130)."""
    from common import distributed
    from common.io import write_json

    cells, skipped = plan_grid(request)
    if not cells:
        raise UserError("the grid is empty: every combination was skipped ("
                         + "; ".join(f"{s.combination}: {s.reason}" for s in skipped[:2]) + ")")
    started = time.monotonic()
    study_file = request.out / STUDY_FILE
    with distributed.session(_session_device(request)) as (dist, _):
        main = dist.is_main

        def save(status: str = "running") -> None:
            if main:
                write_json(study_file, study_record(request, cells, skipped, status,
                                                    round(time.monotonic() - started, 1)))

        if main:
            request.out.mkdir(parents=True, exist_ok=True)
            save()
            log.info("study: %d cells (%d datasets x %d models%s), %d combinations skipped; %s",
                     len(cells), len(request.datasets), len(request.models),
                     "".join(f" x {axis} {','.join(v)}" for axis, v in request.axes.items()), len(skipped),
                     study_file)
            if request.demo:
                _demo_data(request)
        dist.barrier()  # the demo's data is complete before any rank reads it
        complete = run_grid(cells, dist, save, runner)
        if not complete:
            stopped = next(cell for cell in cells if cell.status in ("interrupted", "terminated"))
            save(stopped.status)
            if main:
                _progress(f"{stopped.status}: finished cells are kept; run the same command again to resume")
            return stopped.exit_code
        failed = [cell for cell in cells if cell.status == "failed"]
        save("done" if not failed else "failed cells")
        if main:
            from common.reporting.studyreport import write_report

            report = write_report(study_record(request, cells, skipped, "done" if not failed else "failed cells",
                                               round(time.monotonic() - started, 1)), request.out / "report")
            _progress(f"study: {len(cells)} cells ({sum(c.status == 'resumed' for c in cells)} resumed, "
                      f"{len(failed)} failed) in {_duration(time.monotonic() - started)}; report: {report}")
            if failed:
                _progress("failed cells: " + ", ".join(f"{c.name} (exit {c.exit_code})" for c in failed))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m common.study``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()

    def body() -> int:
        from common import distributed
        from common.locks import FolderLock

        request = parse_args(argv)
        # one study per folder (rank 0 holds the lock; each cell's run locks its own folder too)
        with FolderLock(request.out) if distributed.is_main_process() else contextlib.nullcontext():
            return run_study(request)

    return run_entry(body, interrupted="finished cells are kept; run the same command again to resume")
