"""Expected calibration error and the Brier score (common/evaluation/calibration.py) against plain
loops over the rows and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from common.evaluation.calibration import brier_score, expected_calibration_error


def ece_loop(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    rows = [list(map(float, row)) for row in p]
    total = 0.0
    for m in range(bins):
        lo, hi = m / bins, (m + 1) / bins
        members = [i for i, row in enumerate(rows) if lo < max(row) <= hi or (m == 0 and max(row) == 0)]
        if not members:
            continue
        accuracy = sum(1.0 for i in members if rows[i].index(max(rows[i])) == y[i]) / len(members)
        confidence = sum(max(rows[i]) for i in members) / len(members)
        total += len(members) / len(rows) * abs(accuracy - confidence)
    return total


def brier_loop(p: np.ndarray, y: np.ndarray) -> float:
    total = 0.0
    for i, row in enumerate(p):
        for c, value in enumerate(row):
            total += (value - (1.0 if c == y[i] else 0.0)) ** 2
    return total / len(p)


def test_ece_and_brier_match_plain_loops():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.full(5, 0.6), size=300)
    # confidences on bin edges (k/15 exactly), a certain row and a uniform row
    edges = np.array([[0.2] * 5, [1.0, 0, 0, 0, 0], [0.4, 0.6, 0, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0, 0]])
    # confidences on an edge beside ones just inside the two neighbouring bins, right and wrong
    # mixed, so that putting an edge into the wrong bin changes the ECE
    near = np.array([[c] + [(1 - c) / 4] * 4 for c in (0.4, 0.39, 0.41, 0.6, 0.59, 0.61, 0.8, 0.79, 0.81)])
    p = np.vstack([p, edges, near, near])
    y = np.concatenate([rng.integers(0, 5, len(p) - 2 * len(near)), np.tile([0, 1, 1], 3), np.tile([0, 1, 1], 3)])
    assert expected_calibration_error(p, y) == pytest.approx(ece_loop(p, y), abs=1e-12)
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(ece_loop(p, y, 10), abs=1e-12)
    assert brier_score(p, y) == pytest.approx(brier_loop(p, y), abs=1e-12)
    # alone, where neighbouring bins err in opposite directions (pooled with many overconfident rows
    # a row moved between two overconfident bins leaves the sum of |gaps| unchanged)
    y_near = np.tile([0, 1, 1], 3)
    assert expected_calibration_error(near, y_near) == pytest.approx(ece_loop(near, y_near), abs=1e-12)


def test_ece_and_brier_known_values():
    # four rows at confidence 0.9, three right: |0.75 - 0.9| = 0.15
    p = np.array([[0.9, 0.1]] * 4)
    y = np.array([0, 0, 0, 1])
    assert expected_calibration_error(p, y) == pytest.approx(0.15)
    # Brier: three rows (0.1^2 + 0.1^2), one row (0.9^2 + 0.9^2)
    assert brier_score(p, y) == pytest.approx((3 * 0.02 + 1.62) / 4)
    certain = np.eye(3)
    assert expected_calibration_error(certain, np.arange(3)) == 0.0
    assert brier_score(certain, np.arange(3)) == 0.0
    assert brier_score(certain, np.array([1, 2, 0])) == pytest.approx(2.0)


def test_no_rows_and_bad_shapes():
    assert np.isnan(expected_calibration_error(np.zeros((0, 3)), np.zeros(0, dtype=int)))
    assert np.isnan(brier_score(np.zeros((0, 3)), np.zeros(0, dtype=int)))
    with pytest.raises(ValueError, match="expected probabilities"):
        brier_score(np.full((4, 3), 1 / 3), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="labels must be integers in 0..2"):
        expected_calibration_error(np.full((2, 3), 1 / 3), np.array([0, 3]))
