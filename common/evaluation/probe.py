"""The linear probe trained on frozen features, the same procedure for every mode (docs/run.md).

One linear layer on standardised features (mean and std from the training split only,
:mod:`common.evaluation.probe_inputs`), cross-entropy (optionally with 'balanced' class
weights), ``torch.optim.AdamW`` with ``CosineAnnealingLR`` over ``max_epochs``,
``clip_grad_norm_``, mini-batches shuffled by a :class:`torch.Generator` seeded from ``seed``,
and early stopping on the validation loss with the best epoch's weights restored.  Learning
rate and weight decay are chosen on the validation split from a small grid; :func:`fit_probes`
does that for every probe seed and returns the test probabilities per seed.

The grid of one seed trains side by side (:func:`_fit_grid`): every member (lr, weight decay)
is its own ``nn.Linear``-shaped weight and bias, in its own AdamW parameter groups, and every
mini-batch is one matrix product for all active members (their weights concatenated), one
``backward()`` and one optimizer step.  The members start from the same initial weights and
see the same mini-batches (one generator per seed), so each is the probe trained alone with
its (lr, weight decay, seed), up to float32 round-off.  What this costs: on large problems
the matrix products dominate and the stock parts cost little (``benchmarks/probe.py``: 1.2-1.3x
the hand-written gradient and AdamW step this replaced, 5,000 x 1,024 features, 45 classes);
on tiny ones (the demo's 140 x 64) each step is bookkeeping - a ``clip_grad_norm_`` call and two
parameter groups per member - and costs about 3x.

Convergence: a probe *converged* when early stopping fired, i.e. its validation loss went
``patience`` consecutive epochs without improving on its best by more than ``min_delta``
(relative, 1e-4 by default as in torch's ReduceLROnPlateau), at or before ``max_epochs``
(equivalently ``epochs_run - best_epoch >= patience`` with every validation loss finite).  A
probe that was still improving (best epoch within the last ``patience`` epochs) when the
epoch budget ran out, or whose validation loss became NaN/inf, did not converge; docs/run.md
asks for that to be reported, and :func:`fit_probes` logs one warning per call.

Threads: everything runs in float32 on the CPU with torch on **one** intra-op thread
(:func:`_probe_threads`; the caller's setting is restored afterwards, also on errors), and the
seeds train side by side in worker threads (:func:`_worker_count`) that never wait for each
other.  Randomness comes only from generators seeded by ``seed`` (never the global torch or
numpy state), and each seed's grid is computed start to end by one thread in a fixed order,
so the same seed and data give bit-identical probabilities on the same machine whatever the
load or the number of workers.

Refits: :func:`check_inputs` once, then :func:`fit_checked` per set of training rows (e.g. a
bootstrap resample) reruns the whole procedure (standardisation, grid, early stopping, seeds)
without checking the inputs again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from common.errors import UserError
from common.evaluation.probe_inputs import (ProbeConfig, ProbeInputs, Standardised, check_features, check_inputs,
                                           standardise)

__all__ = ["ProbeConfig", "FittedProbe", "ProbeInputs", "check_inputs", "fit_checked", "fit_probe", "fit_probes"]

logger = logging.getLogger(__name__)

# torch intra-op threads while a probe trains.  See the module docstring and _probe_threads.
PROBE_THREADS = 1

# At most this many seeds are trained at once, each in its own single-threaded worker thread
# (``None``: one per seed, up to twice the usable cores).  The results do not depend on it,
# only the wall time does.
PROBE_WORKERS: int | None = None

# torch.optim.AdamW's defaults, stated so that a change of torch's defaults cannot change the probe.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class FittedProbe:
    """One trained probe: ``weight [C, D]`` and ``bias [C]`` (its best epoch's) on features
    standardised with ``mean``/``std`` float32 ``[D]``; ``chosen`` as :func:`fit_probe` returns it."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: np.ndarray
    std: np.ndarray
    chosen: dict

    def predict_proba(self, X, *, split: str = "input") -> np.ndarray:
        """Class probabilities (softmax) for ``X [N, D]`` -> float32 ``[N, C]``.

        ``split`` only names the data in error messages (e.g. ``"test"``).
        """
        X = check_features(X, split, int(self.weight.shape[1]))
        with torch.no_grad(), _probe_threads():
            logits = nn.functional.linear(torch.from_numpy((X - self.mean) / self.std), self.weight, self.bias)
            return torch.softmax(logits, dim=1).numpy()


@contextlib.contextmanager
def _probe_threads():
    """Run torch on :data:`PROBE_THREADS` intra-op threads; restore the previous setting on exit.

    Why one thread: the probe's matrices are small (a mini-batch of 256 rows), and on a busy
    machine intra-op threads wait for each other at every operation: the probe on torch's 2
    threads once took 1,417 s instead of 12.8 s for one mode beside 8 busy processes on 2
    cores (369 s of CPU, most of it spent waiting).  One thread cannot wait for another, and
    it keeps the results independent of the thread count; the cores are used by running the
    seeds in parallel instead (:func:`_fit_seeds`).
    """
    previous = torch.get_num_threads()
    if previous == PROBE_THREADS:
        yield
        return
    torch.set_num_threads(PROBE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- one seed's grid


@dataclass
class _GridFit:
    """One seed's grid after training (``G`` members, member ``g`` is ``grid[g]``).

    ``weight [G, C, D]``, ``bias [G, C]``: each member's restored best-epoch parameters (the
    initial ones if no epoch had a finite validation loss).  Per member: ``best_epoch``
    (1-based, 0 if none), ``best_val_loss``, ``epochs_run``, ``converged`` and ``val_losses``
    (one per epoch run).
    """

    seed: int
    grid: list[tuple[float, float]]
    weight: torch.Tensor
    bias: torch.Tensor
    best_epoch: list[int]
    best_val_loss: list[float]
    epochs_run: list[int]
    converged: list[bool]
    val_losses: list[list[float]]


class _Cancelled(Exception):
    """A worker's fit was ended early because another seed failed or the run was interrupted."""


def _initial_parameters(gen: torch.Generator, D: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear``'s default initialisation, ``U(-1/sqrt(D), 1/sqrt(D))``, drawn from ``gen``.

    Returns weight ``[C, D]`` and bias ``[C]``.  Drawn from our own generator (never the global
    RNG); the weight first, then the bias, so every member of a seed starts from the same point.
    """
    bound = 1.0 / math.sqrt(D)
    weight = torch.rand((C, D), generator=gen, dtype=torch.float32) * (2 * bound) - bound
    bias = torch.rand((C,), generator=gen, dtype=torch.float32) * (2 * bound) - bound
    return weight, bias


def _member_losses(logits: torch.Tensor, y: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
    """Each member's mean cross-entropy ``[A]`` from ``logits [B, A, C]`` and labels ``y [B]``.

    Member ``a``'s entry is ``nn.functional.cross_entropy(logits[:, a], y, weight=class_weight)``
    (with class weights: the weighted sum divided by the rows' summed weights).
    """
    # cross_entropy's K-dimensional form: classes on dim 1, one loss per (row, member).
    nll = nn.functional.cross_entropy(logits.permute(0, 2, 1), y.unsqueeze(1).expand(-1, logits.shape[1]),
                                      weight=class_weight, reduction="none")  # [B, A]
    if class_weight is None:
        return nll.mean(dim=0)
    return nll.sum(dim=0) / class_weight[y].sum()


def _fit_grid(
    data: Standardised, grid: list[tuple[float, float]], config: ProbeConfig, seed: int,
    cancel: threading.Event | None = None,
) -> _GridFit:
    """Train every ``(lr, weight decay)`` of ``grid`` for one ``seed``, side by side.

    Member ``g`` has its own weight ``[C, D]`` and bias ``[C]`` (both start from the seed's
    ``nn.Linear`` initialisation), in two AdamW parameter groups with the member's learning
    rate (decoupled weight decay on the weight only); one ``CosineAnnealingLR`` anneals every
    group.  Per mini-batch (shared by the members: one shuffling generator per seed), the
    active members' weights are concatenated into one ``[A*C, D]`` layer, so the forward and
    the backward are one matrix product each for all of them; the loss is the sum of the
    members' mean cross-entropies, so each member's gradient is its own.  Each member's
    gradient (weight and bias together) is clipped to its own norm by ``clip_grad_norm_``.
    After each epoch every active member is scored on the validation split; one that stops
    (early stopping, or a NaN/inf validation loss) leaves the concatenation, gets no more
    gradients, and AdamW no longer updates it.  The loop ends when no member is active or at
    ``max_epochs``.  Caller holds :func:`_probe_threads`.  ``cancel``, when set, ends the fit
    at the next epoch (with :class:`_Cancelled`): the other seeds' workers stop soon after one
    fails or on Ctrl-C.
    """
    cfg = config
    Xt, yt, Xv, yv = data.Xt, data.yt, data.Xv, data.yv
    N, D = Xt.shape
    C, G = data.n_classes, len(grid)
    class_weight = torch.from_numpy(data.class_weight) if data.class_weight is not None else None

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    w0, b0 = _initial_parameters(gen, D, C)
    weights = [nn.Parameter(w0.clone()) for _ in grid]
    biases = [nn.Parameter(b0.clone()) for _ in grid]
    groups = []
    for (lr, wd), weight, bias in zip(grid, weights, biases):
        groups += [{"params": [weight], "lr": lr, "weight_decay": wd}, {"params": [bias], "lr": lr, "weight_decay": 0.0}]
    # fused: one kernel per parameter group (the fewest operations per step; same update as foreach).
    optimizer = torch.optim.AdamW(groups, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs)

    best_weight, best_bias = [w0] * G, [b0] * G
    best_loss = [math.inf] * G
    best_epoch = [0] * G
    since_best = [0] * G
    converged = [False] * G
    val_losses: list[list[float]] = [[] for _ in grid]
    active = list(range(G))  # member ids still training, in grid order
    for epoch in range(1, cfg.max_epochs + 1):
        if not active:
            break
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        A = len(active)
        perm = torch.randperm(N, generator=gen)
        for start in range(0, N, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            logits = nn.functional.linear(Xt.index_select(0, idx), torch.cat([weights[g] for g in active]),
                                          torch.cat([biases[g] for g in active]))  # [B, A*C]
            loss = _member_losses(logits.view(-1, A, C), yt.index_select(0, idx), class_weight).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                for g in active:  # foreach=False: cheaper for two small tensors
                    nn.utils.clip_grad_norm_((weights[g], biases[g]), cfg.grad_clip, foreach=False)
            optimizer.step()
        scheduler.step()

        with torch.no_grad():
            logits = nn.functional.linear(Xv, torch.cat([weights[g] for g in active]),
                                          torch.cat([biases[g] for g in active]))
            losses = _member_losses(logits.view(-1, A, C), yv, class_weight).tolist()
        still_active = []
        for g, val_loss in zip(active, losses):
            val_losses[g].append(val_loss)
            if not math.isfinite(val_loss):
                logger.debug("probe (lr=%g, wd=%g, seed=%d): val loss is %s at epoch %d; stopping",
                             *grid[g], seed, val_loss, epoch)
                continue
            if cfg.improves(val_loss, best_loss[g]):
                best_loss[g], best_epoch[g], since_best[g] = val_loss, epoch, 0
                best_weight[g], best_bias[g] = weights[g].detach().clone(), biases[g].detach().clone()
            else:
                since_best[g] += 1
                if since_best[g] >= cfg.patience:
                    converged[g] = True
                    continue
            still_active.append(g)
        active = still_active

    return _GridFit(seed=seed, grid=list(grid), weight=torch.stack(best_weight), bias=torch.stack(best_bias),
                    best_epoch=best_epoch, best_val_loss=best_loss, epochs_run=[len(v) for v in val_losses],
                    converged=converged, val_losses=val_losses)


# --------------------------------------------------------------------------- seeds side by side


def _usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _worker_count(n_seeds: int) -> int:
    """How many seeds train at once: :data:`PROBE_WORKERS`, else one per seed up to 2 x cores.

    Why more workers than cores: the workers never wait for each other, so the OS can share
    the cores between them at no cost, and 3 seeds on 2 cores then finish together instead
    of the third running alone at the end (``benchmarks/probe.py``'s problem on 2 cores, 3
    seeds: 7.6 s with 3 workers, 8.6 s with 2, 11.8 s with 1).  Twice the cores bounds the
    threads when there are many seeds.
    """
    workers = PROBE_WORKERS if PROBE_WORKERS is not None else 2 * _usable_cores()
    return max(1, min(int(workers), n_seeds))


def _fit_seeds(data: Standardised, config: ProbeConfig, seeds: tuple[int, ...], progress: bool) -> list[_GridFit]:
    """:func:`_fit_grid` for every seed -> one :class:`_GridFit` per seed, in ``seeds`` order.

    The seeds run in :func:`_worker_count` worker threads, each on one torch thread (worker
    threads start inside :func:`_probe_threads` and inherit its setting; torch releases the
    GIL in its kernels, so they do run side by side).  Each seed is one unit computed start to
    end by one thread, so the results do not depend on the number of workers or on which
    finishes first.
    """
    grid = config.grid()
    workers = _worker_count(len(seeds))
    bar = tqdm(total=len(seeds), desc="probe seeds", disable=not progress, leave=False)
    try:
        with _probe_threads():
            if workers == 1:
                fits = []
                for seed in seeds:
                    fits.append(_fit_grid(data, grid, config, seed))
                    bar.update()
                return fits
            cancel = threading.Event()
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe") as pool:
                futures = [pool.submit(_fit_grid, data, grid, config, seed, cancel) for seed in seeds]
                try:
                    for future in as_completed(futures):
                        future.result()  # the first failure surfaces here at once
                        bar.update()
                except BaseException:
                    # A failed seed or Ctrl-C: stop the other workers at their next epoch
                    # instead of waiting for them to finish.
                    cancel.set()
                    for future in futures:
                        future.cancel()
                    raise
            return [future.result() for future in futures]
    finally:
        bar.close()


# --------------------------------------------------------------------------- selection


def _select(fit: _GridFit, config: ProbeConfig) -> int:
    """Index of the member with the lowest restored validation loss (first in grid order on ties).

    Raises :class:`UserError` when every member diverged (no finite validation loss).
    """
    best = min(range(len(fit.grid)), key=lambda g: (fit.best_val_loss[g], g))
    if not math.isfinite(fit.best_val_loss[best]):
        raise UserError(
            f"the probe diverged for every lr in {config.lr_grid} (seed {fit.seed}); "
            "use smaller learning rates, e.g. --set probe_lr_grid=1e-4,3e-4"
        )
    return best


def _chosen(fit: _GridFit, g: int) -> dict:
    lr, weight_decay = fit.grid[g]
    return {
        "seed": fit.seed,
        "lr": lr,
        "weight_decay": weight_decay,
        "val_loss": fit.best_val_loss[g],
        "best_epoch": fit.best_epoch[g],
        "epochs_run": fit.epochs_run[g],
        "converged": fit.converged[g],
    }


def _warn_not_converged(chosen: list[dict], config: ProbeConfig) -> None:
    """One warning for the seeds whose chosen probe did not converge (docs/run.md)."""
    bad = [c for c in chosen if not c["converged"]]
    if not bad:
        return
    detail = ", ".join(
        f"seed {c['seed']} (lr={c['lr']:g}, wd={c['weight_decay']:g}): best epoch {c['best_epoch']} "
        f"of {c['epochs_run']} run"
        for c in bad
    )
    logger.warning(
        "probe did not converge for %d of %d seeds: the validation loss was still improving "
        "within the last patience=%d epochs when max_epochs=%d ran out (or became NaN/inf): %s; "
        "raise probe_max_epochs or the learning rates",
        len(bad), len(chosen), config.patience, config.max_epochs, detail,
    )


def fit_probe(
    X_train, y_train, X_val, y_val, n_classes: int, config: ProbeConfig, seed: int
) -> tuple[FittedProbe, dict]:
    """Grid-search lr x weight decay on the validation split for one seed.

    The whole grid is trained on ``X_train [N, D]``/``y_train [N]`` (:func:`_fit_grid`); the
    pair whose restored best epoch has the lowest validation loss on ``X_val [Nv, D]``/``y_val
    [Nv]`` wins (ties go to the first pair in grid order, lr outer, weight decay inner).
    Returns the winning probe (no refit: it is the member trained with that pair) and
    ``{"seed", "lr", "weight_decay", "val_loss", "best_epoch", "epochs_run", "converged"}``
    (``converged`` as defined in the module docstring; a warning is logged when it is false).
    """
    data = standardise(check_inputs(X_train, y_train, X_val, y_val, None, n_classes), config.class_weights)
    (fit,) = _fit_seeds(data, config, (int(seed),), progress=False)
    g = _select(fit, config)
    chosen = _chosen(fit, g)
    _warn_not_converged([chosen], config)
    return FittedProbe(fit.weight[g], fit.bias[g], data.mean, data.std, chosen), chosen


def fit_checked(
    inputs: ProbeInputs, config: ProbeConfig, *, train_rows: np.ndarray | None = None, progress: bool = False
) -> tuple[np.ndarray, list[dict]]:
    """:func:`fit_probes` on inputs already checked by :func:`check_inputs` (with ``X_test``).

    ``train_rows [M]`` (default: all) picks the training rows, repeats allowed: the whole
    procedure (standardisation, grid, early stopping, every seed) runs on them alone, so
    refits on resamples of the training set check the inputs only once.
    """
    if inputs.X_test is None:
        raise ValueError("fit_checked needs inputs checked with X_test")
    data = standardise(inputs, config.class_weights, train_rows)
    probas: list[np.ndarray] = []
    chosen: list[dict] = []
    for fit in _fit_seeds(data, config, config.seeds, progress):
        g = _select(fit, config)
        params = _chosen(fit, g)
        probas.append(FittedProbe(fit.weight[g], fit.bias[g], data.mean, data.std, params).predict_proba(
            inputs.X_test, split="test"))
        chosen.append(params)
        logger.info("probe seed %d: lr=%g weight_decay=%g best epoch %d of %d, val loss %.4f",
                    params["seed"], params["lr"], params["weight_decay"], params["best_epoch"],
                    params["epochs_run"], params["val_loss"])
    _warn_not_converged(chosen, config)
    return np.stack(probas), chosen


def fit_probes(
    X_train, y_train, X_val, y_val, X_test, n_classes: int, config: ProbeConfig, *, progress: bool = False
) -> tuple[np.ndarray, list[dict]]:
    """One grid-searched probe per seed in ``config.seeds``.

    Inputs: ``X_train [N, D]``, ``y_train [N]``, ``X_val [Nv, D]``, ``y_val [Nv]``,
    ``X_test [Nt, D]``.  Returns the test probabilities float32 ``[S, Nt, C]`` (seed order as
    in ``config.seeds``) and per seed the chosen hyper-parameters ``{"seed", "lr",
    "weight_decay", "val_loss", "best_epoch", "epochs_run", "converged"}`` (see
    :func:`fit_probe`).  Logs one warning if any seed's chosen probe did not converge.
    ``progress`` shows a tqdm bar over the seeds.
    """
    inputs = check_inputs(X_train, y_train, X_val, y_val, X_test, n_classes)
    return fit_checked(inputs, config, progress=progress)
