"""Probe refits: the whole probe procedure rerun on bootstrap resamples of the training set
(docs/statistics.md, "What each interval covers").

The intervals of :mod:`common.evaluation.compare` are conditional on the fitted probes.  Whether
the *features* of two modes differ also depends on probe training, so the procedure of
:func:`common.evaluation.probe.fit_probes` (grid, early stopping, every probe seed) is run again
``R`` times per mode, each time on a bootstrap resample of the training rows; refit ``r`` uses the
same resample and the same seeds for every mode, so the modes stay paired.  The validation and
test splits are unchanged.  Each refit's prediction is its seed ensemble, as in the main fit.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
from tqdm.auto import tqdm

from common.evaluation.probe import ProbeConfig, fit_probes

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet(name: str):
    """The probe's per-seed info lines and per-call warnings, R times over, would drown the run's
    log: silenced while the refits train (restored afterwards); one summary line replaces them."""
    probe_log = logging.getLogger(name)
    level = probe_log.level
    probe_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        probe_log.setLevel(level)


def training_resamples(n_train: int, refits: int, seed: int) -> np.ndarray:
    """The training rows of each refit, ``[R, N]`` indices drawn with replacement from
    ``numpy.random.default_rng([seed, 2])`` (a stream apart from the test-set bootstrap's)."""
    return np.random.default_rng([seed, 2]).integers(0, n_train, size=(refits, n_train))


def refit_probabilities(
    features: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    y_train: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    config: ProbeConfig,
    refits: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Test probabilities of each refit's seed ensemble, mode -> ``[R, Nt, C]``.

    ``features``: mode -> ``(X_train [N, D], X_val [Nv, D], X_test [Nt, D])``; ``y_train [N]``,
    ``y_val [Nv]`` class indices.  Refit ``r`` trains every mode on the rows
    ``training_resamples(N, R, seed)[r]`` with ``config`` (all its seeds and its grid)."""
    y_train = np.asarray(y_train)
    draws = training_resamples(len(y_train), refits, seed)
    out: dict[str, list[np.ndarray]] = {mode: [] for mode in features}
    stalled = 0
    with _quiet(fit_probes.__module__):
        for rows in tqdm(draws, desc="probe refits", unit="refit", disable=refits == 0):
            for mode, (X_train, X_val, X_test) in features.items():
                proba, chosen = fit_probes(np.asarray(X_train)[rows], y_train[rows], X_val, y_val, X_test,
                                           n_classes, config)
                out[mode].append(proba.astype(np.float64).mean(axis=0))
                stalled += sum(not c.get("converged", True) for c in chosen)
    if stalled:
        logger.warning("probe refits: %d of %d probes reached probe_max_epochs with the validation loss still "
                       "falling (not converged)", stalled, refits * len(features) * len(config.seeds))
    return {mode: np.stack(v) if v else np.zeros((0, 0, n_classes)) for mode, v in out.items()}
