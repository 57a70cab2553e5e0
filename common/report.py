"""One table over many runs: ``python -m common.report RUN_DIR... --out DIR``.

Reads each run's ``config.json``, ``metrics.csv`` and (when present) ``outliers.csv`` and writes

* ``DIR/report.csv``: one row per (run, mode) with dataset, backbone, mode, every metric with
  its 95% interval (``m``, ``m_lo``, ``m_hi``), the outlier statistics, and on the ttr row the
  ttr-minus-no-ttr difference per metric (``delta_m``), the paired tests' p-values
  (``p_mcnemar_top1``, ``p_bootstrap_f1_macro``) and their Holm-adjusted values across the
  runs (``*_holm``);
* ``DIR/report.md``: the same as Markdown tables (metrics per run and mode; differences and
  p-values per run; outlier statistics);
* ``DIR/report.png``: top-1 accuracy and macro F1 per run, no-ttr beside ttr, with the 95%
  intervals as error bars.

Multiplicity: each run's p-values test one hypothesis; over many runs some will fall below 0.05
by chance.  The Holm (1979) step-down adjustment controls the family-wise error rate over the
runs given, separately for each test (McNemar on top-1; paired bootstrap on macro F1):
with the m p-values sorted ascending, ``p_holm_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.
Runs without a p-value (NaN) are left out of the family.

Exit codes: 0 done; 2 a RUN_DIR that is not a finished run (one line naming it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError

MODES = ("no-ttr", "ttr")
METRIC_ORDER = ("top1", "top3", "f1_macro", "precision_macro", "recall_macro", "auc_macro",
                "balanced_accuracy", "qwk", "manufacturer_top1")
P_VALUES = ("p_mcnemar_top1", "p_bootstrap_f1_macro")
OUTLIER_STATS = ("patch_share_above_threshold", "mean_max_patch_norm", "register_norm",
                 "cls_attention_entropy", "cls_attention_on_register")
FIGURE_METRICS = (("top1", "top-1 accuracy"), ("f1_macro", "macro F1"))


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (NaN stays NaN and is not counted in the family)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return adjusted
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


# --------------------------------------------------------------------------------------------
# reading runs


def _backbone_label(info: dict) -> str:
    config = info.get("config") or {}
    model = info.get("model") or "?"
    if info.get("demo"):
        return f"{model} (planted demo)"
    if model == "clip":
        name = config.get("model_name", "ViT-B-16")
        pretrained = config.get("pretrained")
        return f"CLIP {name}" + (f" {pretrained}" if pretrained else "")
    if model == "dinov2":
        return f"DINOv2 {config.get('backbone_size', '')}".strip()
    return str(info.get("backbone") or model)


def read_run(folder: str | Path) -> dict:
    """``{"folder", "info" (config.json), "metrics" (DataFrame), "outliers" (DataFrame | None)}``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; pass run folders written by test_<dataset>.py")
    for name in ("config.json", "metrics.csv"):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: no {name} (not a finished run); pass run folders written by "
                            "test_<dataset>.py")
    try:
        info = json.loads((folder / "config.json").read_text())
        metrics = pd.read_csv(folder / "metrics.csv")
    except (OSError, ValueError) as error:
        raise UserError(f"{folder}: config.json or metrics.csv cannot be read ({error})") from None
    if "mode" not in metrics.columns or not set(MODES) <= set(metrics["mode"]):
        raise UserError(f"{folder / 'metrics.csv'}: needs rows for modes {', '.join(MODES)}")
    outliers = None
    if (folder / "outliers.csv").is_file():
        try:
            outliers = pd.read_csv(folder / "outliers.csv")
        except (OSError, ValueError) as error:
            raise UserError(f"{folder / 'outliers.csv'}: cannot be read ({error})") from None
    return {"folder": folder, "info": info, "metrics": metrics.set_index("mode"),
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
    present = set()
    for run in runs:
        columns = run["metrics"].columns
        present |= {c for c in columns if f"{c}_lo" in columns and f"{c}_hi" in columns}
    return [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))


