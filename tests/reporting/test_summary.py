"""``summary.md``'s answer (the primary metric's verdict), the secondary lines and the results
table (common/reporting/summary.py), from tables written by hand and from ``evaluate_modes``; the
whole summary of a run is checked end to end in ``tests/app/test_end_to_end.py``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.errors import UserError
from common.evaluation.compare import evaluate_modes
from common.evaluation.metrics import METRICS, MetricSpec
from common.reporting.summary import answer, refits_table, results_table, secondary


def make_proba(y: np.ndarray, c: int, seed: int, signal: float = 1.0) -> np.ndarray:
    """``[1, N, C]``: softmax of noisy logits that favour the true class."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y), c))
    logits[np.arange(len(y)), y] += signal
    p = np.exp(logits)
    return (p / p.sum(axis=-1, keepdims=True))[None]


TTR_ROW = dict(mode="ttr", changed_predictions=20, refits=0,
               top1_diff=0.04, top1_diff_lo=0.012, top1_diff_hi=0.067, p_top1=0.0118,
               top1_discordant_ttr_better=14, top1_discordant_ttr_worse=6, mde_top1=0.05, mde_basis="observed",
               mde_discordance=0.1,
               f1_macro_diff=-0.0412, f1_macro_diff_lo=-0.07, f1_macro_diff_hi=-0.011, p_f1_macro=0.004,
               qwk_diff=-0.004, qwk_diff_lo=-0.030, qwk_diff_hi=0.021, p_qwk=0.74, qwk_diff_se=0.013)


def table_of(**changes) -> pd.DataFrame:
    return pd.DataFrame([{"mode": "no-ttr"}, {**TTR_ROW, **changes}])


def test_the_answer_is_about_the_primary_metric_and_prints_the_discordant_counts():
    sentence = answer(table_of(), "top1")
    assert sentence == ("Top-1 accuracy (primary metric): ttr is better than no-ttr: +0.040, 95% CI [+0.012, +0.067] "
                        "(Tango score interval), exact McNemar p = 0.012; ttr right where no-ttr wrong: 14, the "
                        "reverse: 6.")
    worse = answer(table_of(top1_diff=-0.04, top1_diff_lo=-0.067, top1_diff_hi=-0.012,
                            top1_discordant_ttr_better=6, top1_discordant_ttr_worse=14), "top1")
    assert "ttr is worse than no-ttr: -0.040" in worse and "ttr right where no-ttr wrong: 6, the reverse: 14" in worse


def test_no_detectable_difference_states_the_smallest_detectable_one():
    sentence = answer(table_of(p_top1=0.2), "top1")
    assert "no detectable difference between ttr and no-ttr at the 5% level" in sentence
    assert ("The smallest difference this test detects with 80% power is ±0.050 (exact McNemar at the observed "
            "discordance rate, 0.100)") in sentence
    unchanged = answer(table_of(p_top1=1.0, top1_diff=0.0, top1_diff_lo=-0.113, top1_diff_hi=0.113,
                                top1_discordant_ttr_better=0, top1_discordant_ttr_worse=0, changed_predictions=0,
                                mde_basis="probe seeds", mde_discordance=0.05), "top1")
    assert "no test prediction changed" in unchanged and "[-0.113, +0.113]" in unchanged
    assert "discordance rate between probe seeds, 0.050" in unchanged
    kappa = answer(table_of(mde_qwk=0.036, mde_basis="bootstrap SE"), "qwk")
    assert kappa.startswith("Quadratic weighted kappa (primary metric): no detectable difference")
    assert "paired permutation test p = 0.740" in kappa and "±0.036" in kappa


def test_a_difference_that_does_not_survive_probe_retraining_is_not_robust():
    refits = dict(refits=20, top1_refit_mean=0.01, top1_refit_sd=0.03, top1_refit_share_better=0.6,
                  top1_diff_lo_refit=-0.02, top1_diff_hi_refit=0.10)
    sentence = answer(table_of(**refits), "top1")
    assert "not robust to probe retraining" in sentence and "is better" not in sentence
    assert ("Over 20 probe refits on bootstrap resamples of the training set the difference is +0.010 on average "
            "(SD 0.030, ttr better in 60.0%); the combined 95% CI (test set + probe retraining) is "
            "[-0.020, +0.100].") in sentence
    robust = answer(table_of(**{**refits, "top1_diff_lo_refit": 0.004}), "top1")
    assert "ttr is better than no-ttr" in robust


def test_secondary_metrics_carry_no_verdict_words():
    lines = secondary(table_of(), "top1")
    assert lines == ["Macro F1: -0.041, 95% CI [-0.070, -0.011] (paired bootstrap of the test images), paired "
                     "permutation test p = 0.004.",
                     "Quadratic weighted kappa: -0.004, 95% CI [-0.030, +0.021] (paired bootstrap of the test images), "
                     "paired permutation test p = 0.740."]
    for line in lines:
        assert not any(word in line for word in ("better", "worse", "detectable"))


