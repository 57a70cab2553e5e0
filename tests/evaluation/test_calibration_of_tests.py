"""Calibration and power of the primary tests (docs/statistics.md, "Measured calibration").

Under the null the two modes are **exchangeable**: each simulated test set is drawn so that every
image's pair of predictions is as likely in one order as in the other (the modes swapped on a
random half of the images).  The share of p < 0.05 of the primary test must then be at most 0.075
in every scenario, including the regime real runs live in (4-6 discordant images out of 30-200;
an exact test is conservative there, shares near 0 are right), and within [0.025, 0.075] where
there are at least 20 discordant pairs.  Under a true top-1 difference of 0.12 at N = 200 with
25% discordant images the power must be at least 0.8.

Each scenario calls the project's own code: exact McNemar on the discordant counts
(:func:`common.evaluation.stats.mcnemar_p` of :func:`~common.evaluation.stats.discordant`), the
paired permutation test of the other metrics (:func:`common.evaluation.compare.permutation_ps`),
and for probes refitted per mode the whole rule of the verdict (:func:`common.evaluation.compare.decide`
on :func:`~common.evaluation.compare.evaluate_modes` with refits from
:func:`common.evaluation.refits.refit_probabilities`).  Everything is seeded, so the shares are
fixed numbers; the Monte Carlo standard error of each is given beside its simulation count.
"""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np
import pytest

try:  # installed with scikit-learn; only used to keep BLAS to one thread here
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    def threadpool_limits(limits: int):
        return contextlib.nullcontext()

from common.evaluation.compare import BETTER, WORSE, decide, evaluate_modes, permutation_ps
from common.evaluation.metrics import MetricSpec
from common.evaluation.probe import ProbeConfig, fit_probes
from common.evaluation.refits import refit_probabilities
from common.evaluation.stats import discordant, mcnemar_p

log = logging.getLogger(__name__)

C = 5
ALPHA = 0.05
LIMIT = 0.075


def mc_se(share: float, sims: int) -> float:
    """Monte Carlo standard error of a share estimated from ``sims`` simulations."""
    return math.sqrt(max(share, 0.05) * (1 - max(share, 0.05)) / sims)