def build_table(runs: list[dict]) -> pd.DataFrame:
    """The report table: one row per (run, mode)."""
    labels = _run_labels([r["folder"] for r in runs])
    names = _metric_names(runs)
    rows = []
    for label, run in zip(labels, runs):
        info, metrics, outliers = run["info"], run["metrics"], run["outliers"]
        for mode in MODES:
            row: dict = {
                "run": label,
                "dataset": info.get("dataset", "?"),
                "backbone": _backbone_label(info),
                "demo": bool(info.get("demo", False)),
                "mode": mode,
            }
            for m in names:
                for suffix in ("", "_lo", "_hi"):
                    value = metrics.loc[mode].get(f"{m}{suffix}", math.nan)
                    row[f"{m}{suffix}"] = float(value) if value is not None else math.nan
            for m in names:
                row[f"delta_{m}"] = (float(metrics.loc["ttr"].get(m, math.nan)) -
                                     float(metrics.loc["no-ttr"].get(m, math.nan))) if mode == "ttr" else math.nan
            for key in P_VALUES:
                row[key] = float(metrics.loc["ttr"].get(key, math.nan)) if mode == "ttr" else math.nan
            for key in OUTLIER_STATS:
                row[key] = (float(outliers.loc[mode].get(key, math.nan))
                            if outliers is not None and mode in outliers.index else math.nan)
            rows.append(row)
    table = pd.DataFrame(rows)
    ttr = table["mode"] == "ttr"
    for key in P_VALUES:
        table[f"{key}_holm"] = math.nan
        table.loc[ttr, f"{key}_holm"] = holm(table.loc[ttr, key].to_numpy())
    ordered = (["run", "dataset", "backbone", "demo", "mode"]
               + [f"{m}{s}" for m in names for s in ("", "_lo", "_hi")]
               + [f"delta_{m}" for m in names]
               + [c for key in P_VALUES for c in (key, f"{key}_holm")]
               + list(OUTLIER_STATS))
    return table[ordered]


# --------------------------------------------------------------------------------------------
# writing


