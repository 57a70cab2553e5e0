"""One table over many runs: ``python -m common.report RUN_DIR... --out DIR``.

Reads each run's ``config.json``, ``metrics.csv`` (docs/run.md columns,
:func:`common.evaluation.compare.evaluate_modes`) and, when present, ``outliers.csv``, and writes

* ``DIR/report.csv``: one row per (run, mode) with dataset, backbone, mode, the run's primary
  metric, every metric of the mode's seed ensemble with its 95% interval and seed spread (``m``,
  ``m_lo``, ``m_hi``, ``m_seed_sd``), ``auc_classes``; the paired comparison with the baseline as
  the run recorded it (``changed_predictions``, ``refits``; per metric ``m_diff``, ``m_diff_lo``,
  ``m_diff_hi``, ``p_m``, the discordant counts of top-1 and manufacturer top-1 and the combined
  refit interval ``m_diff_lo_refit``, ``m_diff_hi_refit``); on the ttr rows ``p_primary`` (the
  primary metric's test), ``p_primary_holm`` and ``verdict``; the outlier statistics;
* ``DIR/report.md``: the metrics per run and mode; the answer per run on its primary metric with
  the Holm-adjusted p and the verdict; every metric's difference (exploratory); the outlier
  statistics;
* ``DIR/report.png``: the ttr - no-ttr differences with their 95% intervals, one panel per
  metric, one line per run (filled marker: the run's primary metric with Holm-adjusted p < 0.05).

Multiplicity: the Holm (1979) step-down adjustment (family-wise error rate) runs over the
**primary tests of the runs given**, one per run (``p_<primary>`` of its ttr row): with the
family's m p-values sorted ascending, ``p_holm_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.
The other metrics are exploratory and unadjusted.  A run written by an older statistics schema
is recomputed from its predictions files (:mod:`common.reporting.recompute`), so one report
never mixes methods.

Rows other than ``no-ttr`` and ``ttr`` (``no-ttr (course probe)``, ``ttr (course probe)``,
``no-ttr-removed``, ...) are **listed**, after the run's no-ttr and ttr rows, in report.csv and
the metrics table, with whatever comparison their run recorded; they are outside the Holm
family and the difference tables, which hold the one ttr-vs-no-ttr question per run.

Exit codes: 0 done; 2 (one line naming the folder) a RUN_DIR that is not a finished run, one given
twice (also as a copy), a study folder, an ``--out`` that is a file or lies in a run folder (the
report never writes into a run it reads), a fault of the disk; 130 / 143 interrupted / terminated.
Runs of different datasets and backbones may be reported together: each run is its own
ttr-vs-no-ttr comparison (one member of each Holm family).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import textwrap
from pathlib import Path

import pandas as pd

from common.errors import UserError, run_entry
from common.evaluation.compare import SCHEMA_VERSION, decide
from common.evaluation.metrics import PROPORTIONS
from common.evaluation.stats import ALPHA, holm
from common.io import write_csv, write_text
from common.registers.modes import BASELINE, MODES, TTR
from common.reporting.figures import forest_plot, save_png
from common.reporting.recompute import primary_of, recompute, schema_of
from common.reporting.format import (
    estimate,
    in_report_order,
    interval,
    markdown_table,
    metric_label,
    number,
    p_value,
    percent,
)

log = logging.getLogger(__name__)

OUTLIER_STATS = ("patch_share_above_threshold", "mean_max_patch_norm", "register_norm",
                 "cls_attention_entropy", "cls_attention_on_register")


# --------------------------------------------------------------------------------------------
# reading runs


def _backbone_label(info: dict) -> str:
    """The backbone of a run as config.json records it: family, architecture and weights name."""
    model = info.get("model") or "?"
    if info.get("demo"):
        return f"{model} (planted demo)"
    identity = info.get("model_identity") or {}
    if identity.get("architecture"):
        return " ".join(str(part) for part in (model, identity["architecture"], identity.get("weights")) if part)
    return str(info.get("backbone") or model)


def read_run(folder: str | Path) -> dict:
    """``{"folder", "info" (config.json), "metrics" (DataFrame by mode), "outliers" (DataFrame | None)}``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; pass run folders written by test_<dataset>.py")
    if (folder / "study.json").is_file() and not (folder / "config.json").is_file():
        raise UserError(f"{folder} is a study folder: its report is `python -m common.studyreport {folder}`; or pass "
                        "its cells' run folders (cells/*)")
    for name in ("config.json", "metrics.csv"):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: no {name} (not a finished run); pass run folders written by "
                            "test_<dataset>.py")
    try:
        info = json.loads((folder / "config.json").read_text())
        metrics = pd.read_csv(folder / "metrics.csv")
    except (OSError, ValueError) as error:
        raise UserError(f"{folder}: config.json or metrics.csv cannot be read ({error})") from None
    if not isinstance(info, dict):
        raise UserError(f"{folder / 'config.json'}: not a run's config.json; pass run folders written by "
                        "test_<dataset>.py")
    status = info.get("status", "done")      # runs written before config.json had a status finished
    if status != "done":
        raise UserError(f"{folder}: not a finished run (config.json says status {status!r}, so its metrics.csv may "
                        "be of an earlier run); run it to the end (the same command resumes it) or leave it out")
    if "mode" not in metrics.columns or not set(MODES) <= set(metrics["mode"]):
        raise UserError(f"{folder / 'metrics.csv'}: needs rows for modes {', '.join(MODES)}")
    if metrics["mode"].duplicated().any():
        raise UserError(f"{folder / 'metrics.csv'}: mode {metrics['mode'][metrics['mode'].duplicated()].iloc[0]!r} "
                        "appears twice; one row per mode")
    metrics = metrics.set_index("mode")
    recomputed = schema_of(metrics) < SCHEMA_VERSION
    if recomputed:   # one method per report: an older run's statistics again, from its predictions
        metrics = recompute(folder, info, metrics)
    outliers = None
    if (folder / "outliers.csv").is_file():
        try:
            outliers = pd.read_csv(folder / "outliers.csv")
        except (OSError, ValueError) as error:
            raise UserError(f"{folder / 'outliers.csv'}: cannot be read ({error})") from None
    return {"folder": folder, "info": info, "metrics": metrics, "recomputed": recomputed,
            "outliers": outliers.set_index("mode") if outliers is not None and "mode" in outliers else None}


