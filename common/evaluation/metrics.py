"""Test-split metrics of one probability matrix, on the full test set and on weighted resamples
(docs/statistics.md).

One prediction per mode
    A mode's prediction is the **seed ensemble**, the mean probability over its probe seeds
    (``[S, N, C] -> [N, C]``, :func:`ensemble_predictions`).  That one matrix gives the headline
    metrics, their intervals, every paired test and ``predictions_<mode>.csv``, so the table,
    the tests and the predictions file cannot disagree.

Weighted resamples
    :func:`weighted_metrics` computes every metric for many weightings of the test rows in one
    vectorised pass (per-class counts are ``W @ onehot``; the one-vs-rest AUC is the tie-aware
    Mann-Whitney statistic with the weights as multiplicities).  The full test set is a row of
    ones, a bootstrap resample its multiplicities, and a permutation of the paired permutation
    test a 0/1 choice between the two modes' stacked rows, so point estimates, bootstrap and
    permutations share one code path; ``tests/evaluation/test_metrics.py`` checks it against
    scikit-learn.  How the modes are compared is :mod:`common.evaluation.compare`.

Rates are fractions in [0, 1]; kappa is in [-1, 1].
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
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

from common.errors import UserError

METRICS: tuple[str, ...] = (
    "top1",
    "top3",
    "f1_macro",
    "precision_macro",
    "recall_macro",
    "auc_macro",
    "balanced_accuracy",
)
# Every metric a spec can ask for, in report order, with the name a sentence uses.
METRIC_LABELS: dict[str, str] = {
    "top1": "top-1 accuracy",
    "top3": "top-3 accuracy",
    "f1_macro": "macro F1",
    "precision_macro": "macro precision",
    "recall_macro": "macro recall",
    "auc_macro": "macro one-vs-rest AUC",
    "balanced_accuracy": "balanced accuracy",
    "qwk": "quadratic weighted kappa",
    "manufacturer_top1": "manufacturer top-1",
}
TOP_K = 3
# Metrics that are the share of correctly answered test images: their paired difference is
# tested exactly (McNemar) with Tango's interval, their per-mode interval is Wilson's.
PROPORTIONS: tuple[str, ...] = ("top1", "manufacturer_top1")


@dataclass
class MetricSpec:
    """Which metrics a dataset reports.

    ``n_classes`` is ``C`` (the probability columns); ``qwk`` adds the quadratic weighted kappa
    (APTOS grades: class index = grade); ``manufacturer_of_class`` (one name per class index)
    adds ``manufacturer_top1`` (Pacemaker).
    """

    n_classes: int
    qwk: bool = False
    manufacturer_of_class: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n_classes, bool) or not isinstance(self.n_classes, (int, np.integer)) or self.n_classes < 2:
            raise UserError(f"n_classes={self.n_classes!r} must be an integer >= 2")
        self.n_classes = int(self.n_classes)
        if self.manufacturer_of_class is not None:
            self.manufacturer_of_class = [str(m) for m in self.manufacturer_of_class]
            if len(self.manufacturer_of_class) != self.n_classes:
                raise UserError(
                    f"manufacturer_of_class has {len(self.manufacturer_of_class)} entries for "
                    f"{self.n_classes} classes; give one manufacturer per class index"
                )

    def names(self) -> list[str]:
        """Metric column names in report order: METRICS, then qwk, then manufacturer_top1."""
        names = list(METRICS)
        if self.qwk:
            names.append("qwk")
        if self.manufacturer_of_class is not None:
            names.append("manufacturer_top1")
        return names

    def manufacturer_codes(self) -> np.ndarray:
        """Integer manufacturer id per class ``[C]`` (requires ``manufacturer_of_class``)."""
        assert self.manufacturer_of_class is not None
        _, codes = np.unique(np.asarray(self.manufacturer_of_class), return_inverse=True)
        return codes.astype(np.int64)


# --------------------------------------------------------------------------- validation


def check_labels(y_true, n_classes: int) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1 or y.shape[0] == 0:
        raise UserError(f"true labels have shape {y.shape}; expected a non-empty 1-D integer array [N]")
    if y.dtype.kind not in "iu":
        if y.dtype.kind != "f" or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise UserError(f"true labels have dtype {y.dtype}; expected integer class indices")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= n_classes:
        bad = int(y[(y < 0) | (y >= n_classes)][0])
        raise UserError(f"true label {bad} is outside [0, {n_classes}); labels must be class indices")
    return y


def check_probabilities(proba, n_rows: int, n_classes: int, ndim: int, name: str = "probabilities") -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    expect = "[N, C]" if ndim == 2 else "[S, N, C]"
    if p.ndim != ndim or p.shape[-1] != n_classes or p.shape[-2] != n_rows or p.shape[0] == 0:
        raise UserError(
            f"{name} have shape {p.shape}; expected {expect} with N={n_rows} test rows and C={n_classes} classes"
        )
    if not np.all(np.isfinite(p)):
        raise UserError(f"{name} contain NaN or inf; the probe output is broken, re-run the probe")
    return p


# --------------------------------------------------------------------------- point metrics


def _auc_classes(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Classes the macro AUC can use, ``[C]`` bool: at least one positive and one negative in ``y``."""
    counts = np.bincount(y, minlength=n_classes)
    return (counts > 0) & (counts < len(y))


