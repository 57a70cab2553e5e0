"""``summary.md``'s verdict sentences and results table (common/reporting/summary.py), from tables
written by hand and from ``evaluate_modes``; the whole summary of a run is checked end to end in
``tests/app/test_cli.py``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.errors import UserError
from common.evaluation.metrics import METRICS, MetricSpec, evaluate_modes
from common.reporting.summary import results_table, verdicts


def make_proba(y: np.ndarray, c: int, seed: int, signal: float = 1.0) -> np.ndarray:
    """``[1, N, C]``: softmax of noisy logits that favour the true class."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y), c))
    logits[np.arange(len(y)), y] += signal
    p = np.exp(logits)
    return (p / p.sum(axis=-1, keepdims=True))[None]


def _row(**values) -> dict:
    return {"mode": "ttr", **values}


def test_verdict_sentences():
    table = pd.DataFrame([
        {"mode": "no-ttr"},
        _row(top1_diff=0.031, top1_diff_lo=0.008, top1_diff_hi=0.054, p_top1=0.012,
             p_mcnemar_top1=0.02, mcnemar_b=6, mcnemar_c=14,
             f1_macro_diff=-0.0412, f1_macro_diff_lo=-0.07, f1_macro_diff_hi=-0.011, p_f1_macro=0.004,
             qwk_diff=-0.004, qwk_diff_lo=-0.030, qwk_diff_hi=0.021, p_qwk=0.74,
             auc_macro_diff=0.05, auc_macro_diff_lo=0.02, auc_macro_diff_hi=0.08, p_auc_macro=0.0),
    ])
    assert verdicts(table) == [
        "Top-1 accuracy: ttr is better than no-ttr by +0.031 (95% CI [+0.008, +0.054], paired bootstrap "
        "p = 0.012).",
        "Macro F1: ttr is worse than no-ttr by 0.041 (difference -0.041, 95% CI [-0.070, -0.011], "
        "paired bootstrap p = 0.004).",
        "Macro one-vs-rest AUC: ttr is better than no-ttr by +0.050 (95% CI [+0.020, +0.080], "
        "paired bootstrap p < 2/B, no resample reached 0).",
        "Quadratic weighted kappa: no detectable difference between ttr and no-ttr at the 5% level "
        "(difference -0.004, 95% CI [-0.030, +0.021], paired bootstrap p = 0.740).",
    ]
    # alpha moves the decision (the quoted interval stays the 95% one)
    assert "no detectable difference" in verdicts(table, alpha=0.01)[0]
    assert "at the 1% level" in verdicts(table, alpha=0.01)[0]


def test_verdicts_agree_with_the_interval_they_quote():
    rng = np.random.default_rng(17)
    spec = MetricSpec(4, qwk=True)
    seen = set()
    for k, shift in enumerate((0.0, 0.3, 0.6, 1.0)):
        y = rng.integers(0, 4, 80)
        table = evaluate_modes(y, {"no-ttr": make_proba(y, 4, 100 + k), "ttr": make_proba(y, 4, 200 + k, 1.0 + shift)},
                               spec, n_boot=200, seed=k)
        for sentence in verdicts(table):
            lo, hi = (float(x) for x in sentence.split("95% CI [")[1].split("]")[0].split(", "))
            assert ("no detectable" in sentence) == (lo <= 0 <= hi), sentence
            seen.add("no detectable" in sentence)
    assert seen == {True, False}


def test_identical_modes_and_an_untestable_metric():
    y = np.random.default_rng(0).integers(0, 5, 120)
    P = make_proba(y, 5, seed=1)
    same = evaluate_modes(y, {"no-ttr": P, "ttr": P.copy()}, MetricSpec(5, qwk=True), n_boot=100)
    sentences = verdicts(same)
    assert len(sentences) == len(METRICS) + 1
    assert all("no detectable difference" in s and "p = 1.000" in s for s in sentences)
    one_class = np.zeros(12, dtype=int)  # no class has a positive and a negative: AUC undefined
    P = make_proba(one_class, 3, seed=2)
    table = evaluate_modes(one_class, {"no-ttr": P, "ttr": P[:, :, ::-1]}, MetricSpec(3), n_boot=50)
    auc = [s for s in verdicts(table) if s.startswith("Macro one-vs-rest AUC")]
    assert auc == ["Macro one-vs-rest AUC: not testable on this test split (the metric is undefined for ttr or "
                   "no-ttr)."]


def test_verdicts_refuse_a_missing_mode_or_the_wrong_baseline():
    y = np.array([0, 1, 2, 1])
    good = np.full((2, 4, 3), 1 / 3)
    spec = MetricSpec(3)
    with pytest.raises(UserError, match="no row for mode 'ttr'"):
        verdicts(evaluate_modes(y, {"no-ttr": good}, spec, n_boot=10))
    swapped = evaluate_modes(y, {"no-ttr": good, "ttr": good[::-1]}, spec, n_boot=10, baseline="ttr")
    with pytest.raises(UserError, match="'no-ttr' is not the baseline"):
        verdicts(swapped)
    assert len(verdicts(swapped, mode="no-ttr", baseline="ttr")) == len(METRICS)


def test_results_table_rows():
    y = np.random.default_rng(4).integers(0, 5, 60)
    seeds = np.concatenate([make_proba(y, 5, 7, signal=0.5), make_proba(y, 5, 8, signal=2.0)])
    table = evaluate_modes(y, {"no-ttr": make_proba(y, 5, 6), "ttr": seeds}, MetricSpec(5, qwk=True), n_boot=100)
    lines = results_table(table, "no-ttr", "ttr")
    assert lines[0] == "| metric | no-ttr | ttr | ttr − no-ttr [95% CI] | p (paired bootstrap) |"
    assert len(lines) == 2 + len(METRICS) + 1 and lines[-1].startswith("| quadratic weighted kappa |")
    rows = table.set_index("mode")
    no, ttr = rows.loc["no-ttr"], rows.loc["ttr"]
    top1 = lines[2].split(" | ")
    assert top1[0] == "| top-1 accuracy"
    # no-ttr has one seed (no spread shown); ttr two that differ
    assert ttr["top1_seed_sd"] > 0
    assert top1[1] == f"{no['top1']:.3f} [{no['top1_lo']:.3f}, {no['top1_hi']:.3f}]"
    assert top1[2] == f"{ttr['top1']:.3f} [{ttr['top1_lo']:.3f}, {ttr['top1_hi']:.3f}] sd {ttr['top1_seed_sd']:.3f}"
    assert top1[3] == f"{ttr['top1_diff']:+.3f} [{ttr['top1_diff_lo']:+.3f}, {ttr['top1_diff_hi']:+.3f}]"
    p = ttr["p_top1"]
    assert top1[4] == ("< 2/B |" if p == 0 else "< 0.001 |" if p < 0.001 else f"{p:.3f} |")


def test_headline_is_the_first_verdict_as_the_summary_states_it():
    from common.reporting.summary import headline

    text = ("# APTOS 2019: clip, no-ttr vs ttr\n\n> **Demo run ...**\n\n- a demo check, not a verdict\n\n"
            "## The answer\n\nDoes moving ...?\n\n- Top-1 accuracy: ttr is better than no-ttr by +0.100 (...).\n"
            "- Macro F1: no detectable difference (...).\n\n## Results\n\n- not this\n")
    assert headline(text) == "Top-1 accuracy: ttr is better than no-ttr by +0.100 (...)."
    assert headline("# a summary without an answer\n\n- x\n") is None
    assert headline("## The answer\n\nno verdicts\n\n## Results\n- y\n") is None


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