def _run_labels(folders: list[Path]) -> list[str]:
    """The folder names, with parents added where two names clash."""
    labels = [f.name for f in folders]
    for depth in range(2, 6):
        if len(set(labels)) == len(labels):
            break
        labels = ["/".join(f.resolve().parts[-depth:]) for f in folders]
    return labels


def _metric_names(runs: list[dict]) -> list[str]:
    """Metrics any run reports (a column ``m`` with ``m_lo`` and ``m_hi``), in report order."""
    present = set()
    for run in runs:
        columns = run["metrics"].columns
        present |= {c for c in columns
                    if f"{c}_lo" in columns and f"{c}_hi" in columns and not c.endswith("_diff")}
    return in_report_order(present)


def _modes_in_order(metrics: pd.DataFrame) -> list[str]:
    return [*MODES, *(mode for mode in metrics.index if mode not in MODES)]


def _value(metrics: pd.DataFrame, mode: str, column: str) -> float:
    value = metrics.loc[mode].get(column, math.nan)
    return math.nan if value is None or pd.isna(value) else float(value)


def paired_columns(metric: str) -> list[str]:
    """The comparison columns of one metric the report keeps (docs/statistics.md)."""
    counts = [f"{metric}_discordant_ttr_better", f"{metric}_discordant_ttr_worse"] if metric in PROPORTIONS else []
    return [f"{metric}_diff", f"{metric}_diff_lo", f"{metric}_diff_hi", f"p_{metric}", *counts,
            f"{metric}_diff_lo_refit", f"{metric}_diff_hi_refit"]