def _auc_ovr_present(y: np.ndarray, proba: np.ndarray) -> tuple[float, int]:
    """Mean one-vs-rest ROC-AUC over classes with >= 1 positive and >= 1 negative in ``y``."""
    classes = np.flatnonzero(_auc_classes(y, proba.shape[1]))
    if classes.size == 0:
        return math.nan, 0
    aucs = [roc_auc_score(y == c, proba[:, c]) for c in classes]
    return float(np.mean(aucs)), len(classes)


def compute_metrics(y_true, proba, spec: MetricSpec) -> dict[str, float]:
    """All metrics of ``spec`` for one probability matrix, via scikit-learn.

    ``y_true`` int ``[N]``; ``proba`` ``[N, C]``; the prediction is ``argmax`` (lowest index on
    ties).  Choices:

    - macro F1/precision/recall use scikit-learn's default label set, the classes present in
      ``y_true`` OR predicted, with ``zero_division=0`` (a class predicted but never true has
      recall 0 and F1 0; a class true but never predicted has precision 0).  Classes neither
      true nor predicted are left out rather than counted as 0.
    - ``balanced_accuracy``: scikit-learn's, the mean recall over classes present in ``y_true``.
    - ``top3``: ``top_k_accuracy_score(k=min(3, C), labels=range(C))``; with ``C <= 3`` every
      true class is in the top k, so it is 1.0 (returned directly: scikit-learn rejects
      2-column scores for two classes).
    - ``auc_macro``: mean of the binary one-vs-rest ``roc_auc_score`` over classes with at
      least one positive and one negative in ``y_true``; NaN if there is none.  The extra key
      ``auc_classes`` (int, metadata) says how many classes were averaged.
    - ``qwk``: ``cohen_kappa_score(weights="quadratic", labels=range(C))``: the weights use the
      class index (grade) distance even when a grade is absent from the test split
      (scikit-learn's default label set would re-index the present grades).  NaN when undefined.
    - ``manufacturer_top1``: share of rows whose predicted class has the true class's manufacturer.
    """
    C = spec.n_classes
    y = check_labels(y_true, C)
    p = check_probabilities(proba, len(y), C, 2)
    pred = p.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", UserWarning)  # balanced_accuracy: "y_pred contains classes not in y_true"
        out: dict[str, float] = {
            "top1": float(accuracy_score(y, pred)),
            "top3": 1.0 if C <= TOP_K else float(top_k_accuracy_score(y, p, k=TOP_K, labels=np.arange(C))),
            "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
            "precision_macro": float(precision_score(y, pred, average="macro", zero_division=0)),
            "recall_macro": float(recall_score(y, pred, average="macro", zero_division=0)),
        }
        auc, n_auc = _auc_ovr_present(y, p)
        out["auc_macro"] = auc
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
        if spec.qwk:
            out["qwk"] = float(cohen_kappa_score(y, pred, labels=np.arange(C), weights="quadratic"))
        if spec.manufacturer_of_class is not None:
            man = spec.manufacturer_codes()
            out["manufacturer_top1"] = float(np.mean(man[pred] == man[y]))
    out["auc_classes"] = n_auc
    return out


def ensemble_predictions(proba_per_seed) -> np.ndarray:
    """Seed ensemble: mean probability over seeds, ``[S, N, C] -> [N, C]``."""
    p = np.asarray(proba_per_seed, dtype=np.float64)
    if p.ndim != 3 or p.shape[0] == 0:
        raise UserError(f"probabilities per seed have shape {p.shape}; expected [S, N, C] with S >= 1")
    return p.mean(axis=0)


# --------------------------------------------------------------------------- metrics on resamples


