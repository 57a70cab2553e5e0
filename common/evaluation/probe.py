"""The linear probe trained on frozen features, the same procedure for every mode (docs/run.md).

One linear layer on standardised features (mean and std from the training split only),
cross-entropy (optionally with 'balanced' class weights), AdamW, a cosine-annealed learning
rate over ``max_epochs``, gradient-norm clipping, mini-batches shuffled by a
:class:`torch.Generator` seeded from ``seed``, and early stopping on the validation loss with
the best epoch's weights restored.  Learning rate and weight decay are chosen on the
validation split from a small grid (:func:`fit_probe`); :func:`fit_probes` does that for every
probe seed and returns the test probabilities per seed.

Two implementations of the same procedure:

* :class:`LinearProbe` trains **one** probe (one lr, weight decay and seed) with stock torch
  parts (``nn.Linear``, autograd, ``torch.optim.AdamW``, ``clip_grad_norm_``,
  ``CosineAnnealingLR``).  It is the reference the batched path is tested against.
* :func:`fit_probe` / :func:`fit_probes` train the whole lr x weight-decay grid of a seed as
  **one batched model** (:func:`_fit_grid`): the members' weights are stacked and every
  mini-batch is one matrix product for all of them, with AdamW, the cosine schedule,
  gradient clipping and early stopping applied per member.  Each member equals the
  :class:`LinearProbe` with its (lr, weight decay, seed) up to float32 round-off.

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
other.  Measured with ``benchmarks/probe.py`` on 2 cores (5,000 x 1,024 train features, 45
classes, 3 seeds, the default grid; one mode): the previous code (one probe after another on
torch's 2 threads) took 12.8 s quiet and 1,417 s beside 8 busy processes, this one 4.8 s and
16.8 s.  Randomness comes only from generators seeded by ``seed`` (never the global torch or
numpy state), and each seed's grid is computed start to end by one thread in a fixed order,
so the same seed and data give bit-identical probabilities on the same machine whatever the
load or the number of workers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from common.errors import UserError

logger = logging.getLogger(__name__)

# Features whose training standard deviation is below this are (near-)constant: they are
# centred but divided by 1 instead of their std, as scikit-learn's StandardScaler does, so a
# feature that is constant on train cannot blow up on val/test.
STD_FLOOR = 1e-6

# torch intra-op threads while a probe trains (``None`` keeps the caller's setting; only the
# benchmark's "previous implementation" side uses that).  See the module docstring.
PROBE_THREADS: int | None = 1

# At most this many seeds are trained at once, each in its own single-threaded worker thread
# (``None``: one per seed, up to twice the usable cores).  The results do not depend on it,
# only the wall time does.
PROBE_WORKERS: int | None = None

# torch.optim.AdamW's defaults, which LinearProbe uses and the batched path reproduces.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# clip_grad_norm_ divides by (norm + this), as torch does.
CLIP_EPS = 1e-6


@dataclass
class ProbeConfig:
    """Hyper-parameters of the probe procedure (defaults mirror ``configs.RUN_DEFAULTS``).

    ``lr_grid`` x ``weight_decay_grid`` is searched on the validation split; ``class_weights``
    turns on 'balanced' class weights computed from the training labels; ``seeds`` are the
    probe seeds (one probe per seed).  ``grad_clip`` is the max gradient L2 norm (``None``
    disables clipping).
    """

    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    weight_decay_grid: tuple[float, ...] = (1e-4, 1e-2)
    max_epochs: int = 200
    patience: int = 15
    batch_size: int = 256
    grad_clip: float | None = 1.0
    class_weights: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    # An epoch counts as an improvement only when the validation loss falls below the best by
    # more than this fraction of it (torch's ReduceLROnPlateau default, relative mode): on nearly
    # separable data the loss creeps down forever and early stopping would never fire.
    min_delta: float = 1e-4

    def improves(self, loss: float, best: float) -> bool:
        """True when ``loss`` improves on ``best`` by more than ``min_delta`` (relative)."""
        return loss < best * (1.0 - self.min_delta) if math.isfinite(best) else loss < best

    def __post_init__(self) -> None:
        self.lr_grid = tuple(float(v) for v in self.lr_grid)
        self.weight_decay_grid = tuple(float(v) for v in self.weight_decay_grid)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.lr_grid or any(not (math.isfinite(v) and v > 0) for v in self.lr_grid):
            raise UserError(f"probe lr_grid {self.lr_grid} must be a non-empty list of positive numbers")
        if not self.weight_decay_grid or any(
            not (math.isfinite(v) and v >= 0) for v in self.weight_decay_grid
        ):
            raise UserError(
                f"probe weight_decay_grid {self.weight_decay_grid} must be a non-empty list of numbers >= 0"
            )
        for name in ("max_epochs", "patience", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"probe {name}={value!r} must be an integer >= 1")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise UserError(f"probe grad_clip={self.grad_clip!r} must be a positive number (or None to disable)")
        if not self.seeds:
            raise UserError("probe seeds is empty; give at least one seed, e.g. probe_seeds=(0, 1, 2)")
        if not (math.isfinite(self.min_delta) and 0 <= self.min_delta < 1):
            raise UserError(f"probe min_delta={self.min_delta!r} must be a number in [0, 1)")


# --------------------------------------------------------------------------- validation


def _check_features(X, split: str, n_features: int | None = None) -> np.ndarray:
    """Return ``X`` as a C-contiguous float32 array ``[N, D]``, or raise :class:`UserError`."""
    try:
        arr = np.asarray(X, dtype=np.float32)  # float64 values beyond float32 range become inf: caught below
    except (TypeError, ValueError) as exc:
        raise UserError(f"{split} features are not numeric ({exc}); pass a float array [N, D]") from None
    if arr.ndim != 2:
        raise UserError(f"{split} features have shape {arr.shape}; expected a 2-D array [N, D]")
    if arr.shape[0] == 0:
        raise UserError(f"{split} split is empty (0 rows); it needs at least one image")
    if arr.shape[1] == 0:
        raise UserError(f"{split} features have 0 columns; expected [N, D] with D >= 1")
    if n_features is not None and arr.shape[1] != n_features:
        raise UserError(
            f"{split} features have {arr.shape[1]} columns but the probe was fit on {n_features}; "
            "extract all splits with the same backbone and feature setting"
        )
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = int(bad.any(axis=1).sum())
        raise UserError(
            f"{split} features contain NaN or inf in {rows} of {arr.shape[0]} rows; "
            "re-extract the features (e.g. with --no_cache) and check the input images"
        )
    return np.ascontiguousarray(arr)


def _check_labels(y, split: str, n_rows: int, n_classes: int) -> np.ndarray:
    """Return ``y`` as int64 ``[N]`` with values in ``[0, n_classes)``, or raise :class:`UserError`."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise UserError(f"{split} labels have shape {arr.shape}; expected a 1-D integer array [N]")
    if arr.shape[0] != n_rows:
        raise UserError(
            f"{split} has {n_rows} feature rows but {arr.shape[0]} labels; they must match one to one"
        )
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise UserError(f"{split} labels have dtype {arr.dtype}; expected integer class indices")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise UserError(f"{split} labels are not whole numbers; expected integer class indices")
    arr = arr.astype(np.int64)
    if n_rows and (arr.min() < 0 or arr.max() >= n_classes):
        bad = arr[(arr < 0) | (arr >= n_classes)][0]
        raise UserError(
            f"{split} label {int(bad)} is outside [0, {n_classes}); labels must be class indices "
            f"0..{n_classes - 1} (n_classes={n_classes})"
        )
    return arr