def test_identical_modes_say_that_no_prediction_changed():
    y = np.random.default_rng(0).integers(0, 5, 120)
    P = make_proba(y, 5, seed=1)
    same = evaluate_modes(y, {"no-ttr": P, "ttr": P.copy()}, MetricSpec(5, qwk=True), n_boot=100, n_perm=50,
                          primary="qwk")
    sentence = answer(same, "qwk")
    assert "no detectable difference" in sentence and "no test prediction changed" in sentence
    lines = secondary(same, "qwk")
    assert len(lines) == len(METRICS)
    top1, others = lines[0], lines[1:]
    assert top1.startswith("Top-1 accuracy: +0.000, 95% CI [-0.0") and "the reverse: 0" in top1   # Tango has width
    assert all(line.endswith("+0.000, no test prediction changed.") for line in others if "AUC" not in line)
    rows = results_table(same, "no-ttr", "ttr", "qwk")
    assert "| quadratic weighted kappa (primary) |" in rows[-1] and "(no test prediction changed)" in rows[-1]


def test_the_answer_refuses_a_missing_mode_or_the_wrong_baseline():
    y = np.array([0, 1, 2, 1])
    good = np.full((2, 4, 3), 1 / 3)
    spec = MetricSpec(3)
    with pytest.raises(UserError, match="no row for mode 'ttr'"):
        answer(evaluate_modes(y, {"no-ttr": good}, spec, n_boot=10, n_perm=10), "top1")
    swapped = evaluate_modes(y, {"no-ttr": good, "ttr": good[::-1]}, spec, n_boot=10, n_perm=10, baseline="ttr")
    with pytest.raises(UserError, match="'no-ttr' is not the baseline"):
        answer(swapped, "top1")
    assert "no detectable difference between no-ttr and ttr" in answer(swapped, "top1", mode="no-ttr", baseline="ttr")


def test_results_table_rows():
    y = np.random.default_rng(4).integers(0, 5, 60)
    seeds = np.concatenate([make_proba(y, 5, 7, signal=0.5), make_proba(y, 5, 8, signal=2.0)])
    table = evaluate_modes(y, {"no-ttr": make_proba(y, 5, 6), "ttr": seeds}, MetricSpec(5, qwk=True), n_boot=100,
                           n_perm=50)
    lines = results_table(table, "no-ttr", "ttr", "top1")
    assert lines[0] == "| metric | no-ttr | ttr | ttr − no-ttr [95% CI] | p | test |"
    assert len(lines) == 2 + len(METRICS) + 1 and lines[-1].startswith("| quadratic weighted kappa |")
    rows = table.set_index("mode")
    no, ttr = rows.loc["no-ttr"], rows.loc["ttr"]
    top1 = lines[2].split(" | ")
    assert top1[0] == "| top-1 accuracy (primary)"
    assert ttr["top1_seed_sd"] > 0
    # no-ttr has one seed: no spread shown; ttr two that differ
    assert top1[1] == f"{no['top1']:.3f} [{no['top1_lo']:.3f}, {no['top1_hi']:.3f}]"
    assert top1[2] == f"{ttr['top1']:.3f} [{ttr['top1_lo']:.3f}, {ttr['top1_hi']:.3f}] sd {ttr['top1_seed_sd']:.3f}"
    assert top1[3] == f"{ttr['top1_diff']:+.3f} [{ttr['top1_diff_lo']:+.3f}, {ttr['top1_diff_hi']:+.3f}]"
    assert top1[5] == "exact McNemar |" and lines[3].endswith("| permutation |")
    assert refits_table(table, "no-ttr", "ttr", "top1") == []      # no refits, no table


def test_neurons_above_highest_layer_are_reported_not_advised_away():
    """The method leaves layers above highest_layer out on purpose: the summary names the strong
    neurons it leaves out and points at the study's highest_layer axis, never says raise it."""
    from types import SimpleNamespace

    from common.registers.neurons import NeuronRanking
    from common.reporting.summary import _warnings

    ranking = NeuronRanking(ranked=[(9, 1, 50.0), (3, 2, 40.0), (10, 3, 30.0), (2, 4, 5.0)], threshold=30.0,
                            detect_layer=-1, detect_layer_index=11, images_used=5, images_counted=5,
                            max_norm_seen=80.0)
    state = SimpleNamespace(config={"highest_layer": 5, "top_k": 3}, not_converged=[], ranking=ranking,
                            dataset=SimpleNamespace(leaks=[]))
    (note,) = _warnings(state)
    assert "2 of the top 3 ranked register neurons lie above highest_layer=5" in note
    assert "50 (layer 9, neuron 1)" in note and "30 (layer 10, neuron 3)" in note
    assert "on purpose" in note and "`highest_layer` axis" in note
    assert "raise" not in note.lower()
