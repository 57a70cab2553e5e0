"""The study's report (docs/study.md): one folder of Markdown, CSVs and figures over the grid's cells.

Input: the study record (``OUT/study.json``, written by :mod:`common.app.study`): each cell's name,
dataset, model, axis settings, folder, command, status, exit code and error line, and the skipped
combinations.  Every number comes from the cells' run folders (``config.json``, ``metrics.csv``,
``predictions_<mode>.csv``, ``outliers.csv``, ``register_neurons.json``); nothing is recomputed
from features.  Files (``OUT/report/``):

==========================  =====================================================================
``report.md``                everything below for a human, the answer first
``paper_table.csv``          one row per (cell, comparison, metric): ``cell, dataset, model,
                             <axis>..., comparison`` (``probe`` | ``zero-shot``), ``metric, main,
                             primary, family, no_ttr, ttr, diff, diff_lo, diff_hi, p, test,
                             discordant_ttr_better, discordant_ttr_worse, changed_predictions,
                             refits, diff_lo_refit, diff_hi_refit, recomputed, p_holm,
                             family_size, verdict`` (``diff`` = ttr - no-ttr of the seed ensembles
                             with its 95% interval and test, as the cell's metrics.csv has them)
``per_class.csv``            per (cell, comparison, class): ``support, recall_no_ttr, recall_ttr,
                             recall_delta, f1_no_ttr, f1_ttr, f1_delta`` (from the predictions files)
``calibration.csv``          per (cell, mode): ``n, accuracy, mean_confidence, ece, brier`` and on
                             ttr rows their change with a paired bootstrap interval
``neuron_overlap.csv``       per backbone and pair of datasets: ``selected_a, selected_b, shared,
                             jaccard, spearman_rho, spearman_n`` (rho over the union of the two
                             selections; + rows against the published set)
``outliers.csv``             per cell: the no-ttr and ttr values of each run's outliers.csv
``cells.csv``                per cell: status, exit code, error line, seconds, folder, command
``skipped.csv``              the combinations not run and why
``paper_table.png``          forest plot of the headline differences (filled: primary metric of a
                             main cell with Holm-adjusted p < 0.05)
``per_class_<dataset>.png``  recall change per class and cell (heat map, percentage points)
``calibration.png``          ECE and Brier score per cell, no-ttr -> ttr
``outliers.png``             share of patches above threshold and max patch norm, no-ttr -> ttr
``scores_by_layer_<b>.png``  register-neuron scores by layer per backbone, highest_layer cut drawn
==========================  =====================================================================

Multiplicity: Holm (1979) over the **primary metric of the main cells** (the datasets x models
the study lists, each at its axes' main values; one probe comparison per cell,
:func:`common.evaluation.stats.holm`); the sensitivity axes, the zero-shot comparisons and the
secondary metrics are exploratory, unadjusted, and labelled so.  A cell written by an older
statistics schema is recomputed from its predictions files first (one method per report).

The work is split by job: :mod:`~common.reporting.study_read` (the cells and their files),
:mod:`~common.reporting.study_tables` (the CSVs), :mod:`~common.reporting.study_figures` (the
PNGs) and :mod:`~common.reporting.study_markdown` (``report.md``); this module writes them.

``python -m common.studyreport STUDY_DIR`` writes the report again from ``STUDY_DIR/study.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from common.errors import UserError, run_entry
from common.io import write_csv, write_text
from common.runtime.locks import FolderLock
from common.reporting.figures import save_png
from common.reporting.format import MISSING
from common.reporting.study_figures import (
    calibration_figure,
    forest_figure,
    outliers_figure,
    per_class_figure,
    scores_figure,
    slug,
)
from common.reporting.study_markdown import markdown
from common.reporting.study_read import Ranking, detected_rankings, main_cells, read_cells
from common.reporting.study_tables import (
    calibration_table,
    neuron_overlap,
    outliers_table,
    paper_table,
    per_class_table,
)


def _score_figures(rankings: list[Ranking], out: Path) -> list[tuple[str, str]]:
    """One scores-by-layer figure per backbone, one curve per dataset (the widest selection of
    each: top_k may be an axis); returns (file name, title) of each."""
    groups: dict[tuple, list[Ranking]] = {}
    for ranking in rankings:
        groups.setdefault(ranking.identity, []).append(ranking)
    written = []
    for members in groups.values():
        per_dataset: dict[str, Ranking] = {}
        for member in members:
            if member.dataset not in per_dataset or member.top_k > per_dataset[member.dataset].top_k:
                per_dataset[member.dataset] = member
        name = f"scores_by_layer_{slug(members[0].backbone)}.png"
        save_png(scores_figure(list(per_dataset.values())), out / name)
        written.append((name, f"register-neuron scores by layer, {members[0].backbone}"))
    return written


def write_report(study: dict, out: str | Path) -> Path:
    """Write the report of ``study`` (the study record) under ``out``; returns ``out/report.md``."""
    out = Path(out)
    axes = list(study["axes"])
    runs, notes = read_cells(study)
    rankings = detected_rankings(runs)
    tables = {"paper_table": paper_table(runs, axes),
              "per_class": per_class_table(runs, axes), "calibration": calibration_table(runs, axes),
              "outliers": outliers_table(runs, axes), "neuron_overlap": neuron_overlap(rankings)}
    mains = main_cells(study["cells"])
    cells = pd.DataFrame([{k: c[k] for k in ("name", "dataset", "model", "status", "exit_code", "error", "seconds",
                                             "folder", "command")} | {"main": c["name"] in mains}
                          | {a: c["settings"].get(a, MISSING) for a in axes} for c in study["cells"]])
    skipped = pd.DataFrame(study["skipped"], columns=["dataset", "model", "combination", "reason"])
    for name, frame in (*tables.items(), ("cells", cells), ("skipped", skipped)):
        write_csv(out / f"{name}.csv", frame)

    paper, per_class = tables["paper_table"], tables["per_class"]
    if not paper.empty:
        save_png(forest_figure(paper), out / "paper_table.png")
    for dataset in study["datasets"]:
        if (per_class["dataset"] == dataset).any():
            save_png(per_class_figure(per_class, dataset), out / f"per_class_{dataset}.png")
    if not tables["calibration"].empty:
        save_png(calibration_figure(tables["calibration"]), out / "calibration.png")
    if not tables["outliers"].empty:
        save_png(outliers_figure(tables["outliers"]), out / "outliers.png")
    score_figures = _score_figures(rankings, out)
    return write_text(out / "report.md", markdown(study, runs, notes, tables, rankings, score_figures))


STUDY_KEYS = ("cells", "axes", "datasets", "skipped")
CELL_KEYS = ("name", "dataset", "model", "settings", "folder", "status")


def read_study(study_dir: Path) -> dict:
    """The study record of ``study_dir`` checked as the report needs it (one line naming what is
    wrong otherwise).  A study folder that was moved or copied reports its own cells: a cell whose
    recorded folder is gone is looked for under ``study_dir/cells/``.  A finished cell whose run
    folder holds a run of another dataset or model than the record says is refused (its rows would
    go to the wrong tables)."""
    if not study_dir.is_dir():
        raise UserError(f"STUDY_DIR {study_dir}: not a folder; pass the --out folder of a study "
                        "(python -m common.study)")
    path = study_dir / "study.json"
    if not path.is_file():
        hint = (f"it holds a run (config.json): its report is `python -m common.report {study_dir} --out DIR`"
                if (study_dir / "config.json").is_file() else
                "pass the --out folder of a study (python -m common.study)")
        raise UserError(f"{path}: no such file; {hint}")
    try:
        study = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot be read ({error}); pass the --out folder of a study") from None
    missing = [key for key in STUDY_KEYS if not isinstance(study, dict) or key not in study]
    if missing or not isinstance(study["cells"], list):
        raise UserError(f"{path}: not a study record (no {missing[0] if missing else 'list of cells'!r}); pass the "
                        "--out folder of a study (python -m common.study)")
    for index, cell in enumerate(study["cells"]):
        absent = [key for key in CELL_KEYS if not isinstance(cell, dict) or key not in cell]
        if absent:
            raise UserError(f"{path}: cell {index} has no {absent[0]!r}; the record was edited or damaged: run the "
                            "study again (it resumes its finished cells)")
        local = study_dir / "cells" / str(cell["name"])
        if not Path(cell["folder"]).is_dir() and local.is_dir():
            cell["folder"] = str(local)
        if cell["status"] in ("done", "resumed"):
            _check_cell(cell, path)
    return study


def _check_cell(cell: dict, path: Path) -> None:
    try:
        info = json.loads((Path(cell["folder"]) / "config.json").read_text())
    except (OSError, ValueError):
        return                          # the report lists it among the cells it could not read
    if isinstance(info, dict) and (info.get("dataset"), info.get("model")) != (cell["dataset"], cell["model"]):
        raise UserError(f"cell {cell['name']} of {path}: its folder {cell['folder']} holds a run of "
                        f"{info.get('dataset')} with {info.get('model')}, not {cell['dataset']} with {cell['model']}; "
                        "restore the cell's own folder or run the study again (it re-runs that cell)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.studyreport",
                                     description="Write a study's report again from STUDY_DIR/study.json.")
    parser.add_argument("study_dir", help="the --out folder of python -m common.study")
    args = parser.parse_args(argv)
    study_dir = Path(args.study_dir)

    def body() -> int:
        study = read_study(study_dir)
        # a study still running holds this lock: its report comes when it finishes
        with FolderLock(study_dir, "STUDY_DIR", busy="wait for it: the study writes its report when it finishes"):
            print(f"report: {write_report(study, study_dir / 'report')}")
        return 0

    return run_entry(body, interrupted="run the same command again to write the report")
