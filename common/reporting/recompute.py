"""One method per report: the statistics of a run written by an older ``schema_version``, recomputed
from its predictions files (docs/statistics.md, "Schema versions").

A run's ``metrics.csv`` records the ``schema_version`` of the statistics that wrote it (none before
version 2).  The reports (``python -m common.report``, the study report) must not put an old run's
percentile-bootstrap p-values beside a new run's exact and permutation tests, so an older table
is replaced by :func:`common.evaluation.compare.evaluate_modes` run again on the seed ensembles of
``predictions_<mode>.csv`` (true class and class probabilities per test image), with the run's
recorded ``bootstrap_resamples``, ``seed`` and primary metric.  What the predictions files
cannot give is kept or left empty and said so: the spread over probe seeds (kept from the old
table: the files hold the ensemble only), the probe refits (need the features: left empty) and
the course-probe rows (no predictions file: left out).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

import configs
from common.data.registry import manufacturer_of
from common.errors import UserError
from common.evaluation.compare import SCHEMA_VERSION, evaluate_modes
from common.evaluation.metrics import MetricSpec
from common.registers.modes import BASELINE, ZERO_SHOT_SUFFIX, predictions_file

log = logging.getLogger(__name__)

DEFAULT_PERMUTATIONS = 2000   # configs.RUN_DEFAULTS' value, for runs that predate the key


def primary_of(info: dict) -> str:
    """The primary metric a run's config.json records, else its dataset's default
    (``configs.PRIMARY_METRIC``; top1 for an unknown dataset)."""
    value = (info.get("config") or {}).get("primary_metric")
    if isinstance(value, str) and value != "auto":
        return value
    return configs.PRIMARY_METRIC.get(str(info.get("dataset")), "top1")


def schema_of(metrics: pd.DataFrame) -> int:
    """The ``schema_version`` of a ``metrics.csv`` table (1 when the column is missing)."""
    if "schema_version" not in metrics.columns or metrics["schema_version"].isna().all():
        return 1
    return int(metrics["schema_version"].dropna().min())


def _read_predictions(path: Path) -> tuple[list[str], "pd.Series", "pd.DataFrame"]:
    frame = pd.read_csv(path)
    columns = [c for c in frame.columns if c.startswith("p[") and c.endswith("]")]
    return [c[2:-1] for c in columns], frame["true"].astype(str), frame[columns]


def _group(modes: list[str], baseline: str) -> list[str]:
    """The rows compared with ``baseline``: the probe rows (no suffix) or the zero-shot pair."""
    if baseline == BASELINE:
        return [m for m in modes if "(" not in m]
    return [m for m in modes if m.endswith(ZERO_SHOT_SUFFIX)]


def recompute(folder: Path, info: dict, metrics: pd.DataFrame) -> pd.DataFrame:
    """``metrics`` (indexed by mode) of an older schema, recomputed from ``folder``'s predictions
    files in the current one (module docstring).  One line naming the file when one cannot be read."""
    config = info.get("config") or {}
    modes = list(metrics.index)
    tables = []
    for baseline in (BASELINE, BASELINE + ZERO_SHOT_SUFFIX):
        group = [m for m in _group(modes, baseline) if (folder / predictions_file(m)).is_file()]
        if baseline not in group:
            continue
        probabilities, truth, names = {}, None, None
        for mode in [baseline] + [m for m in group if m != baseline]:
            path = folder / predictions_file(mode)
            try:
                classes, true, proba = _read_predictions(path)
            except (OSError, ValueError, KeyError) as error:
                raise UserError(f"{path}: cannot be read to recompute its statistics ({error})") from None
            if names is None:
                names, truth = classes, true
            elif classes != names or not true.equals(truth):
                raise UserError(f"{path}: its classes or test images differ from {predictions_file(baseline)}")
            probabilities[mode] = proba.to_numpy(float)[None]
        index = {name: i for i, name in enumerate(names)}
        y = truth.map(index)
        if y.isna().any():
            raise UserError(f"{folder / predictions_file(baseline)}: a true class is not among its p[...] columns")
        spec = MetricSpec(len(names), qwk="qwk" in metrics.columns,
                          manufacturer_of_class=[manufacturer_of(n) for n in names]
                          if "manufacturer_top1" in metrics.columns else None)
        table = evaluate_modes(y.to_numpy(int), probabilities, spec, n_boot=int(config.get("bootstrap_resamples", 1000)),
                               n_perm=int(config.get("permutations", DEFAULT_PERMUTATIONS)),
                               seed=int(config.get("seed", 0)), baseline=baseline, primary=primary_of(info))
        tables.append(table.set_index("mode"))
    if not tables:
        raise UserError(f"{folder}: metrics.csv was written by an older version (schema 1) and there are no "
                        "predictions files to recompute it from; run it again")
    table = pd.concat(tables)
    kept = {column: [metrics.loc[mode, column] if mode in metrics.index else math.nan for mode in table.index]
            for column in table.columns if column.endswith("_seed_sd") and column in metrics.columns}
    table = table.assign(**kept)   # the ensemble files lose the seeds: their spread as the run recorded it
    left_out = [m for m in modes if m not in table.index]
    log.warning("%s: written by schema %d; statistics recomputed from the predictions files with schema %d "
                "(probe refits not available%s)", folder / "metrics.csv", schema_of(metrics),
                SCHEMA_VERSION, f"; rows without a predictions file left out: {', '.join(left_out)}" if left_out else "")
    table.attrs["recomputed"] = True
    return table