def _check_n_classes(n_classes) -> int:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise UserError(f"n_classes={n_classes!r} must be an integer >= 2")
    return int(n_classes)


def _balanced_class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """'balanced' weights ``n_samples / (n_present_classes * count_c)`` from the training labels.

    Same formula as ``sklearn.utils.class_weight.compute_class_weight('balanced')`` over the
    classes present in train; a class absent from train gets weight 1.0 (it has no training
    samples, so the weight only matters for the validation loss). Returns float32 ``[C]``.
    """
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(n_classes, dtype=np.float64)
    weights[present] = len(y) / (present.sum() * counts[present])
    return weights.astype(np.float32)


@contextlib.contextmanager
def _probe_threads():
    """Run torch on :data:`PROBE_THREADS` intra-op threads; restore the previous setting on exit.

    Why one thread: the probe's matrices are small (a mini-batch of 256 rows), and on a busy
    machine intra-op threads wait for each other at every operation: the previous code, on
    torch's 2 threads, took 1,417 s instead of 12.8 s for one mode beside 8 busy processes on
    2 cores (369 s of CPU, most of it spent waiting).  One thread cannot wait for another, and
    it keeps the results independent of the thread count; the cores are used by running the
    seeds in parallel instead (:func:`_fit_seeds`).
    """
    previous = torch.get_num_threads()
    wanted = PROBE_THREADS
    if wanted is None or wanted == previous:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- shared pieces