def _f(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == 0:
        return "0 (< 1/B)"
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


def markdown(table: pd.DataFrame) -> str:
    names = [c for c in table.columns if f"{c}_lo" in table.columns and not c.endswith(("_lo", "_hi"))]
    lines = ["# Test-time registers: no-ttr vs ttr over runs", ""]
    if table["demo"].any():
        demo_runs = sorted(set(table.loc[table["demo"], "run"]))
        lines += [f"> **{len(demo_runs)} of {table['run'].nunique()} run(s) are demos on synthetic data with a "
                  f"planted model** ({', '.join(demo_runs)}); their numbers say nothing about real images.", ""]
    lines += ["## Metrics per run and mode", "",
              "Mean over probe seeds with the 95% percentile bootstrap interval over test images.", "",
              "| run | dataset | backbone | mode | " + " | ".join(names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for _, row in table.iterrows():
        cells = [f"{_f(row[m])} [{_f(row[m + '_lo'])}, {_f(row[m + '_hi'])}]" if not math.isnan(row[m]) else "–"
                 for m in names]
        lines.append(f"| {row['run']} | {row['dataset']} | {row['backbone']} | {row['mode']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## ttr minus no-ttr, and paired tests", "",
              "| run | dataset | backbone | " + " | ".join(f"Δ {m}" for m in names)
              + " | p McNemar top-1 | p Holm | p bootstrap macro F1 | p Holm |",
              "|---|---|---|" + "---|" * (len(names) + 4)]
    for _, row in table[table["mode"] == "ttr"].iterrows():
        deltas = [("–" if math.isnan(row[f"delta_{m}"]) else f"{row[f'delta_{m}']:+.3f}") for m in names]
        lines.append(f"| {row['run']} | {row['dataset']} | {row['backbone']} | " + " | ".join(deltas)
                     + f" | {_p(row['p_mcnemar_top1'])} | {_p(row['p_mcnemar_top1_holm'])}"
                     + f" | {_p(row['p_bootstrap_f1_macro'])} | {_p(row['p_bootstrap_f1_macro_holm'])} |")
    runs = table["run"].nunique()
    lines += ["",
              "p McNemar: exact McNemar test on top-1 correctness of the same test images; p bootstrap: paired "
              "bootstrap on macro F1 (shown as 0 (< 1/B) when none of the B resamples of the difference "
              "fell on the other side of zero). Each run's p-values test one hypothesis; with "
              f"{runs} run(s) compared, some small p-values arise by chance, so the Holm step-down adjustment over "
              "the runs (family-wise error rate, each test separately) is given beside each raw p-value. "
              "A run without a p-value is left out of the family."]
    if table[list(OUTLIER_STATS)].notna().any().any():
        lines += ["", "## Outlier tokens (outliers.csv)", "",
                  "| run | mode | patches above threshold | mean max patch norm | register norm | "
                  "CLS attention entropy | CLS attention on register |",
                  "|---|---|---|---|---|---|---|"]
        for _, row in table.iterrows():
            share = row["patch_share_above_threshold"]
            lines.append(f"| {row['run']} | {row['mode']} | {_f(share * 100, 2) + '%' if not math.isnan(share) else '–'}"
                         f" | {_f(row['mean_max_patch_norm'], 1)} | {_f(row['register_norm'], 1)}"
                         f" | {_f(row['cls_attention_entropy'])} | {_f(row['cls_attention_on_register'])} |")
    lines += ["", "![Top-1 and macro F1 per run, no-ttr vs ttr](report.png)", ""]
    return "\n".join(lines)


def figure(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(m, label) for m, label in FIGURE_METRICS if m in table.columns]
    runs = list(dict.fromkeys(table["run"]))
    first = table.drop_duplicates("run").set_index("run").loc[runs]
    pairs = list(zip(first["dataset"], first["backbone"]))
    labels = ["\n".join([dataset, *textwrap.wrap(backbone, 18)] + ([run] if pairs.count(pair) > 1 else []))
              for run, pair, (dataset, backbone) in zip(runs, pairs, pairs)]
    width = max(4.5, 1.9 * len(runs) + 1.0)
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 5.0), squeeze=False)
    x = np.arange(len(runs))
    colours = {"no-ttr": "tab:orange", "ttr": "tab:blue"}
    for ax, (metric, title) in zip(axes[0], metrics):
        for k, mode in enumerate(MODES):
            rows = table[table["mode"] == mode].set_index("run").loc[runs]
            value = rows[metric].to_numpy(float)
            err = np.vstack([value - rows[f"{metric}_lo"].to_numpy(float), rows[f"{metric}_hi"].to_numpy(float) - value])
            ax.bar(x + (k - 0.5) * 0.38, value, width=0.38, color=colours[mode], alpha=0.85, label=mode,
                   yerr=np.clip(err, 0, None), capsize=4, error_kw={"elinewidth": 1.2})
        key, test = (("p_mcnemar_top1_holm", "exact McNemar") if metric == "top1"
                     else ("p_bootstrap_f1_macro_holm", "paired bootstrap"))
        for i, run in enumerate(runs):
            p = table[(table["run"] == run) & (table["mode"] == "ttr")][key]
            if len(p) and not p.isna().all():
                ax.annotate(f"p = {_p(float(p.iloc[0]))}", (i, 1.015), ha="center", va="bottom", fontsize=8,
                            xycoords=("data", "axes fraction"))
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylim(0, 1.0)
        ax.set_ylabel(title)
        ax.set_title(f"{title}, 95% bootstrap intervals\n(p: {test} ttr vs no-ttr, Holm-adjusted over runs)",
                     fontsize=10, pad=18)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle("no-ttr vs ttr per run", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(temporary, dpi=110, bbox_inches="tight", facecolor="white")
        os.replace(temporary, path)
    finally:
        plt.close(fig)
        temporary.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_report(run_dirs: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Read the runs, write ``report.csv``, ``report.md`` and ``report.png`` under ``out``."""
    if not run_dirs:
        raise UserError("give at least one RUN_DIR")
    runs = [read_run(folder) for folder in run_dirs]
    table = build_table(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / ".report.csv.tmp"
    table.to_csv(temporary, index=False)
    os.replace(temporary, out / "report.csv")
    _write_text(out / "report.md", markdown(table))
    figure(table, out / "report.png")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.report",
        description="Aggregate finished runs into one table (report.csv, report.md) and one figure (report.png).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run output folders (with metrics.csv)")
    parser.add_argument("--out", required=True, help="folder for report.csv, report.md and report.png")
    args = parser.parse_args(argv)
    try:
        write_report(args.run_dirs, args.out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
