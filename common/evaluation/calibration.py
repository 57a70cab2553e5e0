"""Calibration of predicted class probabilities: expected calibration error and Brier score.

Both take ``probabilities`` ``[N, C]`` (rows are a probability distribution over the C classes,
as in a run's ``predictions_<mode>.csv``) and integer ``labels`` ``[N]`` in ``0..C-1``.

* :func:`expected_calibration_error` (ECE, Guo et al. 2017): the top-class probability
  ("confidence") of each row is put into ``n_bins`` equal-width bins on [0, 1]; bin ``m`` (0-based)
  holds confidences in ``(m / n_bins, (m + 1) / n_bins]`` (a confidence of exactly 0 goes to the
  first bin).  ECE = sum over bins of ``(rows in bin / N) * |accuracy in bin - mean confidence in
  bin|``; empty bins contribute nothing.  In [0, 1]; 0 is perfectly calibrated.
* :func:`brier_score`: the multi-class Brier score (Brier 1950), the mean over rows of
  ``sum_c (p_c - onehot_c)^2``.  In [0, 2]; 0 is a perfect, certain prediction.

:func:`weighted_ece` and :func:`weighted_brier` give both for many weightings of the rows at once
(``W [B, N]``: bootstrap multiplicities), so the change between two modes gets a paired bootstrap
interval (the same resamples for both, :func:`common.evaluation.stats.bootstrap_difference`).

Pure numpy, no state; the report of :mod:`common.reporting.studyreport` calls them per cell and mode.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def _check(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(labels)
    if p.ndim != 2 or y.ndim != 1 or len(p) != len(y):
        raise ValueError(f"expected probabilities [N, C] and labels [N]; got {p.shape} and {y.shape}")
    if len(y) and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must be integers in 0..{p.shape[1] - 1}")
    return p, y.astype(np.int64)


def bin_index(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Bin of each confidence ``[N]``: ``m`` with ``m / n_bins < c <= (m + 1) / n_bins`` (0 goes to
    bin 0)."""
    # k / n_bins exactly as a plain division gives it (linspace's start + k * step can differ by
    # one ulp, which moves a confidence sitting on an edge, such as 0.2 with 15 bins, to the next bin)
    edges = np.arange(n_bins + 1) / n_bins
    # side="left": a confidence equal to an edge belongs to the bin that edge closes.
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)


def expected_calibration_error(probabilities, labels, n_bins: int = ECE_BINS) -> float:
    """ECE with ``n_bins`` equal-width bins on the top-class probability (NaN for no rows)."""
    p, y = _check(probabilities, labels)
    if len(y) == 0:
        return float("nan")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    bins = bin_index(confidence, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, weights=correct, minlength=n_bins)
                 - np.bincount(bins, weights=confidence, minlength=n_bins))
    # sum_m (n_m / N) |acc_m - conf_m| = sum_m |sum correct - sum confidence|_m / N
    return float(gap[counts > 0].sum() / len(y))


def brier_score(probabilities, labels) -> float:
    """Multi-class Brier score: mean over rows of the squared distance to the one-hot label."""
    p, y = _check(probabilities, labels)
    if len(y) == 0:
        return float("nan")
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def weighted_ece(probabilities, labels, W: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """ECE of each weighting ``W [B, N]`` of the rows (row ``i`` counted ``W[b, i]`` times), ``[B]``;
    a row of ones is :func:`expected_calibration_error`.  NaN where the weights sum to 0."""
    p, y = _check(probabilities, labels)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    onehot = np.eye(n_bins)[bin_index(confidence, n_bins)]        # [N, bins]
    gap = np.abs(W @ (onehot * correct[:, None]) - W @ (onehot * confidence[:, None]))   # [B, bins]
    total = W.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, gap.sum(axis=1) / np.where(total > 0, total, 1.0), np.nan)


def weighted_brier(probabilities, labels, W: np.ndarray) -> np.ndarray:
    """Brier score of each weighting ``W [B, N]`` of the rows, ``[B]`` (NaN where the weights sum to 0)."""
    p, y = _check(probabilities, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    per_row = ((p - onehot) ** 2).sum(axis=1)
    total = W.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (W @ per_row) / np.where(total > 0, total, 1.0), np.nan)