@dataclass
class _Data:
    """Validated, standardised inputs shared by every member and seed.

    ``Xt [N, D]``, ``Xv [Nv, D]`` float32 standardised; ``yt [N]``, ``yv [Nv]`` int64;
    ``mean``/``std`` float32 ``[D]``; ``class_weight`` float32 ``[C]`` or ``None``.
    """

    Xt: torch.Tensor
    yt: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    mean: np.ndarray
    std: np.ndarray
    class_weight: np.ndarray | None
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.Xt.shape[1])


def _prepare(X_train, y_train, X_val, y_val, n_classes: int, config: ProbeConfig) -> _Data:
    """Validate the train/val inputs and standardise them with the train mean and std.

    Raises :class:`UserError` for bad inputs: not 2-D, empty, mismatched lengths, labels
    outside ``[0, n_classes)``, NaN/inf features (the message names the split), fewer than
    two classes in train.
    """
    C = n_classes
    Xtr = _check_features(X_train, "train")
    ytr = _check_labels(y_train, "train", Xtr.shape[0], C)
    Xva = _check_features(X_val, "val", Xtr.shape[1])
    yva = _check_labels(y_val, "val", Xva.shape[0], C)
    n_present = int(np.unique(ytr).size)
    if n_present < 2:
        raise UserError(
            f"train split has only {n_present} class (label {int(ytr[0])}); the probe needs "
            "at least 2 classes in train - check the dataset split and labels"
        )
    # Standardisation from train only, computed in float64 for accuracy.
    Xtr64 = Xtr.astype(np.float64)
    mean = Xtr64.mean(axis=0)
    std = Xtr64.std(axis=0)
    del Xtr64
    n_const = int((std < STD_FLOOR).sum())
    std[std < STD_FLOOR] = 1.0
    if n_const:
        logger.debug("%d of %d features are constant on train; left unscaled", n_const, Xtr.shape[1])
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    return _Data(
        Xt=_standardise(Xtr, mean32, std32),
        yt=torch.from_numpy(ytr),
        Xv=_standardise(Xva, mean32, std32),
        yv=torch.from_numpy(yva),
        mean=mean32,
        std=std32,
        class_weight=_balanced_class_weights(ytr, C) if config.class_weights else None,
        n_classes=C,
    )


