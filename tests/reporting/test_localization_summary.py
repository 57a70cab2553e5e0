"""The attention-localization part of summary.md (common/reporting/localization_summary.py): the
opening sentence and the section's table carry the summary table's numbers in the project's formatting."""

from __future__ import annotations

import pandas as pd

from common.evaluation.localization import SUMMARY_COLUMNS, LocalizationResult
from common.reporting.localization_summary import localization_effect, localization_section


def _result(left_out=()) -> LocalizationResult:
    rows = []
    for metric, base, ttr in (("energy_in_mask", 0.1, 0.6), ("pointing_hit", 0.0, 0.75), ("iou", 0.05, 0.5),
                              ("iou_accumulated", 0.06, 0.52)):
        rows.append({"metric": metric, "mode": "no-ttr", "images": 12, "mean": base, "mean_lo": base - 0.01,
                     "mean_hi": base + 0.01})
        rows.append({"metric": metric, "mode": "ttr", "images": 12, "mean": ttr, "mean_lo": ttr - 0.02,
                     "mean_hi": ttr + 0.02, "diff": ttr - base, "diff_lo": ttr - base - 0.05,
                     "diff_hi": ttr - base + 0.05, "diff_se": 0.02, "diff_p": 0.0004 if metric != "iou" else 0.0312})
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    table = pd.DataFrame({"mode": ["no-ttr", "ttr"], "mask_share": [0.25, 0.25]})
    return LocalizationResult(table, summary, list(left_out), figures=[("localization.png", "the maps")])


def test_opening_sentence():
    text = localization_effect(_result())
    assert "on 12 test images" in text
    assert "from 0.100 (no-ttr) to 0.600 (ttr)" in text
    assert "+0.500, 95% CI [+0.450, +0.550] (paired bootstrap), p < 0.001 (paired permutation)" in text


def test_section_table_rows_and_notes():
    lines = localization_section(_result(left_out=["a.png"]), n_boot=300, n_perm=400)
    text = "\n".join(lines)
    assert lines[0] == "## Attention localization"
    assert "Over 12 test image(s) with an object mask (1 left out" in text
    assert "| energy in mask | ttr | 0.600 [0.580, 0.620] | +0.500 [+0.450, +0.550] | < 0.001 |" in lines
    assert "| IoU (mean over images) | ttr | 0.500 [0.480, 0.520] | +0.450 [+0.400, +0.500] | 0.031 |" in lines
    assert "| pointing hit | no-ttr | 0.000 [-0.010, 0.010] |  |  |" in lines
    assert "0.250 on average here" in text and "300 resamples" in text and "400 permutations" in text
    assert "![the maps](figures/localization.png)" in lines


def test_nothing_measured_says_nothing():
    empty = LocalizationResult(pd.DataFrame(), pd.DataFrame(columns=list(SUMMARY_COLUMNS)), notes=["no class token"])
    assert localization_effect(empty) == ""
    assert localization_section(empty, n_boot=10, n_perm=10)[-1] == "Note: no class token."
