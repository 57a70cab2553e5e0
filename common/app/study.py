"""The study (docs/study.md): every (dataset, backbone) cell of a paper's grid, resumed, then one report.

::

    python -m common.study --data pacemaker=DIR orthonet=DIR aptos=DIR --out DIR
        [--models clip dinov2 uni timm:<name> ...] [--axes normal_values=zero,mean
        backbone_size=vitl14,vitl14_reg neurons=detected,paper top_k=10,20,50 feature=cls,patch_mean
        highest_layer=9,19] [--zero_shot] [--weights clip=PATH dinov2=PATH dinov2:vitl14_reg=PATH]
        [--set KEY=VALUE ...] [--cache_dir DIR] [--device DEVICE] [--shard I/N | --report_only]
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

Under torchrun every rank runs every cell inside one :func:`common.runtime.distributed.session` (the runs
shard their own work; rank 0 decides which cells to resume and tells the others); only rank 0
writes ``study.json``, the cell logs and the report.

Writes ``OUT/study.json`` (the plan, each cell's command, status, exit code, seconds, and the
skipped combinations), ``OUT/logs/<cell>.log`` (the tail of each cell's output), ``OUT/cells/``
and ``OUT/report/`` (:mod:`common.reporting.studyreport`).

As a job array (:mod:`common.app.shards`): ``--shard I/N`` runs the I-th of N slices of the cells
and writes ``OUT/shards/shard-I-of-N.json`` instead of ``study.json``; ``--report_only`` writes
``study.json`` and the report from the cells found.  The arguments: :mod:`common.app.study_args`.
"""

from __future__ import annotations

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

from common.app.cli import setup_logging
from common.app.grid import DEMO_SETS, Cell, Request, Skipped, plan_grid
from common.app.outdir import finished_run
from common.app.settings import DatasetSpec
from common.app.shards import STUDY_FILE, grid_id, my_cells, report_command, state_path, statuses_from_states
from common.app.study_args import parse_args
from common.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, UserError, run_entry

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
STUDY_FORMAT = "ttr-study/1"
LOG_TAIL_LINES = 400


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
                 seconds: float | None = None, grid: str = "") -> dict:
    """What ``study.json`` holds (and :mod:`common.reporting.studyreport` reads); a shard's state file
    holds the same for its own cells.  ``grid``: :func:`common.app.shards.grid_id` of the whole grid."""
    return {
        "format": STUDY_FORMAT,
        "status": status,
        "grid_id": grid,
        "shard": list(request.shard) if request.shard else None,
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


def _demo_data(request: Request, cells: list[Cell]) -> None:
    from common.demo.demo import demo_data_at

    for dataset in dict.fromkeys(cell.dataset for cell in cells):
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
    """Plan, run the grid (or this shard's slice of it), write the report (not a shard); returns the
    exit code (0, 1 a cell failed, 130)."""
    from common.runtime import distributed
    from common.io import write_json

    all_cells, skipped = plan_grid(request)
    if not all_cells:
        raise UserError("the grid is empty: every combination was skipped ("
                         + "; ".join(f"{s.combination}: {s.reason}" for s in skipped[:2]) + ")")
    grid = grid_id(all_cells)
    if request.report_only:
        return report_only(request, all_cells, skipped, grid)
    cells = my_cells(all_cells, request.shard) if request.shard else all_cells
    started = time.monotonic()
    state_file = state_path(request.out, request.shard) if request.shard else request.out / STUDY_FILE
    with distributed.session(_session_device(request)) as (dist, _):
        main = dist.is_main

        def save(status: str = "running") -> None:
            if main:
                write_json(state_file, study_record(request, cells, skipped, status,
                                                    round(time.monotonic() - started, 1), grid))

        if main:
            request.out.mkdir(parents=True, exist_ok=True)
            save()
            shard = f"shard {request.shard[0]}/{request.shard[1]}: {len(cells)} of " if request.shard else ""
            log.info("study: %s%d cells (%d datasets x %d models%s), %d combinations skipped; %s",
                     shard, len(all_cells), len(request.datasets), len(request.models),
                     "".join(f" x {axis} {','.join(v)}" for axis, v in request.axes.items()), len(skipped),
                     state_file)
            if request.demo:
                _demo_data(request, cells)
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
        if main and request.shard:
            _progress(f"shard {request.shard[0]}/{request.shard[1]}: {len(cells)} cells "
                      f"({sum(c.status == 'resumed' for c in cells)} resumed, {len(failed)} failed) in "
                      f"{_duration(time.monotonic() - started)}; state: {state_file}; once every shard has "
                      f"finished: {report_command(request.command_line)}")
        elif main:
            from common.reporting.studyreport import write_report

            report = write_report(study_record(request, cells, skipped, "done" if not failed else "failed cells",
                                               round(time.monotonic() - started, 1), grid), request.out / "report")
            _progress(f"study: {len(cells)} cells ({sum(c.status == 'resumed' for c in cells)} resumed, "
                      f"{len(failed)} failed) in {_duration(time.monotonic() - started)}; report: {report}")
        if main and failed:
            _progress("failed cells: " + ", ".join(f"{c.name} (exit {c.exit_code})" for c in failed))
    return 1 if failed else 0


def report_only(request: Request, cells: list[Cell], skipped: list[Skipped], grid: str) -> int:
    """``--report_only``: each cell's status from the state files (:mod:`common.app.shards`),
    ``study.json`` and the report from the cells found; 0 when every cell finished, else 1."""
    from common.runtime.distributed import is_main_process
    from common.io import write_json
    from common.reporting.studyreport import write_report

    if not is_main_process():     # under torchrun: one writer
        return 0
    for note in statuses_from_states(request.out, cells, finished):
        log.warning("%s", note)
    failed = [cell for cell in cells if cell.status == "failed"]
    pending = [cell for cell in cells if cell.status not in ("done", "resumed", "failed")]
    status = "done" if not failed and not pending else "failed cells" if not pending else "incomplete"
    record = study_record(request, cells, skipped, status, None, grid)
    write_json(request.out / STUDY_FILE, record)
    report = write_report(record, request.out / "report")
    _progress(f"study report from {len(cells) - len(pending)} of {len(cells)} cells ({len(failed)} failed"
              + (f"; not run yet: {', '.join(c.name for c in pending)}" if pending else "") + f"): {report}")
    return 0 if status == "done" else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m common.study``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()

    def body() -> int:
        from common.runtime import distributed
        from common.runtime.locks import LOCK, FolderLock

        request = parse_args(argv)
        # one study per folder (rank 0 holds the lock; each cell's run locks its own folder too); the
        # shards of a job array share the folder, so each shard locks only its own slice
        name = f"{LOCK}-shard-{request.shard[0]}-of-{request.shard[1]}" if request.shard else LOCK
        lock = FolderLock(request.out, name=name) if distributed.is_main_process() else contextlib.nullcontext()
        with lock:
            return run_study(request)

    return run_entry(body, interrupted="finished cells are kept; run the same command again to resume")