def build_table(runs: list[dict]) -> pd.DataFrame:
    """The report table: one row per (run, mode); on the ttr rows the primary metric's p-value
    Holm-adjusted over the runs (the family: one primary test per run) and the verdict."""
    labels = _run_labels([r["folder"] for r in runs])
    names = _metric_names(runs)
    per_mode = [f"{m}{s}" for m in names for s in ("", "_lo", "_hi", "_seed_sd")] + ["auc_classes"]
    paired = ["changed_predictions", "refits"] + [c for m in names for c in paired_columns(m)]
    rows = []
    for label, run in zip(labels, runs):
        info, metrics, outliers = run["info"], run["metrics"], run["outliers"]
        primary = primary_of(info)
        for mode in _modes_in_order(metrics):
            row: dict = {"run": label, "dataset": info.get("dataset", "?"), "backbone": _backbone_label(info),
                         "demo": bool(info.get("demo", False)), "mode": mode, "primary_metric": primary,
                         "recomputed": bool(run.get("recomputed", False))}
            row.update({column: _value(metrics, mode, column) for column in per_mode + paired})
            row["p_primary"] = _value(metrics, mode, f"p_{primary}") if mode == TTR else math.nan
            for key in OUTLIER_STATS:
                row[key] = (_value(outliers, mode, key)
                            if outliers is not None and mode in outliers.index else math.nan)
            rows.append(row)
    table = pd.DataFrame(rows)
    ttr = table["mode"] == TTR
    table["p_primary_holm"] = math.nan
    table.loc[ttr, "p_primary_holm"] = holm(table.loc[ttr, "p_primary"].to_numpy())
    table["verdict"] = [decide(row, row["primary_metric"], p=row["p_primary_holm"]) if row["mode"] == TTR else ""
                        for _, row in table.iterrows()]
    ordered = (["run", "dataset", "backbone", "demo", "mode", "primary_metric", "recomputed"] + per_mode + paired
               + ["p_primary", "p_primary_holm", "verdict"] + list(OUTLIER_STATS))
    return table[ordered]


# --------------------------------------------------------------------------------------------
# writing


def _names(table: pd.DataFrame) -> list[str]:
    return [c[: -len("_seed_sd")] for c in table.columns if c.endswith("_seed_sd")]


