"""Plain, independent references for the statistics tests: each computes what
``common.evaluation.stats`` / ``compare`` compute, by another route (a hand formula, a brute-force
search, a loop over scikit-learn calls), so a test never takes its expected value from the code
under test."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import norm
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)

Z = norm.ppf(0.975)


def wilson(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson's score interval by its closed form: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def _restricted_q(delta: float, better: int, worse: int, same: int) -> float:
    """The probability of a "worse" pair maximising the multinomial likelihood of (better, worse,
    same) under p_better - p_worse = delta, found numerically (no closed form)."""
    lo, hi = max(0.0, -delta), min(1.0 - delta, (1.0 - delta) / 2.0)
    if hi - lo < 1e-15:
        return lo

    def negative_log_likelihood(q: float) -> float:
        pb, pw = q + delta, q
        ps = 1.0 - pb - pw
        total = 0.0
        for count, prob in ((better, pb), (worse, pw), (same, ps)):
            if count:
                total -= count * math.log(max(prob, 1e-300))
        return total

    return float(minimize_scalar(negative_log_likelihood, bounds=(lo, hi), method="bounded",
                                 options={"xatol": 1e-13}).x)


def tango_by_grid(better: int, worse: int, n: int, z: float = Z, step: float = 1e-4) -> tuple[float, float]:
    """Tango's interval by brute force: the score statistic (observed minus hypothesised
    difference over its standard error at the numerically restricted MLE) on a grid of ``delta``
    in [-1, 1]; the interval is the smallest and largest grid point with |statistic| <= z."""
    same = n - better - worse
    inside = []
    for delta in np.arange(-1.0, 1.0 + step / 2, step):
        q = _restricted_q(float(delta), better, worse, same)
        variance = (2 * q + delta - delta * delta) / n
        if variance <= 0:
            stat = 0.0 if abs((better - worse) / n - delta) < 1e-12 else math.inf
        else:
            stat = ((better - worse) / n - delta) / math.sqrt(variance)
        if abs(stat) <= z:
            inside.append(float(delta))
    return min(inside), max(inside)


def sklearn_metrics(y: np.ndarray, p: np.ndarray, c: int, qwk: bool = False, makers=None) -> dict[str, float]:
    """Reference values straight from scikit-learn (AUC: mean of per-class binary AUCs)."""
    pred = p.argmax(axis=1)
    present = [k for k in range(c) if 0 < (y == k).sum() < len(y)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = {
            "top1": accuracy_score(y, pred),
            "top3": top_k_accuracy_score(y, p, k=3, labels=range(c)) if c > 3 else 1.0,
            "f1_macro": f1_score(y, pred, average="macro", zero_division=0),
            "precision_macro": precision_score(y, pred, average="macro", zero_division=0),
            "recall_macro": recall_score(y, pred, average="macro", zero_division=0),
            "auc_macro": np.mean([roc_auc_score(y == k, p[:, k]) for k in present]) if present else math.nan,
            "balanced_accuracy": balanced_accuracy_score(y, pred),
        }
        if qwk:
            ref["qwk"] = cohen_kappa_score(y, pred, labels=range(c), weights="quadratic")
    if makers is not None:
        m = np.asarray(makers)
        ref["manufacturer_top1"] = float(np.mean(m[pred] == m[y]))
    return ref


def untie(d) -> np.ndarray:
    """The documented tie rule: |difference| <= 1e-12 is 0."""
    d = np.array(d, dtype=float)
    d[np.abs(d) <= 1e-12] = 0.0
    return d


def plain_interval(values) -> tuple[float, float]:
    """95% percentile interval as order statistics over the finite values: the 2.5% point of the
    empirical distribution from below and from above (numpy's ``inverted_cdf`` percentile)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return (float(np.percentile(v, 2.5, method="inverted_cdf")),
            float(-np.percentile(-v, 2.5, method="inverted_cdf")))


def permutation_by_loop(y: np.ndarray, mode: np.ndarray, base: np.ndarray, metric, n_perm: int,
                        seed: int) -> float:
    """The paired permutation p-value by a loop: per permutation, swap the two ``[N, C]``
    matrices' rows where the documented draw says so, score both with ``metric(y, p)`` and count
    the |differences| that reach the observed one; ``(k + 1) / (B + 1)``."""
    swap = np.random.default_rng([seed, 1]).random((n_perm, len(y))) < 0.5
    observed = untie([metric(y, mode) - metric(y, base)])[0]
    reached = 0
    for s in swap:
        a = np.where(s[:, None], base, mode)
        b = np.where(s[:, None], mode, base)
        d = untie([metric(y, a) - metric(y, b)])[0]
        reached += abs(d) >= abs(observed) - 1e-12
    return (reached + 1) / (n_perm + 1)