def _weighted_auc(WT: np.ndarray, pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC-AUC per resample, ``[B]`` (NaN where positives or negatives vanish).

    ``WT [N, B]`` holds the multiplicities (rows = test rows), ``pos [N]`` marks the class's
    rows, ``score [N]`` its probability column.  Mann-Whitney with ties counted 1/2 (what
    ``roc_auc_score``'s trapezoid gives), each row weighted by its multiplicity:
    ``sum_{i pos, j neg} w_i w_j ([s_i > s_j] + [s_i = s_j]/2) / (W_pos W_neg)``.  Negatives
    are sorted once; ``CN`` is their cumulative weight, and for each positive the negatives
    below / tied are read off ``CN`` at its ``searchsorted`` bounds.  The weights are integer
    counts, so every sum is exact in float64.
    """
    neg_idx = np.flatnonzero(~pos)
    pos_idx = np.flatnonzero(pos)
    order = np.argsort(score[neg_idx], kind="mergesort")
    neg_sorted = score[neg_idx][order]
    CN = np.zeros((len(neg_idx) + 1, WT.shape[1]))
    np.cumsum(WT[neg_idx[order]], axis=0, out=CN[1:])
    s_pos = score[pos_idx]
    lo = np.searchsorted(neg_sorted, s_pos, side="left")
    hi = np.searchsorted(neg_sorted, s_pos, side="right")
    Wp = WT[pos_idx]  # [n_pos, B]
    num = (Wp * (CN[lo] + CN[hi])).sum(axis=0) * 0.5
    den = Wp.sum(axis=0) * CN[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_metrics(
    y: np.ndarray, proba: np.ndarray, spec: MetricSpec, W: np.ndarray, names: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Metrics of ``spec`` on each resample ``W [B, N]`` for one probability matrix ``proba [N, C]``.

    Returns ``{metric: [B]}`` (all of ``spec.names()``, or just ``names``: AUC and QWK are
    skipped when not asked for); with ``W`` all ones this equals :func:`compute_metrics` (tested).
    """
    wanted = set(spec.names() if names is None else names)
    C = spec.n_classes
    pred = proba.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    onehot_true = np.eye(C)[y]  # [N, C]
    onehot_pred = np.eye(C)[pred]
    true_n = W @ onehot_true  # [B, C] support per class
    pred_n = W @ onehot_pred
    tp = W @ (onehot_true * correct[:, None])
    total = W.sum(axis=1)  # = n for a bootstrap resample
    out: dict[str, np.ndarray] = {"top1": (W @ correct) / total}

    if C <= TOP_K:
        out["top3"] = np.ones(W.shape[0])
    else:  # same ranking as sklearn's top_k_accuracy_score (stable sort, reversed)
        topk = np.argsort(proba, axis=1, kind="mergesort")[:, ::-1][:, :TOP_K]
        hits = (topk == y[:, None]).any(axis=1).astype(np.float64)
        out["top3"] = (W @ hits) / total

    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(pred_n > 0, tp / np.where(pred_n > 0, pred_n, 1.0), 0.0)
        rec = np.where(true_n > 0, tp / np.where(true_n > 0, true_n, 1.0), 0.0)
        denom = true_n + pred_n
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1.0), 0.0)
    in_labels = (true_n > 0) | (pred_n > 0)  # sklearn's default labels: true OR predicted
    n_labels = in_labels.sum(axis=1)
    out["f1_macro"] = (f1 * in_labels).sum(axis=1) / n_labels
    out["precision_macro"] = (prec * in_labels).sum(axis=1) / n_labels
    out["recall_macro"] = (rec * in_labels).sum(axis=1) / n_labels

    if "auc_macro" in wanted:
        aucs = np.full((W.shape[0], C), np.nan)
        WT = np.ascontiguousarray(W.T)  # [N, B]: row gathers and cumsums run over contiguous rows
        for c in np.flatnonzero(_auc_classes(y, C)):
            aucs[:, c] = _weighted_auc(WT, y == c, proba[:, c])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows -> NaN
            out["auc_macro"] = np.nanmean(aucs, axis=1)

    present = true_n > 0
    out["balanced_accuracy"] = (rec * present).sum(axis=1) / present.sum(axis=1)

    if spec.qwk and "qwk" in wanted:
        cm = (W @ np.eye(C * C)[y * C + pred]).reshape(-1, C, C)  # [B, true, pred]
        grid = np.arange(C, dtype=np.float64)
        wq = (grid[:, None] - grid[None, :]) ** 2
        expected = true_n[:, :, None] * pred_n[:, None, :] / total[:, None, None]
        num = (wq * cm).sum(axis=(1, 2))
        den = (wq * expected).sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            out["qwk"] = np.where(den > 0, 1.0 - num / np.where(den > 0, den, 1.0), np.nan)
    if spec.manufacturer_of_class is not None:
        man = spec.manufacturer_codes()
        out["manufacturer_top1"] = (W @ (man[pred] == man[y]).astype(np.float64)) / total
    return {m: v for m, v in out.items() if m in wanted}


def proportion_hits(y: np.ndarray, proba: np.ndarray, spec: MetricSpec) -> dict[str, np.ndarray]:
    """Per proportion metric of ``spec`` (:data:`PROPORTIONS`), which test rows count as right,
    ``[N]`` bools: ``top1`` the predicted class is the true one, ``manufacturer_top1`` it has the
    true class's manufacturer.  ``y [N]`` class indices, ``proba [N, C]``."""
    pred = np.asarray(proba).argmax(axis=1)
    hits = {"top1": pred == y}
    if spec.manufacturer_of_class is not None:
        man = spec.manufacturer_codes()
        hits["manufacturer_top1"] = man[pred] == man[y]
    return hits
