"""The study as a job array of the user's scheduler (docs/study.md; no scheduler of our own).

``--shard I/N`` runs the I-th of N disjoint slices of the grid's cells (1-based; cell k of the
planned order belongs to shard ``k mod N + 1``, so datasets and models spread over the shards) and
writes only those cells' run folders and a state file of its own,
``OUT/shards/shard-I-of-N.json`` - never the shared ``study.json``, so shards running at the same
time never write one file.  ``--report_only`` runs nothing: it plans the same grid, reads every
state file (and an unsharded run's ``study.json``), takes each cell's latest finished record (else
a run folder that holds a finished run of exactly the cell's command counts as resumed; else the
cell is pending), writes ``study.json`` and the report - the report an unsharded study of the same
arguments writes.

A state file records the grid it belongs to (:func:`grid_id`: every cell's name and arguments); a
shard of another grid is an error naming its file.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Callable, Sequence

from common.app.grid import Cell
from common.errors import UserError

STUDY_FILE = "study.json"
SHARD_FOLDER = "shards"
FINISHED = ("done", "resumed")
TERMINAL = ("done", "resumed", "failed")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with 1 <= I <= N (a UserError naming the value otherwise)."""
    index, sep, count = str(text).strip().partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise UserError(f"--shard {text}: expected I/N with 1 <= I <= N, e.g. --shard 2/8 (SLURM: "
                        "--shard $((SLURM_ARRAY_TASK_ID+1))/$SLURM_ARRAY_TASK_COUNT)")
    return int(index), int(count)


def my_cells(cells: Sequence[Cell], shard: tuple[int, int]) -> list[Cell]:
    """The cells of shard ``(I, N)``: every N-th cell of the planned order, from the I-th."""
    index, count = shard
    return list(cells[index - 1::count])


def state_path(out: Path, shard: tuple[int, int]) -> Path:
    index, count = shard
    return Path(out) / SHARD_FOLDER / f"shard-{index}-of-{count}.json"


def grid_id(cells: Sequence[Cell]) -> str:
    """What identifies a grid: each cell's name and arguments, in order."""
    text = json.dumps([[cell.name, cell.argv] for cell in cells])
    return hashlib.sha1(text.encode()).hexdigest()


def report_command(command_line: Sequence[str]) -> str:
    """The command that writes the report once every shard has finished."""
    return shlex.join([*command_line, "--report_only"])


def _records(out: Path, grid: str) -> tuple[list[tuple[float, dict]], list[str]]:
    """(mtime, record) of every state file of this grid, and a note per file left out."""
    found, notes = [], []
    shard_files = sorted((Path(out) / SHARD_FOLDER).glob("shard-*-of-*.json"))
    for path in [*shard_files, Path(out) / STUDY_FILE]:
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{path}: not a readable study state file ({error}); remove it or run its shard "
                            "again") from None
        if record.get("grid_id") != grid:
            if path.name == STUDY_FILE:      # an earlier study.json of other arguments: replaced below
                notes.append(f"{path} belongs to another grid and was not read")
                continue
            raise UserError(f"{path} was written by a shard of another grid (other datasets, models, axes or "
                            "settings); run --report_only with the arguments the shards ran with, or remove it")
        found.append((path.stat().st_mtime, record))
    return found, notes


def statuses_from_states(out: Path, cells: list[Cell], finished: Callable[[Cell], bool]) -> list[str]:
    """Set each cell's status, exit code, error and seconds from the state files under ``out``
    (the latest finished or failed record wins); a cell no file finished counts as resumed when its
    folder holds a finished run of its command, else pending.  Returns notes for the log."""
    records, notes = _records(out, grid_id(cells))
    by_name: dict[str, list[tuple[bool, float, dict]]] = {}
    for mtime, record in records:
        for entry in record.get("cells", []):
            by_name.setdefault(entry.get("name"), []).append((entry.get("status") in TERMINAL, mtime, entry))
    for cell in cells:
        candidates = sorted(by_name.get(cell.name, []), key=lambda item: item[:2])
        entry = candidates[-1][2] if candidates and candidates[-1][0] else None
        if entry is not None:
            cell.status, cell.exit_code = entry["status"], entry.get("exit_code")
            cell.error, cell.seconds = entry.get("error", ""), entry.get("seconds")
        elif finished(cell):
            cell.status, cell.exit_code = "resumed", 0
        else:
            cell.status = "pending"
    return notes
