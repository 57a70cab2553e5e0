"""The study report's input: the finished cells of a study record, read from their run folders.

Every number of the report comes from there (``config.json``, ``metrics.csv``,
``predictions_<mode>.csv``, ``outliers.csv``, ``register_neurons.json``); nothing is recomputed
from features.  A cell written by an older statistics schema has its statistics recomputed from
its predictions files (:mod:`common.reporting.recompute`), so the report never mixes methods.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError
from common.registers.modes import BASELINE, TTR, ZERO_SHOT_SUFFIX, predictions_file
from common.reporting.format import MISSING
from common.reporting.recompute import primary_of
from common.reporting.report import read_run

# The comparisons a cell's metrics.csv may hold: (kind, no-ttr row, ttr row).
COMPARISONS = (("probe", BASELINE, TTR), ("zero-shot", BASELINE + ZERO_SHOT_SUFFIX, TTR + ZERO_SHOT_SUFFIX))


@dataclass
class CellRun:
    """A finished cell, read from its run folder."""

    name: str
    dataset: str
    model: str
    settings: dict
    folder: Path
    info: dict                      # config.json
    metrics: pd.DataFrame           # metrics.csv, index mode
    outliers: pd.DataFrame | None   # outliers.csv, index mode
    neurons: dict | None            # register_neurons.json
    main: bool = True               # a main cell (dataset x model at the axes' main values)
    primary: str = "top1"           # the run's primary metric
    recomputed: bool = False        # statistics recomputed from the predictions (older schema)

    @property
    def backbone(self) -> str:
        return str(self.info.get("backbone") or self.model)


def predictions_path(folder: Path, mode: str) -> Path:
    """The predictions file of a metrics.csv row (:func:`common.registers.modes.predictions_file`)."""
    return folder / predictions_file(mode)


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(class names [C], true [N], predicted [N], probabilities [N, C])`` of a predictions file
    (class indices in the file's ``p[<class>]`` column order)."""
    frame = pd.read_csv(path)
    columns = [c for c in frame.columns if c.startswith("p[") and c.endswith("]")]
    names = [c[2:-1] for c in columns]
    index = {name: i for i, name in enumerate(names)}
    true = frame["true"].astype(str).map(index)
    predicted = frame["predicted"].astype(str).map(index)
    if true.isna().any() or predicted.isna().any():
        raise UserError(f"{path}: a true or predicted class is not among its p[...] columns")
    return names, true.to_numpy(np.int64), predicted.to_numpy(np.int64), frame[columns].to_numpy(float)


def main_cells(cells: list[dict]) -> set[str]:
    """The names of the main cells: as the study record marks them (``main``); a record written
    before the mark: per (dataset, model) the cell without axis settings, else its first cell."""
    if all("main" in cell for cell in cells):
        return {cell["name"] for cell in cells if cell["main"]}
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["dataset"], cell["model"]), []).append(cell)
    return {next((c for c in group if not c["settings"]), group[0])["name"] for group in groups.values()}


def read_cells(study: dict) -> tuple[list[CellRun], list[str]]:
    """The finished cells (status done or resumed) and a note per cell that could not be read."""
    runs, notes = [], []
    mains = main_cells(study["cells"])
    for cell in study["cells"]:
        if cell["status"] not in ("done", "resumed"):
            continue
        folder = Path(cell["folder"])
        try:
            run = read_run(folder)
        except UserError as error:
            notes.append(f"{cell['name']}: {error}")
            continue
        neurons = None
        if (folder / "register_neurons.json").is_file():
            try:
                neurons = json.loads((folder / "register_neurons.json").read_text())
            except (OSError, ValueError) as error:
                notes.append(f"{cell['name']}: register_neurons.json cannot be read ({error})")
        runs.append(CellRun(cell["name"], cell["dataset"], cell["model"], dict(cell["settings"]), folder,
                            run["info"], run["metrics"], run["outliers"], neurons, main=cell["name"] in mains,
                            primary=primary_of(run["info"]), recomputed=bool(run.get("recomputed"))))
    return runs, notes


def identity_of(run: CellRun, axes: list[str]) -> dict:
    """The columns that name a cell in every table: cell, dataset, model and its axis settings."""
    row = {"cell": run.name, "dataset": run.dataset, "model": run.model}
    row.update({axis: run.settings.get(axis, MISSING) for axis in axes})
    return row


def comparisons_of(run: CellRun):
    """``(kind, no-ttr row, ttr row)`` of each comparison in the cell's metrics.csv."""
    for kind, base, mode in COMPARISONS:
        if base in run.metrics.index and mode in run.metrics.index:
            yield kind, base, mode


def value_of(frame: pd.DataFrame, row: str, column: str) -> float:
    """``frame.loc[row, column]`` as a float; NaN where the column is absent or the value missing."""
    if column not in frame.columns:
        return math.nan
    value = frame.loc[row, column]
    return math.nan if value is None or pd.isna(value) else float(value)


def to_float(value) -> float:
    """A config.json value as a float; NaN for None or anything that is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def entry_label(cell: str, comparison: str) -> str:
    """How tables and figures name a (cell, comparison): the cell, marked when zero-shot."""
    return cell + ("  (zero-shot)" if comparison == "zero-shot" else "")


@dataclass
class Ranking:
    """One dataset's detected ranking on one backbone."""

    dataset: str
    cell: str
    backbone: str
    identity: tuple
    highest_layer: int
    top_k: int
    selected: set[tuple[int, int]]
    ranked: np.ndarray              # [M, 3]: layer, neuron, score (best first; NaN scores kept)

    def scores(self) -> dict[tuple[int, int], float]:
        return {(int(l), int(n)): float(s) for l, n, s in self.ranked}


def _identity_key(model: dict | None) -> tuple | None:
    if not model:
        return None
    return (model.get("family"), model.get("architecture"), model.get("layers"), model.get("mlp_width"),
            model.get("weights"))


def detected_rankings(runs: list[CellRun]) -> list[Ranking]:
    """Each detected ranking once per (backbone, dataset, highest_layer, top_k): the cells of one
    dataset and backbone that differ only in ttr settings share one detection."""
    seen, rankings = set(), []
    for run in runs:
        data = run.neurons
        if not data or data.get("source") != "detected" or not data.get("ranked"):
            continue
        identity = _identity_key(data.get("model"))
        key = (identity, run.dataset, data.get("highest_layer"), data.get("top_k"))
        if key in seen:
            continue
        seen.add(key)
        selected = {(int(layer), int(n)) for layer, ids in (data.get("selected") or {}).items() for n in ids}
        ranked = np.array([[l, n, math.nan if s is None else s] for l, n, s in data["ranked"]], dtype=float)
        rankings.append(Ranking(run.dataset, run.name, run.backbone, identity, int(data.get("highest_layer", -1)),
                                int(data.get("top_k", 0)), selected, ranked))
    return rankings