def paired_predictions(rng: np.random.Generator, n: int, *, pairs: int | None = None, rate: float = 0.0,
                       delta: float = 0.0, accuracy: float = 0.7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y, baseline predictions, mode predictions)`` ``[N]`` of one test set: ``pairs`` discordant
    images (or each image discordant with probability ``rate``), each right for the mode with
    probability ``(1 + delta / rate) / 2`` and for the baseline otherwise; the concordant images
    are right for both with probability ``accuracy``, else the same wrong class for both.  Wrong
    classes are drawn at random, so label-based metrics other than top-1 differ too."""
    y = rng.integers(0, C, n)
    wrong = (y + rng.integers(1, C, n)) % C
    both_right = rng.random(n) < accuracy
    base = np.where(both_right, y, wrong)
    mode = base.copy()
    if pairs is not None:
        chosen = rng.choice(n, size=pairs, replace=False)
        share = 0.5
    else:
        chosen = np.flatnonzero(rng.random(n) < rate)
        share = (1 + delta / rate) / 2 if rate > 0 else 0.5
    mode_right = rng.random(len(chosen)) < share
    other_wrong = (y[chosen] + rng.integers(1, C, len(chosen))) % C
    mode[chosen] = np.where(mode_right, y[chosen], other_wrong)
    base[chosen] = np.where(mode_right, other_wrong, y[chosen])
    return y, base, mode


def as_proba(predictions: np.ndarray) -> np.ndarray:
    """One probability matrix ``[N, C]`` with the prediction on top."""
    return np.eye(C)[predictions] * 0.6 + 0.4 / C


def mcnemar_share(sims: int, seed: int, **draw) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(sims):
        y, base, mode = paired_predictions(rng, **draw)
        hits += mcnemar_p(*discordant(base == y, mode == y)) < ALPHA
    return hits / sims


def permutation_shares(sims: int, seed: int, names: list[str], n_perm: int = 200, **draw) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    spec = MetricSpec(C, qwk=True)
    hits = dict.fromkeys(names, 0)
    with threadpool_limits(limits=1):
        for k in range(sims):
            y, base, mode = paired_predictions(rng, **draw)
            p = permutation_ps(y, as_proba(mode), as_proba(base), spec, names, n_perm, seed=k)
            for m in names:
                hits[m] += p[m] < ALPHA
    return {m: h / sims for m, h in hits.items()}


FEW = [(n, pairs) for n in (30, 100, 200) for pairs in (4, 5, 6)]
FEW_SIMS = 2000          # MC SE at a share of 0.05: 0.0049
PERM_SIMS = 300          # MC SE at 0.05: 0.013 (the permutation test, 200 permutations each)


@pytest.mark.parametrize("n, pairs", FEW)
def test_exact_mcnemar_with_few_discordant_pairs_is_never_liberal(n, pairs):
    share = mcnemar_share(FEW_SIMS, seed=100 * n + pairs, n=n, pairs=pairs)
    log.info("null, N=%d, %d discordant: share of exact McNemar p < 0.05 = %.4f (MC SE %.4f)", n, pairs, share,
             mc_se(share, FEW_SIMS))
    # 4:0 gives p = 0.125, 5:0 0.0625 and 6:0 0.03125: only 6 discordant pairs all one way can reject,
    # with probability 2/64 = 0.031
    assert share <= LIMIT
    if pairs < 6:
        assert share == 0.0


@pytest.mark.parametrize("n", [30, 100, 200])
def test_permutation_test_with_few_discordant_pairs_is_not_liberal(n):
    """The primary test of APTOS (quadratic weighted kappa) where 4-6 predictions changed."""
    rng_pairs = {30: 4, 100: 5, 200: 6}[n]
    shares = permutation_shares(PERM_SIMS, seed=n, names=["qwk", "f1_macro"], n=n, pairs=rng_pairs)
    log.info("null, N=%d, %d discordant: permutation shares %s (MC SE <= %.3f)", n, rng_pairs, shares,
             mc_se(0.05, PERM_SIMS))
    for m, share in shares.items():
        assert share <= LIMIT, (m, share)


@pytest.mark.parametrize("pairs", [20, 30, 40])
def test_exact_mcnemar_with_at_least_20_discordant_pairs_is_calibrated(pairs):
    sims = 4000                                                  # MC SE at 0.04: 0.0031
    share = mcnemar_share(sims, seed=pairs, n=200, pairs=pairs)
    # the exact size, summed by hand: 2 P(X <= k) for the largest k that keeps it below 0.05
    size = max(2 * sum(math.comb(pairs, i) for i in range(k + 1)) / 2 ** pairs for k in range(pairs // 2)
               if 2 * sum(math.comb(pairs, i) for i in range(k + 1)) / 2 ** pairs < ALPHA)
    log.info("null, N=200, %d discordant: exact McNemar %.4f (exact size %.4f, MC SE %.4f)", pairs, share, size,
             mc_se(share, sims))
    assert 0.025 <= share <= LIMIT
    assert abs(share - size) <= 3 * mc_se(size, sims)


def test_permutation_test_with_about_30_discordant_pairs_is_calibrated():
    """N = 200 with each image discordant with probability 0.15 (about 30 discordant pairs); exact
    McNemar beside it, whose size oscillates with the count (0.02-0.043): about 0.03 on average."""
    share = mcnemar_share(10000, seed=11, n=200, rate=0.15)      # MC SE 0.0017
    shares = permutation_shares(1000, seed=12, names=["qwk", "f1_macro", "auc_macro", "balanced_accuracy"],
                                n=200, rate=0.15)                # MC SE 0.0069
    log.info("null, N=200, ~30 discordant: exact McNemar %.4f, permutation %s", share, shares)
    assert share <= LIMIT
    for m, value in shares.items():
        assert 0.025 <= value <= LIMIT, (m, value)


def test_power_under_a_true_top1_difference():
    """A true top-1 difference of 0.12 at N = 200 with 25% discordant images."""
    sims = 1000                                                  # MC SE at 0.9: 0.0095
    power = mcnemar_share(sims, seed=13, n=200, rate=0.25, delta=0.12)
    log.info("power at +0.12, N=200, 25%% discordant: %.3f", power)
    assert power >= 0.8
    # and it is the difference that is detected: the same draw with delta = 0 rejects rarely
    assert mcnemar_share(sims, seed=14, n=200, rate=0.25) <= LIMIT


# --------------------------------------------------------------------------- refitted probes

REFIT_SIMS = 300         # MC SE at a share of 0.05: 0.0126
REFITS = 8
PROBE = ProbeConfig(lr_grid=(0.05,), weight_decay_grid=(1e-4,), max_epochs=150, patience=10, seeds=(0,))


def feature_pair(rng: np.random.Generator, n: int, means: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and two equally good feature sets ``[n, D]``: the same class means, independent noise."""
    y = rng.integers(0, C, n)
    return y, {mode: (means[y] + rng.normal(size=(n, means.shape[1]))).astype(np.float32)
               for mode in ("no-ttr", "ttr")}


@pytest.mark.slow
def test_probes_refitted_per_mode_on_100_training_images():
    """Each mode's probe trained on 100 images of equally good features: the fitted probes differ
    for real, so the conditional test alone rejects too often (measured below); the verdict rule
    (conditional test and a combined interval over probe refits that excludes 0) must not."""
    rng = np.random.default_rng(2024)
    means = rng.normal(size=(C, 16)) * 0.6
    verdicts, conditional = 0, 0
    with threadpool_limits(limits=1):
        for k in range(REFIT_SIMS):
            y_train, train = feature_pair(rng, 100, means)
            y_val, val = feature_pair(rng, 40, means)
            y_test, test = feature_pair(rng, 200, means)
            probabilities = {mode: fit_probes(train[mode], y_train, val[mode], y_val, test[mode], C, PROBE)[0]
                             for mode in train}
            refits = refit_probabilities({mode: (train[mode], val[mode], test[mode]) for mode in train}, y_train,
                                         y_val, C, PROBE, REFITS, seed=k)
            row = evaluate_modes(y_test, probabilities, MetricSpec(C), n_boot=100, n_perm=50, seed=k,
                                 refits=refits).set_index("mode").loc["ttr"]
            conditional += row["p_top1"] < ALPHA
            verdicts += decide(row, "top1") in (BETTER, WORSE)
    share, share_conditional = verdicts / REFIT_SIMS, conditional / REFIT_SIMS
    log.info("null, refitted probes on 100 images: verdict %.3f, conditional test alone %.3f (MC SE %.3f)",
             share, share_conditional, mc_se(share, REFIT_SIMS))
    # measured with these seeds: verdict 0.040, the conditional test alone 0.090 (the 8-13%)
    assert share <= LIMIT
