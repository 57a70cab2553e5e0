"""The one way every report writes a number, a difference, a p-value, an interval, a share, a
missing value and a metric's name (common/reporting/format.py), written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from common.evaluation.metrics import METRIC_LABELS, MetricSpec
from common.reporting.format import (
    MISSING,
    estimate,
    in_report_order,
    interval,
    is_missing,
    markdown_table,
    metric_label,
    number,
    p_text,
    p_value,
    percent,
    signed,
    spread,
)

MISSING_VALUES = [None, math.nan, np.nan, np.float32("nan"), pd.NA, pd.NaT]


def test_missing_values_have_one_spelling():
    assert MISSING == "n/a"
    for value in MISSING_VALUES:
        assert is_missing(value)
        assert number(value) == signed(value) == p_value(value) == percent(value) == MISSING
        assert estimate(value, 0.1, 0.2) == MISSING
    for value in (0, 0.0, "", "text", np.int64(3), [1, 2]):
        assert not is_missing(value)


def test_numbers_and_differences():
    assert number(0.81234) == "0.812" and number(np.float64(1)) == "1.000" and number(12.0, 0) == "12"
    assert number(293.14, 1) == "293.1"
    assert signed(0.031) == "+0.031" and signed(-0.0412) == "-0.041" and signed(0.0) == "+0.000"
    assert signed(12.4, 0) == "+12"


def test_intervals_and_estimates():
    assert interval(0.78, 0.84) == "[0.780, 0.840]"
    assert interval(-0.07, 0.011, sign=True) == "[-0.070, +0.011]"
    assert interval(math.nan, 0.5) == "[n/a, 0.500]"
    assert estimate(0.8123, 0.78, 0.84) == "0.812 [0.780, 0.840]"
    assert estimate(0.8123, 0.78, 0.84, sd=0.0123) == "0.812 [0.780, 0.840] sd 0.012"
    assert estimate(0.8123, 0.78, 0.84, sd=math.nan) == "0.812 [0.780, 0.840]"     # one seed: no spread
    assert estimate(0.8123, 0.78, 0.84, sd=0.0) == "0.812 [0.780, 0.840] sd 0"     # the seeds agree exactly
    assert estimate(0.8123, 0.78, 0.84, sd=0.0003) == "0.812 [0.780, 0.840] sd < 0.001"
    assert spread(0.0006) == "sd 0.001" and spread(None) == ""
    assert estimate(-0.03, -0.06, -0.01, sign=True) == "-0.030 [-0.060, -0.010]"


def test_p_values_follow_one_rule_and_are_never_a_bare_zero():
    assert p_value(0.012) == "0.012" and p_value(0.74) == "0.740" and p_value(1.0) == "1.000"
    assert p_value(0.001) == "0.001"
    assert p_value(0.00099) == "< 0.001" and p_value(1e-12) == "< 0.001"
    assert p_value(0.0) == p_value(np.float64(0.0)) == "< 0.001"   # no test gives 0; never written bare
    assert p_text(0.012) == "p = 0.012" and p_text(1e-5) == "p < 0.001"
    assert p_text(math.nan) == "p = n/a"
    for p in [0.0, 1e-9, 4e-4, 0.0006, 0.002]:
        assert p_value(p).strip("< ") not in ("0", "0.000"), p


def test_percentages_never_round_a_share_to_zero():
    assert percent(0.2339) == "23.4%" and percent(1.0) == "100.0%" and percent(0.0) == "0.0%"
    assert percent(0.0004) == "< 0.1%" and percent(0.00049, digits=2) == "0.05%"
    assert percent(0.00004, digits=2) == "< 0.01%"
    assert percent(0.0006) == "0.1%"


def test_metric_labels_come_from_one_table_in_its_order():
    assert metric_label("top1") == "top-1 accuracy" and metric_label("qwk", capital=True) == "Quadratic weighted kappa"
    assert metric_label("new_metric") == "new_metric"
    assert in_report_order({"qwk", "top1", "zzz", "auc_macro", "aaa"}) == ["top1", "auc_macro", "qwk", "aaa", "zzz"]
    # every metric a spec can report has a label
    spec = MetricSpec(5, qwk=True, manufacturer_of_class=list("aabcd"))
    assert set(spec.names()) <= set(METRIC_LABELS)


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x|y"], ["n/a", 2.5]]) == [
        "| a | b |", "|---|---|", "| 1 | x\\|y |", "| n/a | 2.5 |"]
