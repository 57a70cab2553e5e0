"""controls.csv and the summary's controls section (common.reporting.controls): the table from a
real ``evaluate_modes`` table, ttr placed among the random draws by percentile and rank p-value,
checked against counts done by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from common.evaluation.compare import evaluate_modes
from common.evaluation.metrics import MetricSpec
from common.registers.controls import neurons_hash
from common.reporting.controls import (
    CONTROL_COLUMNS,
    controls_section,
    controls_table,
    percentile_among,
    rank_p,
)


def test_percentile_and_rank_p_by_hand():
    draws = [0.1, 0.2, 0.3, 0.4]
    assert percentile_among(0.0, draws) == 0.0 and percentile_among(0.5, draws) == 100.0
    assert percentile_among(0.25, draws) == 50.0
    assert percentile_among(0.2, draws) == pytest.approx(100 * (1 + 0.5) / 4)      # one below, one tie
    # two-sided: 2 min(1 + #{<=}, 1 + #{>=}) / (n + 1)
    assert rank_p(0.0, draws) == pytest.approx(2 * 1 / 5)
    assert rank_p(0.5, draws) == pytest.approx(2 * 1 / 5)
    assert rank_p(0.25, draws) == 1.0
    assert rank_p(-1.0, [0.0] * 10) == pytest.approx(2 / 11)                 # the floor with 10 draws
    assert math.isnan(percentile_among(math.nan, draws)) and math.isnan(rank_p(0.1, []))


@pytest.fixture()
def scored():
    """Six modes scored on 40 test images: ttr and two controls differ, three random draws barely."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 40)

    def proba(skill):
        logits = rng.normal(size=(2, 40, 3))
        logits[:, np.arange(40), labels] += skill
        e = np.exp(logits)
        return e / e.sum(axis=-1, keepdims=True)

    base = proba(1.0)
    modes = {"no-ttr": base, "ttr": proba(2.5), "ttr-mean": proba(2.0), "no-ttr-removed": proba(0.5)}
    for k in (1, 2, 3):
        modes[f"ttr-random-0{k}"] = base + 1e-3 * k * rng.random(base.shape)
    metrics = evaluate_modes(labels, modes, MetricSpec(3), n_boot=50, n_perm=50, seed=0, primary="top1")
    shares = {"no-ttr": 0.2, "ttr": 0.0, "ttr-mean": 0.01, "no-ttr-removed": 0.0,
              "ttr-random-01": 0.19, "ttr-random-02": 0.2, "ttr-random-03": 0.21}
    outliers = pd.DataFrame({"mode": list(shares), "patch_share_above_threshold": list(shares.values())})
    draws = {f"ttr-random-0{k}": {2: [k, k + 10], 3: [40 + k]} for k in (1, 2, 3)}
    return metrics, outliers, draws


def test_controls_csv_columns_and_rows(scored):
    metrics, outliers, draws = scored
    table = controls_table(metrics, outliers, "top1", draws)
    assert list(table.columns) == list(CONTROL_COLUMNS)
    assert list(table["mode"]) == ["ttr", "ttr-mean", "no-ttr-removed", "ttr-random-01", "ttr-random-02",
                                   "ttr-random-03"]
    rows = table.set_index("mode")
    assert rows.loc["ttr-random-02", "control"] == "ttr-random" and rows.loc["ttr-random-02", "draw"] == 2
    assert rows.loc["ttr-mean", "control"] == "ttr-mean" and pd.isna(rows.loc["ttr-mean", "draw"])
    assert rows.loc["ttr-random-03", "neurons_hash"] == neurons_hash({2: [3, 13], 3: [43]})
    assert json.loads(rows.loc["ttr-random-03", "neurons"]) == {"2": [3, 13], "3": [43]}
    by_mode = metrics.set_index("mode")
    for mode in table["mode"]:                     # the rows of metrics.csv, unchanged
        assert rows.loc[mode, "primary_diff"] == by_mode.loc[mode, "top1_diff"]
        assert rows.loc[mode, "p_primary"] == by_mode.loc[mode, "p_top1"]
    assert rows.loc["ttr", "patch_share_diff"] == pytest.approx(-0.2)
    assert rows.loc["ttr-random-03", "patch_share_above_threshold"] == 0.21
    assert controls_table(metrics[metrics["mode"].isin(["no-ttr", "ttr"])], outliers, "top1", {}) is None


def test_the_section_places_ttr_among_the_draws(scored):
    metrics, outliers, draws = scored
    table = controls_table(metrics, outliers, "top1", draws)
    text = "\n".join(controls_section(table, "top1", 0.2))
    ttr_diff = metrics.set_index("mode").loc["ttr", "top1_diff"]
    draw_diffs = metrics.set_index("mode").loc[list(draws), "top1_diff"].to_numpy()
    below, ties = int(np.sum(draw_diffs < ttr_diff)), int(np.sum(draw_diffs == ttr_diff))   # counted by hand
    assert f"lies at percentile {100 * (below + ties / 2) / 3:.0f} of the draws'" in text
    # the outlier share under ttr (0%) is below all three draws: percentile 0, rank p = 2 x 1/4
    assert "lies at percentile 0 of the draws' (median 20.0%, range 19.0% to 21.0%); rank p = 0.500" in text
    assert "with 3 draws no p below 0.500 is possible" in text
    assert "`ttr-random` (3 draws)" in text and "`ttr-mean`" in text and "`no-ttr-removed`" in text
    assert "better" not in text and "worse" not in text           # exploratory: no verdict words
