"""The study's report.md (common/reporting/study_markdown.py) against the CSVs it sits beside: the
headline counts, bold where Holm says so, each p-value and its Holm value, missing values, the
outlier shares, failed and skipped cells, and the demo warning."""

from __future__ import annotations

import json

import pandas as pd

from common.reporting.format import metric_label
from common.reporting.study_markdown import markdown
from common.reporting.study_read import detected_rankings, read_cells


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after ``heading``, split into cells."""
    part = text.split(heading, 1)[1].split("\n\n|", 1)[1]
    lines = ("|" + part).split("\n\n", 1)[0].splitlines()
    return [line.strip("|").strip().split(" | ") for line in lines[2:]]


def _p(value: float) -> str:
    """The p-value rule, written out independently of the report code."""
    if pd.isna(value):
        return "n/a"
    return "< 2/B" if value == 0 else "< 0.001" if value < 0.001 else f"{value:.3f}"


def test_headline_counts_match_the_paper_table(fake_study):
    text = fake_study["report"].read_text()
    paper = pd.read_csv(fake_study["out"] / "paper_table.csv")
    for metric in ("top1", "f1_macro"):
        part = paper[(paper["comparison"] == "probe") & (paper["metric"] == metric)]
        up = int(((part["p_holm"] < 0.05) & (part["diff"] > 0)).sum())
        down = int(((part["p_holm"] < 0.05) & (part["diff"] < 0)).sum())
        label = metric_label(metric, capital=True)
        assert (f"- {label}: ttr is better in {up}, worse in {down}, and not detectably different in "
                f"{len(part) - up - down} of {len(part)} cells") in text
    assert "- aptos_clip: exit 2: error: no weights" in text


def test_paper_tables_bold_and_p_values(fake_study):
    text = fake_study["report"].read_text()
    paper = pd.read_csv(fake_study["out"] / "paper_table.csv").set_index(["cell", "comparison", "metric"])
    header = text.split("## 1. The paper table", 1)[1].split("\n| cell | ", 1)[1].split(" |\n", 1)[0].split(" | ")
    differences = _table_rows(text, "## 1. The paper table")
    p_values = _table_rows(text, "Paired-bootstrap p-value and, in brackets")
    entries = list(dict.fromkeys((c, k) for c, k, _ in paper.index))
    assert [row[0] for row in differences] == [c + ("  (zero-shot)" if k == "zero-shot" else "") for c, k in entries]
    bold = 0
    for (cell, kind), diff_row, p_row in zip(entries, differences, p_values):
        for label, shown, p_shown in zip(header, diff_row[1:], p_row[1:]):
            metric = next(m for m in ("top1", "top3", "f1_macro", "precision_macro", "recall_macro", "auc_macro",
                                      "balanced_accuracy", "qwk", "manufacturer_top1") if metric_label(m) == label)
            if (cell, kind, metric) not in paper.index:
                assert shown == p_shown == "n/a"
                continue
            r = paper.loc[(cell, kind, metric)]
            expected = f"{r['diff']:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]"
            significant = r["p_holm"] < 0.05
            bold += significant
            assert shown == (f"**{expected}**" if significant else expected), (cell, kind, metric)
            assert p_shown == f"{_p(r['p'])} ({_p(r['p_holm'])})", (cell, kind, metric)
    assert bold > 0 and "< 2/B (< 2/B)" in text     # both cases occur in this study
    assert "the family is the 4 probe comparisons" in text and "3 CLIP zero-shot comparisons" in text
    assert "A bootstrap p written < 2/B means that no resample of the difference reached 0" in text
    mcnemar = pd.read_csv(fake_study["out"] / "mcnemar.csv")
    rows = _table_rows(text, "Exact McNemar test on top-1 correctness")
    assert [row[3:] for row in rows] == [[_p(p), _p(h)] for p, h in zip(mcnemar["p"], mcnemar["p_holm"])]


def test_outliers_cells_and_skipped_sections(fake_study):
    text = fake_study["report"].read_text()
    rows = {row[0]: row for row in _table_rows(text, "## 6. Outlier tokens per cell")}
    outliers = pd.read_csv(fake_study["out"] / "outliers.csv").set_index("cell")
    for cell, row in rows.items():
        share = outliers.loc[cell, "patch_share_above_threshold_no_ttr"]
        shown = "< 0.1%" if 0 < share < 0.0005 else f"{100 * share:.1f}%"
        assert row[2] == f"{shown} → 0.0%"
    assert rows["pacemaker_dinov2_2"][2] == "< 0.1% → 0.0%"   # a share of 0.04% is not written as 0
    cells = {row[0]: row for row in _table_rows(text, "## 7. Cells")}
    assert cells["aptos_clip"][1:5] == ["failed", "2", "0", "error: no weights"]
    assert "| aptos | clip | neurons=paper | no published neurons |" in text


def test_a_demo_study_says_so_first(fake_study):
    record = json.loads((fake_study["base"] / "study.json").read_text()) | {"demo": True}
    runs, notes = read_cells(record)
    tables = {name: pd.read_csv(fake_study["out"] / f"{name}.csv")
              for name in ("paper_table", "mcnemar", "per_class", "calibration", "outliers", "neuron_overlap")}
    text = markdown(record, runs, notes, tables, detected_rankings(runs), [])
    head = "\n".join(text.splitlines()[:4])
    assert "Demo study on synthetic data with planted models" in head and "planted (layer, neuron): [(2, 7)]" in head
    assert "Demo study" not in fake_study["report"].read_text()
