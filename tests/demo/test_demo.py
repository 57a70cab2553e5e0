"""The demo's own verdict on itself (common.demo.demo.demo_check): what a correct demo shows, and
whether a run shows it, from the run's ranking and outliers.csv (tables made by hand here; the
real demo runs are checked end to end in tests/app/test_end_to_end.py)."""

from __future__ import annotations

import math

import pandas as pd

from common.demo.demo import demo_check

PLANTED = [(2, 37), (2, 88)]
TOKENS = 66                     # CLS, 64 patches, 1 register: a uniform share is 1.5%


def _outliers(share_ttr: float = 0.0, register: float = 290.0, entropy_ttr: float = 4.1,
              on_register: float = 0.36) -> pd.DataFrame:
    return pd.DataFrame({"mode": ["no-ttr", "ttr"], "patch_share_above_threshold": [0.23, share_ttr],
                         "mean_max_patch_norm": [293.0, 28.0], "register_norm": [math.nan, register],
                         "cls_attention_entropy": [3.1, entropy_ttr],
                         "cls_attention_on_register": [math.nan, on_register]}).set_index("mode")


def _ranked(*pairs) -> list[tuple[int, int, float]]:
    return [(layer, neuron, 10.0 - k) for k, (layer, neuron) in enumerate(pairs)]


def test_a_correct_demo_says_yes_three_times_with_its_numbers():
    lines = demo_check(PLANTED, _ranked((2, 88), (2, 37), (1, 5)), _outliers(), 60.0, TOKENS)
    text = "\n".join(lines)
    assert lines[0] == "**What a correct demo shows, and this run:**"
    assert "- detection ranks the planted register neurons first: yes ((2, 37) rank 2, (2, 88) rank 1)" in text
    assert "- ttr moves the outlier tokens onto the register: yes (image patches above the norm threshold 60: " \
           "23.0% no-ttr, 0.0% ttr; the register's norm 290.0" in text
    assert "- ttr moves the CLS attention off the outlier patches: yes" in text and "uniform share: 1.5%" in text
    assert lines[-1] == "This run shows what a correct demo shows."


def test_each_failure_is_named_and_the_run_asks_for_a_report():
    ranked = _ranked((1, 5), (2, 37), (2, 88))                       # a stranger ranked first
    text = "\n".join(demo_check(PLANTED, ranked, _outliers(), 60.0, TOKENS))
    assert "planted register neurons first: NO ((2, 37) rank 2, (2, 88) rank 3)" in text
    assert "This run does not show that detection ranks the planted register neurons first" in text
    assert "please report it" in text
    for outliers, what in ((_outliers(share_ttr=0.01), "moves the outlier tokens onto the register: NO"),
                           (_outliers(register=40.0), "moves the outlier tokens onto the register: NO"),
                           (_outliers(entropy_ttr=3.0), "CLS attention off the outlier patches: NO"),
                           (_outliers(on_register=0.05), "CLS attention off the outlier patches: NO")):
        text = "\n".join(demo_check(PLANTED, _ranked(*PLANTED), outliers, 60.0, TOKENS))
        assert what in text and "does not show" in text, text
    missing = "\n".join(demo_check(PLANTED, _ranked((2, 37)), _outliers(), 60.0, TOKENS))
    assert "(2, 88) rank absent" in missing and "first: NO" in missing


def test_without_the_analysis_two_checks_are_not_made():
    lines = demo_check(PLANTED, _ranked(*PLANTED), None, 60.0, TOKENS)
    assert sum("not checked" in line for line in lines) == 2
    assert lines[-1].startswith("This run shows what was checked")
