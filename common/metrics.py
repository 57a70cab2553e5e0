"""Test-split metrics, seeded bootstrap intervals and the paired ttr-vs-no-ttr tests (SPEC §7).

Point estimates come straight from scikit-learn (:func:`compute_metrics`).  The bootstrap needs
the same metrics on ``n_boot`` resamples x ``S`` seeds, which is far too many scikit-learn calls
to be quick, so :func:`_bootstrap_metrics` computes them in one vectorised pass: a resample is
a vector of multiplicities over the test rows (``W [B, N]``), per-class counts are matrix
products ``W @ onehot`` and the one-vs-rest AUC is the tie-aware Mann-Whitney statistic with
those multiplicities as weights.  ``tests/test_metrics.py`` checks that this fast path equals
scikit-learn on fixed and resampled examples (ties and vanished classes included).

Rates are fractions in [0, 1]; kappa is in [-1, 1].
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import binomtest
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

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = (
    "top1",
    "top3",
    "f1_macro",
    "precision_macro",
    "recall_macro",
    "auc_macro",
    "balanced_accuracy",
)
MODES: tuple[str, ...] = ("no-ttr", "ttr")
TOP_K = 3
_TIE_TOL = 1e-12  # |F1_b - F1_a| at or below this is a tie (floating-point noise)


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


def _check_y(y_true, n_classes: int) -> np.ndarray:
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


def _check_proba(proba, n_rows: int, n_classes: int, ndim: int, name: str = "probabilities") -> np.ndarray:
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


def _auc_ovr_present(y: np.ndarray, proba: np.ndarray) -> tuple[float, int]:
    """Mean one-vs-rest ROC-AUC over classes with >= 1 positive and >= 1 negative in ``y``."""
    n = len(y)
    counts = np.bincount(y, minlength=proba.shape[1])
    classes = [c for c in range(proba.shape[1]) if 0 < counts[c] < n]
    if not classes:
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
    y = _check_y(y_true, C)
    p = _check_proba(proba, len(y), C, 2)
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


# --------------------------------------------------------------------------- fast bootstrap


def _resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap resamples as multiplicities ``W [B, N]`` (float64): ``W[b, i]`` = how often
    test row ``i`` was drawn in resample ``b``.  Indices from ``numpy.random.default_rng(seed)``."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise UserError(f"n_boot={n_boot!r} must be an integer >= 1 (bootstrap resamples)")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


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


def _bootstrap_metrics(
    y: np.ndarray, proba: np.ndarray, spec: MetricSpec, W: np.ndarray, names: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Metrics of ``spec`` on each resample ``W [B, N]`` for one seed's ``proba [N, C]``.

    Returns ``{metric: [B]}`` (all of ``spec.names()``, or just ``names``: AUC and QWK are
    skipped when not asked for); with ``W`` all ones this equals :func:`compute_metrics` (tested).
    """
    wanted = set(spec.names() if names is None else names)
    C = spec.n_classes
    n = len(y)
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
        for c in range(C):
            pos = y == c
            if pos.any() and not pos.all():
                aucs[:, c] = _weighted_auc(WT, pos, proba[:, c])
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


def _seed_mean_boot(y: np.ndarray, P: np.ndarray, spec: MetricSpec, W: np.ndarray) -> dict[str, np.ndarray]:
    """Per resample, each metric averaged over seeds ``P [S, N, C]`` -> ``{metric: [B]}``.

    A seed whose metric is NaN on a resample (e.g. AUC with no usable class) makes that
    resample NaN, so every kept resample averages the same seeds."""
    per_seed = [_bootstrap_metrics(y, P[s], spec, W) for s in range(P.shape[0])]
    return {m: np.mean([d[m] for d in per_seed], axis=0) for m in spec.names()}


# --------------------------------------------------------------------------- per mode


