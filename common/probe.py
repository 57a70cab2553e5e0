"""The linear probe trained on frozen features, the same procedure for every mode (SPEC §7).

One :class:`torch.nn.Linear` layer on standardised features (mean and std from the training
split only), cross-entropy (optionally with 'balanced' class weights), AdamW, a cosine-annealed
learning rate over ``max_epochs``, gradient-norm clipping, mini-batches shuffled by a
:class:`torch.Generator` seeded from ``seed``, and early stopping on the validation loss with
the best epoch's weights restored.  Learning rate and weight decay are chosen on the
validation split from a small grid (:func:`fit_probe`); :func:`fit_probes` repeats that for
every probe seed and returns the test probabilities per seed.

Everything runs in float32 on the CPU and draws randomness only from generators seeded by
``seed`` (never from the global torch or numpy state), so the same seed and data give
bit-identical probabilities (on the same machine and torch thread setting; small probes run
on one thread, see :func:`_small_work_threads`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass

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


# Below this many multiply-adds per mini-batch (batch x D x C) the probe runs torch on one
# CPU thread (see :func:`_small_work_threads`).
SMALL_WORK = 1 << 22


@contextlib.contextmanager
def _small_work_threads(work: int):
    """Run torch on one CPU thread while ``work`` (multiply-adds per matmul) is small.

    A small probe (few features or classes; the demo, the tests) gains nothing from intra-op
    threads, and on a busy machine threads that wait on each other slow it down many times
    over (measured: 8 s -> 115 s for the probe tests on an overloaded 2-core box).  Larger
    problems keep torch's thread setting.  The previous setting is restored on exit.
    """
    if work >= SMALL_WORK:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- the probe


class LinearProbe:
    """A linear softmax classifier on standardised features, scikit-learn style.

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
    best_epoch_ : 1-based epoch whose weights were restored (lowest validation loss).
    best_val_loss_ : validation loss of that epoch (the restored model's validation loss).
    history_ : ``[{"epoch", "train_loss", "val_loss", "lr"}]`` for every epoch run.
    n_epochs_run_ : epochs actually run (< ``max_epochs`` when early stopping fired).
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

    # ---------------------------------------------------------------- helpers

    def _standardise(self, X: np.ndarray) -> torch.Tensor:
        """``(X - mean_) / std_`` as a float32 tensor ``[N, D]``."""
        return torch.from_numpy((X - self.mean_) / self.std_)

    def _loss(self, model: nn.Linear, X: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(X), y, weight=weight))

    # ---------------------------------------------------------------- API

    def fit(self, X_train, y_train, X_val, y_val) -> "LinearProbe":
        """Train on ``X_train [N, D]``/``y_train [N]``, early-stopping on ``X_val``/``y_val``.

        Raises :class:`UserError` for bad inputs: not 2-D, empty, mismatched lengths, labels
        outside ``[0, n_classes)``, NaN/inf features (the message names the split), fewer than
        two classes in train.
        """
        n_features = np.shape(X_train)[-1] if np.ndim(X_train) == 2 else 1
        with _small_work_threads(self.config.batch_size * n_features * self.n_classes):
            return self._fit(X_train, y_train, X_val, y_val)

    def _fit(self, X_train, y_train, X_val, y_val) -> "LinearProbe":
        cfg = self.config
        C = self.n_classes
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
        N, D = Xtr.shape

        # Standardisation from train only, computed in float64 for accuracy.
        Xtr64 = Xtr.astype(np.float64)
        mean = Xtr64.mean(axis=0)
        std = Xtr64.std(axis=0)
        n_const = int((std < STD_FLOOR).sum())
        std[std < STD_FLOOR] = 1.0
        if n_const:
            logger.debug("%d of %d features are constant on train; left unscaled", n_const, D)
        self.mean_ = mean.astype(np.float32)
        self.std_ = std.astype(np.float32)
        Xt = self._standardise(Xtr)
        Xv = self._standardise(Xva)
        yt = torch.from_numpy(ytr)
        yv = torch.from_numpy(yva)

        self.class_weight_ = _balanced_class_weights(ytr, C) if cfg.class_weights else None
        weight = torch.from_numpy(self.class_weight_) if self.class_weight_ is not None else None

        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed)
        # skip_init: no draw from the global RNG; initialise like nn.Linear's default
        # (U(-1/sqrt(D), 1/sqrt(D)) for weight and bias) from our own generator instead.
        model = torch.nn.utils.skip_init(nn.Linear, D, C, dtype=torch.float32)
        bound = 1.0 / math.sqrt(D)
        with torch.no_grad():
            model.weight.copy_(torch.rand((C, D), generator=gen, dtype=torch.float32) * (2 * bound) - bound)
            model.bias.copy_(torch.rand((C,), generator=gen, dtype=torch.float32) * (2 * bound) - bound)

        optimizer = torch.optim.AdamW(
            [
                {"params": [model.weight], "weight_decay": self.weight_decay},
                {"params": [model.bias], "weight_decay": 0.0},
            ],
            lr=self.lr,
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs)

        best_loss = math.inf
        best_epoch = 0
        best_state = copy.deepcopy(model.state_dict())
        history: list[dict] = []
        since_best = 0
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
            val_loss = self._loss(model, Xv, yv, weight)
            history.append({"epoch": epoch, "train_loss": total / N, "val_loss": val_loss, "lr": lr_now})
            if not math.isfinite(val_loss):
                logger.warning("probe (lr=%g, wd=%g, seed=%d): val loss is %s at epoch %d; stopping",
                               self.lr, self.weight_decay, self.seed, val_loss, epoch)
                break
            if val_loss < best_loss:
                best_loss, best_epoch, since_best = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
                if since_best >= cfg.patience:
                    break

        model.load_state_dict(best_state)
        model.eval()
        self.model_ = model
        self.best_epoch_ = best_epoch
        self.best_val_loss_ = best_loss
        self.history_ = history
        self.n_epochs_run_ = len(history)
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
        Xs = self._standardise(_check_features(X, split, self.n_features_in_))
        with torch.no_grad(), _small_work_threads(Xs.shape[0] * Xs.shape[1] * self.n_classes):
            return torch.softmax(self.model_(Xs), dim=1).numpy()

    def predict(self, X, *, split: str = "input") -> np.ndarray:
        """Arg-max class index ``[N]`` (int64)."""
        return self.predict_proba(X, split=split).argmax(axis=1)