def _standardise(X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """``(X - mean) / std`` as a float32 tensor ``[N, D]``."""
    return torch.from_numpy((X - mean) / std)


def _initial_parameters(gen: torch.Generator, D: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear``'s default initialisation, ``U(-1/sqrt(D), 1/sqrt(D))``, drawn from ``gen``.

    Returns weight ``[C, D]`` and bias ``[C]``.  Drawn from our own generator (never the global
    RNG); the weight first, then the bias, so every member of a seed starts from the same point.
    """
    bound = 1.0 / math.sqrt(D)
    weight = torch.rand((C, D), generator=gen, dtype=torch.float32) * (2 * bound) - bound
    bias = torch.rand((C,), generator=gen, dtype=torch.float32) * (2 * bound) - bound
    return weight, bias


def _cosine_factor(epoch: int, max_epochs: int) -> float:
    """Learning-rate multiplier of 1-based ``epoch`` under cosine annealing to 0 over ``max_epochs``.

    The closed form of ``CosineAnnealingLR(T_max=max_epochs, eta_min=0)`` stepped once per
    epoch (torch's recursive form agrees up to float64 round-off).
    """
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max_epochs))


# --------------------------------------------------------------------------- the reference probe


class LinearProbe:
    """A linear softmax classifier on standardised features, scikit-learn style: the reference.

    Trains one probe with stock torch parts; :func:`fit_probe` / :func:`fit_probes` train the
    whole grid at once with a batched model that reproduces this class member by member.

    Parameters
    ----------
    n_classes : number of output columns ``C`` (classes absent from train still get a column).
    lr, weight_decay : AdamW learning rate (start of the cosine schedule) and decoupled
        weight decay (applied to the weight matrix, not the bias).
    config : the shared :class:`ProbeConfig` (epochs, patience, batch size, clipping, class weights).
    seed : seeds the weight initialisation and the mini-batch shuffling.

    Attributes after :meth:`fit`
    ----------------------------
    mean_, std_ : float32 ``[D]`` standardisation from the training split (``std_`` is 1 where
        the training std is below ``STD_FLOOR``).
    best_epoch_ : 1-based epoch whose weights were restored (lowest validation loss; 0 if no
        epoch had a finite validation loss: the initial weights are kept).
    best_val_loss_ : validation loss of that epoch (the restored model's validation loss).
    history_ : ``[{"epoch", "train_loss", "val_loss", "lr"}]`` for every epoch run.
    n_epochs_run_ : epochs actually run (< ``max_epochs`` when early stopping fired).
    converged_ : early stopping fired (see the module docstring for the definition).
    class_weight_ : float32 ``[C]`` loss weights, or ``None``.
    """

    def __init__(self, n_classes: int, lr: float, weight_decay: float, config: ProbeConfig, seed: int):
        self.n_classes = _check_n_classes(n_classes)
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"probe lr={lr!r} must be a positive number")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise UserError(f"probe weight_decay={weight_decay!r} must be a number >= 0")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.config = config
        self.seed = int(seed)

    # ---------------------------------------------------------------- API

    def fit(self, X_train, y_train, X_val, y_val) -> "LinearProbe":
        """Train on ``X_train [N, D]``/``y_train [N]``, early-stopping on ``X_val [Nv, D]``/``y_val [Nv]``.

        Raises :class:`UserError` for bad inputs: not 2-D, empty, mismatched lengths, labels
        outside ``[0, n_classes)``, NaN/inf features (the message names the split), fewer than
        two classes in train.
        """
        data = _prepare(X_train, y_train, X_val, y_val, self.n_classes, self.config)
        with _probe_threads():
            return self._fit(data)

    def _fit(self, data: _Data) -> "LinearProbe":
        cfg = self.config
        C, D = self.n_classes, data.n_features
        Xt, yt, Xv, yv = data.Xt, data.yt, data.Xv, data.yv
        N = Xt.shape[0]
        self.mean_, self.std_ = data.mean, data.std
        self.class_weight_ = data.class_weight
        weight = torch.from_numpy(self.class_weight_) if self.class_weight_ is not None else None

        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed)
        # skip_init: no draw from the global RNG; the parameters come from our own generator.
        model = torch.nn.utils.skip_init(nn.Linear, D, C, dtype=torch.float32)
        w0, b0 = _initial_parameters(gen, D, C)
        with torch.no_grad():
            model.weight.copy_(w0)
            model.bias.copy_(b0)

        optimizer = torch.optim.AdamW(
            [
                {"params": [model.weight], "weight_decay": self.weight_decay},
                {"params": [model.bias], "weight_decay": 0.0},
            ],
            lr=self.lr,
            betas=ADAM_BETAS,
            eps=ADAM_EPS,
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs)

        best_loss = math.inf
        best_epoch = 0
        best_state = copy.deepcopy(model.state_dict())
        history: list[dict] = []
        since_best = 0
        converged = False
        bs = cfg.batch_size
        for epoch in range(1, cfg.max_epochs + 1):
            model.train()
            lr_now = optimizer.param_groups[0]["lr"]
            perm = torch.randperm(N, generator=gen)
            total = 0.0
            for start in range(0, N, bs):
                idx = perm[start : start + bs]
                loss = nn.functional.cross_entropy(model(Xt[idx]), yt[idx], weight=weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            scheduler.step()
            model.eval()
            with torch.no_grad():
                val_loss = float(nn.functional.cross_entropy(model(Xv), yv, weight=weight))
            history.append({"epoch": epoch, "train_loss": total / N, "val_loss": val_loss, "lr": lr_now})
            if not math.isfinite(val_loss):
                logger.debug("probe (lr=%g, wd=%g, seed=%d): val loss is %s at epoch %d; stopping",
                             self.lr, self.weight_decay, self.seed, val_loss, epoch)
                break
            if cfg.improves(val_loss, best_loss):
                best_loss, best_epoch, since_best = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
                if since_best >= cfg.patience:
                    converged = True
                    break

        model.load_state_dict(best_state)
        model.eval()
        self.model_ = model
        self.best_epoch_ = best_epoch
        self.best_val_loss_ = best_loss
        self.history_ = history
        self.n_epochs_run_ = len(history)
        self.converged_ = converged
        self.n_features_in_ = D
        logger.debug(
            "probe lr=%g wd=%g seed=%d: best epoch %d of %d run, val loss %.4f",
            self.lr, self.weight_decay, self.seed, best_epoch, len(history), best_loss,
        )
        return self

    def predict_proba(self, X, *, split: str = "input") -> np.ndarray:
        """Class probabilities (softmax) for ``X [N, D]`` -> float32 ``[N, C]``.

        ``split`` only names the data in error messages (e.g. ``"test"``).
        """
        if not hasattr(self, "model_"):
            raise RuntimeError("LinearProbe.predict_proba called before fit")
        Xs = _standardise(_check_features(X, split, self.n_features_in_), self.mean_, self.std_)
        with torch.no_grad(), _probe_threads():
            return torch.softmax(self.model_(Xs), dim=1).numpy()

    def predict(self, X, *, split: str = "input") -> np.ndarray:
        """Arg-max class index ``[N]`` (int64)."""
        return self.predict_proba(X, split=split).argmax(axis=1)


# --------------------------------------------------------------------------- the batched grid


@dataclass
class _GridFit:
    """One seed's lr x weight-decay grid trained as one batched model (``G`` members).

    Member ``g`` is ``(lrs[g], weight_decays[g])``; ``weight [G, C, D]`` and ``bias [G, C]``
    are each member's restored best-epoch parameters (the initial ones if no epoch had a
    finite validation loss).  ``best_epoch``, ``best_val_loss``, ``epochs_run``,
    ``converged`` are per member, as :class:`LinearProbe`'s attributes; ``history[g]`` is
    member ``g``'s ``[{"epoch", "train_loss", "val_loss", "lr"}]``.
    """

    seed: int
    lrs: list[float]
    weight_decays: list[float]
    weight: torch.Tensor
    bias: torch.Tensor
    best_epoch: list[int]
    best_val_loss: list[float]
    epochs_run: list[int]
    converged: list[bool]
    history: list[list[dict]] = field(repr=False)


class _Cancelled(Exception):
    """A worker's fit was ended early because another seed failed or the run was interrupted."""


def _grid(config: ProbeConfig) -> list[tuple[float, float]]:
    """The (lr, weight decay) pairs in grid order: lr outer, weight decay inner."""
    return [(lr, wd) for lr in config.lr_grid for wd in config.weight_decay_grid]


def _fit_grid(
    data: _Data, grid: list[tuple[float, float]], config: ProbeConfig, seed: int,
    cancel: threading.Event | None = None,
) -> _GridFit:
    """Train every ``(lr, weight decay)`` of ``grid`` for one ``seed`` as one batched model.

    Layout: the members' weights are held as ``[D, A, C]`` (``A`` members still active), the
    transpose of the logical stack ``[A, C, D]`` of ``nn.Linear`` weights, so that one
    mini-batch ``[B, D]`` (shared by all members: they share the seed's shuffling) times the
    weights viewed as ``[D, A*C]`` is a single matrix product, and so is the weight gradient
    ``[D, B] @ [B, A*C]``.  Per member, exactly as :class:`LinearProbe` does alone: the same
    initial parameters, AdamW with its own learning rate and decoupled weight decay (weight
    only), its own cosine-annealed rate, its gradient (weight and bias together) clipped to
    its own norm, early stopping on its own validation loss with its best epoch kept.  A
    member that stops is removed from the batch (its parameters can no longer change) and the
    loop ends when none is left or at ``max_epochs``.  The mini-batch order comes from a
    generator seeded by ``seed``, drawn in the same sequence as :class:`LinearProbe` draws it.
    Caller holds :func:`_probe_threads`.  ``cancel``, when set, ends the fit at the next epoch
    (with :class:`_Cancelled`): the other seeds' workers stop soon after one fails or on Ctrl-C.
    """
    cfg = config
    beta1, beta2 = ADAM_BETAS
    Xt, yt, Xv, yv = data.Xt, data.yt, data.Xv, data.yv
    N, D = Xt.shape
    Nv = Xv.shape[0]
    C = data.n_classes
    G = len(grid)
    lr0 = np.array([lr for lr, _ in grid], dtype=np.float64)
    wd = np.array([w for _, w in grid], dtype=np.float64)
    weight_c = torch.from_numpy(data.class_weight) if data.class_weight is not None else None

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    w0, b0 = _initial_parameters(gen, D, C)
    W = w0.t().unsqueeze(1).repeat(1, G, 1)  # [D, G, C]: every member starts from the seed's init
    b = b0.unsqueeze(0).repeat(G, 1)  # [G, C]
    best_W, best_b = W.clone(), b.clone()
    mW, vW = torch.zeros_like(W), torch.zeros_like(W)  # AdamW moments of the weights
    mb, vb = torch.zeros_like(b), torch.zeros_like(b)  # and of the biases

    active = np.arange(G)  # member ids still training, in grid order (position = column block)
    best_loss = [math.inf] * G
    best_epoch = [0] * G
    since_best = [0] * G
    converged = [False] * G
    history: list[list[dict]] = [[] for _ in range(G)]

    # The validation rows' class weights do not change between epochs.
    if weight_c is not None:
        wv = weight_c[yv]  # [Nv]
        wv_sum = wv.sum()
    step = 0
    for epoch in range(1, cfg.max_epochs + 1):
        if active.size == 0:
            break
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        A = active.size
        lr_now = lr0[active] * _cosine_factor(epoch, cfg.max_epochs)  # float64 [A]
        # Decoupled weight decay multiplies the weights by (1 - lr * wd) before each step.
        decay = torch.from_numpy((1.0 - lr_now * wd[active]).astype(np.float32)).view(1, A, 1)
        perm = torch.randperm(N, generator=gen)
        total = torch.zeros(A, dtype=torch.float64)
        for start in range(0, N, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            B = idx.shape[0]
            xb = Xt.index_select(0, idx)  # [B, D]
            yb = yt.index_select(0, idx)  # [B]
            logits = torch.addmm(b.view(1, A * C), xb, W.view(D, A * C)).view(B, A, C)
            logp = torch.log_softmax(logits, dim=2)  # [B, A, C]
            ypos = yb.view(B, 1, 1).expand(B, A, 1)
            nll = logp.gather(2, ypos).squeeze(2).neg_()  # [B, A]
            # d(mean cross-entropy)/d(logits) = (softmax - one_hot) * w_y / sum(w_y) per member.
            grad = logp.exp_()
            grad.scatter_add_(2, ypos, torch.full((B, A, 1), -1.0))
            if weight_c is None:
                loss = nll.mean(dim=0)
                grad.mul_(1.0 / B)
            else:
                wy = weight_c[yb]
                wy_sum = wy.sum()
                loss = (nll * wy.view(B, 1)).sum(dim=0) / wy_sum
                grad.mul_((wy / wy_sum).view(B, 1, 1))
            gW = (xb.t() @ grad.view(B, A * C)).view(D, A, C)  # [D, A, C]
            gb = grad.sum(dim=0)  # [A, C]
            if cfg.grad_clip is not None:
                # clip_grad_norm_ on each member alone: the norm of its weight and bias
                # gradients' norms, computed as torch does it.
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(gW, dim=(0, 2)), torch.linalg.vector_norm(gb, dim=1)],
                                dim=1),
                    dim=1,
                )  # [A]
                coef = (cfg.grad_clip / (norm + CLIP_EPS)).clamp_(max=1.0)
                gW.mul_(coef.view(1, A, 1))
                gb.mul_(coef.view(A, 1))
            # AdamW step, per member (torch.optim.AdamW's single-tensor update).
            step += 1
            bias_correction1 = 1.0 - beta1**step
            bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
            neg_step = torch.from_numpy((-lr_now / bias_correction1).astype(np.float32))  # [A]
            W.mul_(decay)
            mW.lerp_(gW, 1.0 - beta1)
            vW.mul_(beta2).addcmul_(gW, gW, value=1.0 - beta2)
            W.addcdiv_(mW * neg_step.view(1, A, 1), (vW.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS))
            mb.lerp_(gb, 1.0 - beta1)
            vb.mul_(beta2).addcmul_(gb, gb, value=1.0 - beta2)
            b.addcdiv_(mb * neg_step.view(A, 1), (vb.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS))
            total += loss.double() * B

        # Validation loss of every active member: one product for all of them.
        logits = torch.addmm(b.view(1, A * C), Xv, W.view(D, A * C)).view(Nv, A, C)
        nll = torch.log_softmax(logits, dim=2).gather(2, yv.view(Nv, 1, 1).expand(Nv, A, 1)).squeeze(2).neg_()
        if weight_c is None:
            val = nll.mean(dim=0)
        else:
            val = (nll * wv.view(Nv, 1)).sum(dim=0) / wv_sum
        val_losses = val.tolist()
        train_losses = (total / N).tolist()

        improved: list[int] = []  # positions in the active block
        keep: list[int] = []
        for pos, g in enumerate(active.tolist()):
            val_loss = val_losses[pos]
            history[g].append({"epoch": epoch, "train_loss": train_losses[pos], "val_loss": val_loss,
                               "lr": float(lr_now[pos])})
            if not math.isfinite(val_loss):
                logger.debug("probe (lr=%g, wd=%g, seed=%d): val loss is %s at epoch %d; stopping",
                             lr0[g], wd[g], seed, val_loss, epoch)
                continue  # stops: not kept
            if cfg.improves(val_loss, best_loss[g]):
                best_loss[g], best_epoch[g], since_best[g] = val_loss, epoch, 0
                improved.append(pos)
            else:
                since_best[g] += 1
                if since_best[g] >= cfg.patience:
                    converged[g] = True
                    continue
            keep.append(pos)
        if improved:
            pos_t = torch.tensor(improved)
            ids_t = torch.from_numpy(active[improved])
            best_W.index_copy_(1, ids_t, W.index_select(1, pos_t))
            best_b.index_copy_(0, ids_t, b.index_select(0, pos_t))
        if len(keep) < A:
            # Drop stopped members from the batch: their parameters are final (best ones kept).
            keep_t = torch.tensor(keep, dtype=torch.int64)
            W, mW, vW = (t.index_select(1, keep_t) for t in (W, mW, vW))
            b, mb, vb = (t.index_select(0, keep_t) for t in (b, mb, vb))
            active = active[keep]

    return _GridFit(
        seed=seed,
        lrs=[float(v) for v in lr0],
        weight_decays=[float(v) for v in wd],
        weight=best_W.permute(1, 2, 0).contiguous(),  # [G, C, D]
        bias=best_b,
        best_epoch=best_epoch,
        best_val_loss=best_loss,
        epochs_run=[len(h) for h in history],
        converged=converged,
        history=history,
    )


def _member_probe(fit: _GridFit, g: int, data: _Data, config: ProbeConfig) -> LinearProbe:
    """Member ``g`` of a batched fit as a fitted :class:`LinearProbe` (for ``predict_proba``)."""
    probe = LinearProbe(data.n_classes, fit.lrs[g], fit.weight_decays[g], config, fit.seed)
    model = torch.nn.utils.skip_init(nn.Linear, data.n_features, data.n_classes, dtype=torch.float32)
    with torch.no_grad():
        model.weight.copy_(fit.weight[g])
        model.bias.copy_(fit.bias[g])
    model.eval()
    probe.model_ = model
    probe.mean_, probe.std_ = data.mean, data.std
    probe.class_weight_ = data.class_weight
    probe.best_epoch_ = fit.best_epoch[g]
    probe.best_val_loss_ = fit.best_val_loss[g]
    probe.history_ = fit.history[g]
    probe.n_epochs_run_ = fit.epochs_run[g]
    probe.converged_ = fit.converged[g]
    probe.n_features_in_ = data.n_features
    return probe


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
    of the third running alone at the end (``benchmarks/probe.py --workers 1,2,3`` on 2 cores,
    3 seeds: 4.4 s with 3 workers, 5.6 s with 2, 8.2 s with 1; beside 8 busy processes (and
    other users' jobs) the scheduler shares the cores per runnable thread: 38 s, 50 s, 61 s).
    Twice the cores bounds the threads when there are many seeds.
    """
    workers = PROBE_WORKERS if PROBE_WORKERS is not None else 2 * _usable_cores()
    return max(1, min(int(workers), n_seeds))


def _fit_seeds(data: _Data, config: ProbeConfig, seeds: tuple[int, ...], progress: bool) -> list[_GridFit]:
    """:func:`_fit_grid` for every seed -> one :class:`_GridFit` per seed, in ``seeds`` order.

    The seeds run in :func:`_worker_count` worker threads, each on one torch thread (worker
    threads start inside :func:`_probe_threads` and inherit its setting; torch releases the
    GIL in its kernels, so they do run side by side).  Each seed is one unit computed start to
    end by one thread, so the results do not depend on the number of workers or on which
    finishes first.
    """
    grid = _grid(config)
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


def _select(fit: _GridFit, config: ProbeConfig) -> int:
    """Index of the member with the lowest restored validation loss (first in grid order on ties).

    Raises :class:`UserError` when every member diverged (no finite validation loss).
    """
    best = min(range(len(fit.lrs)), key=lambda g: (fit.best_val_loss[g], g))
    if not math.isfinite(fit.best_val_loss[best]):
        raise UserError(
            f"the probe diverged for every lr in {config.lr_grid} (seed {fit.seed}); "
            "use smaller learning rates, e.g. --set probe_lr_grid=1e-4,3e-4"
        )
    return best


def _chosen(fit: _GridFit, g: int) -> dict:
    return {
        "seed": fit.seed,
        "lr": fit.lrs[g],
        "weight_decay": fit.weight_decays[g],
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


# --------------------------------------------------------------------------- selection


def fit_probe(
    X_train, y_train, X_val, y_val, n_classes: int, config: ProbeConfig, seed: int
) -> tuple[LinearProbe, dict]:
    """Grid-search lr x weight decay on the validation split for one seed.

    The whole grid is trained on ``X_train [N, D]``/``y_train [N]`` as one batched model
    (each member equal to ``LinearProbe(n_classes, lr, wd, config, seed)`` up to float32
    round-off); the pair whose restored best epoch has the lowest validation loss on
    ``X_val [Nv, D]``/``y_val [Nv]`` wins (ties go to the first pair in grid order, lr outer,
    weight decay inner).  Returns the winning probe (no refit: it is the member trained with
    that pair) and ``{"seed", "lr", "weight_decay", "val_loss", "best_epoch", "epochs_run",
    "converged"}`` (``converged`` as defined in the module docstring; a warning is logged
    when it is false).
    """
    n_classes = _check_n_classes(n_classes)
    data = _prepare(X_train, y_train, X_val, y_val, n_classes, config)
    (fit,) = _fit_seeds(data, config, (int(seed),), progress=False)
    g = _select(fit, config)
    chosen = _chosen(fit, g)
    _warn_not_converged([chosen], config)
    return _member_probe(fit, g, data, config), chosen


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
    n_classes = _check_n_classes(n_classes)
    Xte = _check_features(X_test, "test")
    data = _prepare(X_train, y_train, X_val, y_val, n_classes, config)
    Xte = _check_features(Xte, "test", data.n_features)
    fits = _fit_seeds(data, config, config.seeds, progress)
    probas: list[np.ndarray] = []
    chosen: list[dict] = []
    for fit in fits:
        g = _select(fit, config)
        params = _chosen(fit, g)
        probas.append(_member_probe(fit, g, data, config).predict_proba(Xte, split="test"))
        chosen.append(params)
        logger.info("probe seed %d: lr=%g weight_decay=%g best epoch %d of %d, val loss %.4f",
                    params["seed"], params["lr"], params["weight_decay"], params["best_epoch"],
                    params["epochs_run"], params["val_loss"])
    _warn_not_converged(chosen, config)
    return np.stack(probas), chosen