def evaluate_mode(y_true, proba_per_seed, spec: MetricSpec, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of one mode with spread over probe seeds and a 95% bootstrap interval.

    ``proba_per_seed`` is ``[S, N, C]``.  For every metric ``m`` of ``spec.names()``:

    - ``m``: mean over seeds of :func:`compute_metrics` on the full test split;
    - ``m_std``: standard deviation over seeds (sample std, ``ddof=1``, for ``S >= 2``;
      0.0 for a single seed);
    - ``m_lo``, ``m_hi``: 2.5th/97.5th percentiles over ``n_boot`` bootstrap resamples of
      the test rows (indices from ``numpy.random.default_rng(seed)``, the same resample for
      every seed); on each resample the metric is computed per seed and averaged over seeds.
      A resample where the metric is undefined (NaN) is skipped: for ``auc_macro`` each
      resample averages over the classes that still have a positive and a negative in it (a
      class that vanished from the resample simply drops out), and only a resample with no
      such class at all is NaN; ``qwk`` is NaN when its expected disagreement is 0.  The
      percentiles use the remaining resamples, ``m_n_boot`` says how many (NaN interval if none).

    Also ``auc_classes`` (classes in the point-estimate AUC), ``n_seeds``, ``n_test``.
    """
    C = spec.n_classes
    y = _check_y(y_true, C)
    P = _check_proba(proba_per_seed, len(y), C, 3, "probabilities per seed")
    S = P.shape[0]
    per_seed = [compute_metrics(y, P[s], spec) for s in range(S)]
    W = _resample_weights(len(y), n_boot, seed)
    boot = _seed_mean_boot(y, P, spec, W)
    out: dict = {}
    for m in spec.names():
        vals = np.array([d[m] for d in per_seed], dtype=np.float64)
        out[m] = float(np.mean(vals))
        out[f"{m}_std"] = float(np.std(vals, ddof=1)) if S > 1 else 0.0
        b = boot[m][np.isfinite(boot[m])]
        out[f"{m}_n_boot"] = int(b.size)
        if b.size:
            lo, hi = np.percentile(b, [2.5, 97.5])
            out[f"{m}_lo"], out[f"{m}_hi"] = float(lo), float(hi)
        else:
            out[f"{m}_lo"] = out[f"{m}_hi"] = math.nan
        if b.size < n_boot:
            logger.info("%s: %d of %d bootstrap resamples undefined, skipped", m, n_boot - b.size, n_boot)
    out["auc_classes"] = int(per_seed[0]["auc_classes"])
    out["n_seeds"] = S
    out["n_test"] = len(y)
    return out


# --------------------------------------------------------------------------- paired tests


def paired_tests(y_true, proba_a, proba_b, spec: MetricSpec, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Paired comparison of mode b (ttr) against mode a (no-ttr) on the same test images.

    ``proba_a``, ``proba_b``: ``[S, N, C]`` (no-ttr, ttr).

    - McNemar (exact): top-1 correctness of each mode's seed ensemble (argmax of the mean
      probability over seeds).  ``mcnemar_b`` = images a gets right and b gets wrong,
      ``mcnemar_c`` = images a gets wrong and b gets right; ``p_mcnemar_top1`` is the
      two-sided ``scipy.stats.binomtest(b, b + c, 0.5)`` p-value, 1.0 when ``b + c == 0``.
    - Paired bootstrap on macro F1: the same ``n_boot`` resamples (``default_rng(seed)``) for
      both modes; per resample ``diff = F1_b - F1_a`` with each F1 the mean over seeds.
      ``p_bootstrap_f1_macro = min(1, 2 * min(share(diff <= 0), share(diff >= 0)))`` (the
      two-sided percentile-bootstrap p-value for "no difference"; ties count on both sides,
      so identical modes give 1).  ``delta_f1_macro`` is the point estimate (seed-mean F1 of b
      minus that of a) with its 95% percentile interval ``delta_f1_macro_lo``/``_hi``.

    These are per-comparison p-values: many comparisons across datasets and backbones call for
    a multiplicity correction (e.g. Holm).
    """
    C = spec.n_classes
    y = _check_y(y_true, C)
    A = _check_proba(proba_a, len(y), C, 3, "no-ttr probabilities per seed")
    B = _check_proba(proba_b, len(y), C, 3, "ttr probabilities per seed")
    if A.shape != B.shape:
        raise UserError(f"no-ttr probabilities {A.shape} and ttr probabilities {B.shape} differ in shape; "
                        "both modes need the same seeds and test images")
    ok_a = ensemble_predictions(A).argmax(axis=1) == y
    ok_b = ensemble_predictions(B).argmax(axis=1) == y
    nb = int(np.sum(ok_a & ~ok_b))
    nc = int(np.sum(~ok_a & ok_b))
    p_mc = float(binomtest(nb, nb + nc, 0.5, alternative="two-sided").pvalue) if nb + nc else 1.0

    def f1(P: np.ndarray) -> float:
        return float(np.mean([f1_score(y, P[s].argmax(axis=1), average="macro", zero_division=0)
                              for s in range(P.shape[0])]))

    W = _resample_weights(len(y), n_boot, seed)
    only = ("f1_macro",)
    fa = np.mean([_bootstrap_metrics(y, A[s], spec, W, only)["f1_macro"] for s in range(A.shape[0])], axis=0)
    fb = np.mean([_bootstrap_metrics(y, B[s], spec, W, only)["f1_macro"] for s in range(B.shape[0])], axis=0)
    diff = fb - fa
    # Equal F1s computed in a different summation order can differ by ~1e-16; count them as
    # ties so identical predictions give p = 1 rather than an arbitrary side.
    diff[np.abs(diff) <= _TIE_TOL] = 0.0
    delta = f1(B) - f1(A)
    if abs(delta) <= _TIE_TOL:
        delta = 0.0
    p_boot = float(min(1.0, 2.0 * min(np.mean(diff <= 0), np.mean(diff >= 0))))
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return {
        "p_mcnemar_top1": p_mc,
        "mcnemar_b": nb,
        "mcnemar_c": nc,
        "p_bootstrap_f1_macro": p_boot,
        "delta_f1_macro": float(delta),
        "delta_f1_macro_lo": float(lo),
        "delta_f1_macro_hi": float(hi),
    }


# --------------------------------------------------------------------------- table


def metrics_table(results: dict[str, dict], tests: dict) -> pd.DataFrame:
    """The ``metrics.csv`` table: one row per mode, ``no-ttr`` then ``ttr``.

    ``results`` maps mode -> :func:`evaluate_mode` output (both modes required); ``tests`` is
    :func:`paired_tests`' output (may be empty).  Columns: ``mode``; for each metric ``m``
    present (METRICS, then ``qwk``, ``manufacturer_top1``): ``m, m_lo, m_hi, m_std``;
    ``auc_classes``; ``p_mcnemar_top1``, ``p_bootstrap_f1_macro`` (on the ttr row, NaN on no-ttr).
    """
    missing = [m for m in MODES if m not in results]
    if missing:
        raise ValueError(f"metrics_table needs results for modes {MODES}; missing {missing}")
    names = [m for m in (*METRICS, "qwk", "manufacturer_top1") if m in results[MODES[0]]]
    rows = []
    for mode in MODES:
        r = results[mode]
        row: dict = {"mode": mode}
        for m in names:
            for suffix in ("", "_lo", "_hi", "_std"):
                row[f"{m}{suffix}"] = float(r.get(f"{m}{suffix}", math.nan))
        row["auc_classes"] = int(r["auc_classes"])
        for key in ("p_mcnemar_top1", "p_bootstrap_f1_macro"):
            row[key] = float(tests.get(key, math.nan)) if mode == "ttr" else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=list(rows[0]))