# --------------------------------------------------------------------------- selection


def fit_probe(
    X_train, y_train, X_val, y_val, n_classes: int, config: ProbeConfig, seed: int
) -> tuple[LinearProbe, dict]:
    """Grid-search lr x weight decay on the validation split for one seed.

    Every pair is trained on train only with the same ``seed``; the pair whose restored best
    epoch has the lowest validation loss wins (ties go to the first pair in grid order, lr
    outer, weight decay inner).  Returns the winning probe (no refit: it is already the probe
    trained on train with that pair) and ``{"lr", "weight_decay", "val_loss", "best_epoch"}``.
    """
    best: LinearProbe | None = None
    for lr in config.lr_grid:
        for wd in config.weight_decay_grid:
            probe = LinearProbe(n_classes, lr, wd, config, seed).fit(X_train, y_train, X_val, y_val)
            logger.debug("seed %d lr=%g wd=%g -> val loss %.5f (epoch %d)",
                         seed, lr, wd, probe.best_val_loss_, probe.best_epoch_)
            if best is None or probe.best_val_loss_ < best.best_val_loss_:
                best = probe
    assert best is not None  # the grids are non-empty (ProbeConfig checks)
    if not math.isfinite(best.best_val_loss_):
        raise UserError(
            f"the probe diverged for every lr in {config.lr_grid} (seed {seed}); "
            "use smaller learning rates, e.g. --set probe_lr_grid=1e-4,3e-4"
        )
    chosen = {
        "lr": best.lr,
        "weight_decay": best.weight_decay,
        "val_loss": best.best_val_loss_,
        "best_epoch": best.best_epoch_,
    }
    return best, chosen


def fit_probes(
    X_train, y_train, X_val, y_val, X_test, n_classes: int, config: ProbeConfig, *, progress: bool = False
) -> tuple[np.ndarray, list[dict]]:
    """One grid-searched probe per seed in ``config.seeds``.

    Returns the test probabilities float32 ``[S, N_test, C]`` (seed order as in
    ``config.seeds``) and the chosen hyper-parameters per seed (``fit_probe``'s dict plus
    ``"seed"``).  ``progress`` shows a tqdm bar over the seeds.
    """
    n_classes = _check_n_classes(n_classes)
    Xte = _check_features(X_test, "test")
    probas: list[np.ndarray] = []
    chosen: list[dict] = []
    for seed in tqdm(config.seeds, desc="probe seeds", disable=not progress, leave=False):
        probe, params = fit_probe(X_train, y_train, X_val, y_val, n_classes, config, seed)
        probas.append(probe.predict_proba(Xte, split="test"))
        chosen.append({"seed": seed, **params})
        logger.info("probe seed %d: lr=%g weight_decay=%g best epoch %d val loss %.4f",
                    seed, params["lr"], params["weight_decay"], params["best_epoch"], params["val_loss"])
    return np.stack(probas), chosen