def markdown(table: pd.DataFrame) -> str:
    names = _names(table)
    runs = table["run"].nunique()
    lines = ["# Test-time registers: no-ttr vs ttr over runs", ""]
    if table["demo"].any():
        demo_runs = sorted(set(table.loc[table["demo"], "run"]))
        lines += [f"> **{len(demo_runs)} of {runs} run(s) are demos on synthetic data with a planted model** "
                  f"({', '.join(demo_runs)}); their numbers say nothing about real images.", ""]

    lines += ["## Metrics per run and mode", "",
              "Each mode's prediction is its probe seeds' ensemble (mean probability); value [95% percentile "
              "bootstrap interval over test images], then the standard deviation of the per-seed values.", ""]
    lines += markdown_table(
        ["run", "dataset", "backbone", "mode", *map(metric_label, names)],
        [[row["run"], row["dataset"], row["backbone"], row["mode"],
          *(estimate(row[m], row[f"{m}_lo"], row[f"{m}_hi"], sd=row[f"{m}_seed_sd"]) for m in names)]
         for _, row in table.iterrows()])
    others = sorted(set(table["mode"]) - set(MODES))
    if others:
        lines += ["", f"Rows other than {BASELINE} and {TTR} are listed above and in report.csv (with the "
                  "comparison their run recorded) but are not part of the tables below or of the Holm families: "
                  + ", ".join(f"`{mode}`" for mode in others) + "."]

    ttr = table[table["mode"] == TTR]
    family = int(ttr["p_primary"].notna().sum())
    lines += ["", f"## The answer per run: {TTR} minus {BASELINE} on each run's primary metric", "",
              "The difference of the seed ensembles on the same test images with its 95% interval (Tango's score "
              "interval for top-1 and manufacturer top-1, the paired percentile bootstrap otherwise; conditional on "
              "the fitted probes), the test (exact McNemar for top-1 and manufacturer top-1, a paired permutation "
              "test otherwise), its Holm-adjusted p over the runs and, with probe refits, the combined interval "
              "(test set + probe retraining). The verdict needs the Holm-adjusted p below "
              f"{ALPHA:g} and, with refits, a combined interval that excludes 0.", ""]
    lines += markdown_table(
        ["run", "dataset", "backbone", "primary metric", "difference [95% CI]", "p", "p Holm",
         "combined 95% CI (refits)", "verdict"],
        [[row["run"], row["dataset"], row["backbone"], metric_label(row["primary_metric"]),
          _difference(row, row["primary_metric"]), p_value(row["p_primary"]), p_value(row["p_primary_holm"]),
          interval(row.get(f"{row['primary_metric']}_diff_lo_refit"),
                   row.get(f"{row['primary_metric']}_diff_hi_refit"), sign=True)
          if row.get("refits", 0) > 0 else "no refits", row["verdict"]] for _, row in ttr.iterrows()])
    lines += ["", f"**Multiplicity.** Holm's step-down adjustment (family-wise error rate) over the {family} "
              "primary tests (one per run); every other metric below is exploratory and unadjusted."]
    recomputed = sorted(set(table.loc[table["recomputed"], "run"]))
    if recomputed:
        lines += ["", f"Written by an older version and recomputed here from their predictions files (one method in "
                  f"this report; no probe refits, seed spread as recorded): {', '.join(recomputed)}."]
    lines += ["", f"## Every metric, {TTR} minus {BASELINE} (exploratory, unadjusted)", ""]
    lines += markdown_table(
        ["run", "metric", "difference [95% CI]", "p", "test"],
        [[row["run"], metric_label(m), _difference(row, m), p_value(row[f"p_{m}"]),
          "exact McNemar" if m in PROPORTIONS else "permutation"]
         for _, row in ttr.iterrows() for m in names if pd.notna(row[f"{m}_diff"])])

    if table[list(OUTLIER_STATS)].notna().any().any():
        lines += ["", "## Outlier tokens (outliers.csv)", ""]
        lines += markdown_table(
            ["run", "mode", "patches above threshold", "mean max patch norm", "register norm",
             "CLS attention entropy", "CLS attention on register"],
            [[row["run"], row["mode"], percent(row["patch_share_above_threshold"]),
              number(row["mean_max_patch_norm"], 1), number(row["register_norm"], 1),
              number(row["cls_attention_entropy"]), number(row["cls_attention_on_register"])]
             for _, row in table[table[list(OUTLIER_STATS)].notna().any(axis=1)].iterrows()])
    lines += ["", f"![{TTR} minus {BASELINE} per run and metric, 95% paired-bootstrap intervals](report.png)", ""]
    return "\n".join(lines)


def _difference(row, metric: str) -> str:
    """``+0.031 [+0.008, +0.054]``, with the discordant counts of a proportion."""
    text = estimate(row[f"{metric}_diff"], row[f"{metric}_diff_lo"], row[f"{metric}_diff_hi"], sign=True)
    if metric in PROPORTIONS and pd.notna(row.get(f"{metric}_discordant_ttr_better")):
        text += (f" ({TTR} right where {BASELINE} wrong: {int(row[f'{metric}_discordant_ttr_better'])}, the reverse: "
                 f"{int(row[f'{metric}_discordant_ttr_worse'])})")
    return text


