"""The study's report.md (common/reporting/study_markdown.py) against the CSVs it sits beside: the
answer's counts, the table of the main cells' primary metric with Holm, the exploratory table
(bold: the Holm family), missing values, the outlier shares, failed and skipped cells, and the
demo warning."""

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
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def test_headline_counts_match_the_paper_table(fake_study):
    text = fake_study["report"].read_text()
    paper = pd.read_csv(fake_study["out"] / "paper_table.csv")
    family = paper[paper["family"] == "primary, main cells"]
    counts = family["verdict"].value_counts()
    assert (f"**The answer** (primary metric of each of the 3 main cells, Holm over the 3 of them): ttr is better in "
            f"{counts.get('better', 0)}, worse in {counts.get('worse', 0)}, not robust to probe retraining in 0 and "
            f"not detectably different in {counts.get('no detectable', 0)}. Everything else in this report is "
            "exploratory.") in text
    assert "- aptos_clip: exit 2: error: no weights" in text


def test_the_answer_table_and_the_exploratory_table(fake_study):
    text = fake_study["report"].read_text()
    paper = pd.read_csv(fake_study["out"] / "paper_table.csv")
    family = paper[paper["family"] == "primary, main cells"]
    rows = _table_rows(text, "## 1. The answer")
    assert [row[0] for row in rows] == list(family["cell"])
    for row, (_, r) in zip(rows, family.iterrows()):
        assert row[1] == metric_label(r["metric"])
        assert row[2].startswith(f"{r['diff']:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]")
        if r["metric"] == "top1":
            assert row[2].endswith(f"(ttr right where no-ttr wrong: {int(r['discordant_ttr_better'])}, the reverse: "
                                   f"{int(r['discordant_ttr_worse'])})")
        assert row[3:] == [_p(r["p"]), r["test"], _p(r["p_holm"]), "no refits", r["verdict"]]
    assert "the p-value Holm-adjusted over the family of these 3 tests" in text

    indexed = paper.set_index(["cell", "comparison", "metric"])
    header = text.split("## 2. Every cell and metric", 1)[1].split("\n| cell | ", 1)[1].split(" |\n", 1)[0].split(" | ")
    table = _table_rows(text, "## 2. Every cell and metric")
    entries = list(dict.fromkeys((c, k) for c, k, _ in indexed.index))
    assert [row[0] for row in table] == [c + ("  (zero-shot)" if k == "zero-shot" else "")
                                         + ("" if c != "aptos_dinov2_3" else " (sensitivity)") for c, k in entries]
    bold = 0
    for (cell, kind), shown_row in zip(entries, table):
        for label, shown in zip(header, shown_row[1:]):
            metric = next(m for m in ("top1", "top3", "f1_macro", "precision_macro", "recall_macro", "auc_macro",
                                      "balanced_accuracy", "qwk", "manufacturer_top1") if metric_label(m) == label)
            if (cell, kind, metric) not in indexed.index:
                assert shown == "n/a"
                continue
            r = indexed.loc[(cell, kind, metric)]
            expected = f"{r['diff']:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}] p {_p(r['p'])}"
            confirmatory = r["family"] == "primary, main cells"
            bold += confirmatory
            assert shown == (f"**{expected}**" if confirmatory else expected), (cell, kind, metric)
    assert bold == 3


def test_outliers_cells_and_skipped_sections(fake_study):
    text = fake_study["report"].read_text()
    rows = {row[0]: row for row in _table_rows(text, "## 7. Outlier tokens per cell")}
    outliers = pd.read_csv(fake_study["out"] / "outliers.csv").set_index("cell")
    for cell, row in rows.items():
        share = outliers.loc[cell, "patch_share_above_threshold_no_ttr"]
        shown = "< 0.1%" if 0 < share < 0.0005 else f"{100 * share:.1f}%"
        assert row[2] == f"{shown} → 0.0%"
    assert rows["pacemaker_dinov2_2"][2] == "< 0.1% → 0.0%"   # a share of 0.04% is not written as 0
    cells = {row[0]: row for row in _table_rows(text, "## 8. Cells")}
    assert cells["aptos_clip"][1:5] == ["failed", "2", "0", "error: no weights"]
    assert "| aptos | clip | neurons=paper | no published neurons |" in text


def test_a_demo_study_says_so_first(fake_study):
    record = json.loads((fake_study["base"] / "study.json").read_text()) | {"demo": True}
    runs, notes = read_cells(record)
    tables = {name: pd.read_csv(fake_study["out"] / f"{name}.csv")
              for name in ("paper_table", "per_class", "calibration", "outliers", "neuron_overlap")}
    text = markdown(record, runs, notes, tables, detected_rankings(runs), [])
    head = "\n".join(text.splitlines()[:4])
    assert "Demo study on synthetic data with planted models" in head and "planted (layer, neuron): [(2, 7)]" in head
    assert "Demo study" not in fake_study["report"].read_text()