def _run_axis_labels(ttr: pd.DataFrame) -> list[str]:
    """Dataset and backbone per run (the run folder too where two runs share both)."""
    pairs = list(zip(ttr["dataset"], ttr["backbone"]))
    return ["\n".join([f"{dataset} · {backbone}" if len(backbone) <= 24 else dataset,
                       *([] if len(backbone) <= 24 else textwrap.wrap(backbone, 24)),
                       *([run] if pairs.count((dataset, backbone)) > 1 else [])])
            for run, dataset, backbone in zip(ttr["run"], ttr["dataset"], ttr["backbone"])]


def figure(table: pd.DataFrame):
    """Forest plot: per metric one panel, per run the ttr - no-ttr difference with its 95% interval."""
    ttr = table[table["mode"] == TTR].reset_index(drop=True)
    names = [m for m in _names(table) if ttr[f"{m}_diff"].notna().any()] or ["top1"]
    labels = _run_axis_labels(ttr)
    differences = pd.DataFrame([{"entry": label, "group": "probe", "metric": m, "diff": row[f"{m}_diff"],
                                 "diff_lo": row[f"{m}_diff_lo"], "diff_hi": row[f"{m}_diff_hi"],
                                 "p_holm": row["p_primary_holm"] if m == row["primary_metric"] else math.nan}
                                for label, (_, row) in zip(labels, ttr.iterrows()) for m in names])
    return forest_plot(differences, names,
                       f"{TTR} minus {BASELINE} per run: difference of the seed ensembles with its 95% interval "
                       f"(conditional on the fitted probes)\n(filled: the run's primary metric with Holm-adjusted "
                       f"p < {ALPHA:g} over the {len(ttr)} run(s); other metrics exploratory)")


def check_inputs(run_dirs: list[str | Path], out: str | Path) -> None:
    """What the report may not be given (one line naming it): a run folder twice (also as two
    paths or two copies of one run: its comparison would count twice in the Holm families), and an
    ``out`` that is a file or lies inside (or is) a run folder - the report never writes into a run
    it reads."""
    if not run_dirs:
        raise UserError("give at least one RUN_DIR")
    seen: dict[str, Path] = {}
    for folder in map(Path, run_dirs):
        real = os.path.realpath(folder)
        if real in seen:
            raise UserError(f"RUN_DIR {folder} is given twice (also as {seen[real]}); give each run once")
        seen[real] = folder
    contents: dict[tuple[bytes, bytes], Path] = {}
    for folder in seen.values():
        try:
            content = ((folder / "config.json").read_bytes(), (folder / "metrics.csv").read_bytes())
        except OSError:
            continue                    # read_run names what is missing
        if content in contents:
            raise UserError(f"RUN_DIR {folder} holds the same run as {contents[content]} (identical config.json and "
                            "metrics.csv: a copy?); give each run once")
        contents[content] = folder
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for report.csv, report.md and report.png")
    target = os.path.realpath(out)
    for real, folder in seen.items():
        if target == real or target.startswith(real.rstrip(os.sep) + os.sep):
            raise UserError(f"--out {out} is {'the run folder' if target == real else 'inside the run folder'} "
                            f"{folder}; the report never writes into a run it reads: pass another --out")


def write_report(run_dirs: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Read the runs, write ``report.csv``, ``report.md`` and ``report.png`` under ``out``."""
    check_inputs(run_dirs, out)
    runs = [read_run(folder) for folder in run_dirs]
    table = build_table(runs)
    out = Path(out)
    write_csv(out / "report.csv", table)
    write_text(out / "report.md", markdown(table))
    save_png(figure(table), out / "report.png")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.report",
        description="Aggregate finished runs into one table (report.csv, report.md) and one figure (report.png).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run output folders (with metrics.csv)")
    parser.add_argument("--out", required=True, help="folder for report.csv, report.md and report.png")
    args = parser.parse_args(argv)

    def body() -> int:
        write_report(args.run_dirs, args.out)
        print(f"report: {Path(args.out) / 'report.md'}")  # the command's result, on stdout like the CLI's
        return 0

    return run_entry(body, interrupted="nothing was written; run the same command again")
