"""What the linear probe is given: its settings and its data, checked where they enter (docs/run.md).

:class:`ProbeConfig` holds and validates the procedure's settings; :func:`check_inputs`
validates the features and labels of the three splits and raises a one-line
:class:`UserError` naming the split and what to do; :func:`standardise` turns the checked
inputs into the float32 tensors one fit trains on, with the mean and standard deviation of
the training rows only.  A fit on a subset or a resample of the training rows
(``train_rows``) standardises with those rows' statistics, as a fit on them alone would.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

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
    # An epoch counts as an improvement only when the validation loss falls below the best by
    # more than this fraction of it (torch's ReduceLROnPlateau default, relative mode): on nearly
    # separable data the loss creeps down forever and early stopping would never fire.
    min_delta: float = 1e-4

    def improves(self, loss: float, best: float) -> bool:
        """True when ``loss`` improves on ``best`` by more than ``min_delta`` (relative)."""
        return loss < best * (1.0 - self.min_delta) if math.isfinite(best) else loss < best

    def grid(self) -> list[tuple[float, float]]:
        """The (lr, weight decay) pairs in grid order: lr outer, weight decay inner."""
        return [(lr, wd) for lr in self.lr_grid for wd in self.weight_decay_grid]

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


def check_features(X, split: str, n_features: int | None = None) -> np.ndarray:
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


def check_labels(y, split: str, n_rows: int, n_classes: int) -> np.ndarray:
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


def check_n_classes(n_classes) -> int:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise UserError(f"n_classes={n_classes!r} must be an integer >= 2")
    return int(n_classes)


def _check_two_classes(y: np.ndarray) -> None:
    present = np.unique(y)
    if present.size < 2:
        raise UserError(
            f"train split has only {present.size} class (label {int(y[0])}); the probe needs "
            "at least 2 classes in train - check the dataset split and labels"
        )


def balanced_class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
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


@dataclass(frozen=True)
class ProbeInputs:
    """Checked, not yet standardised inputs: ``X_train [N, D]``, ``X_val [Nv, D]`` and
    ``X_test [Nt, D]`` (or ``None``) float32, ``y_train [N]`` and ``y_val [Nv]`` int64 in
    ``[0, n_classes)``."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray | None
    n_classes: int


def check_inputs(X_train, y_train, X_val, y_val, X_test, n_classes: int) -> ProbeInputs:
    """Validate the splits (``X_test`` may be ``None``) -> :class:`ProbeInputs`.

    Raises :class:`UserError` for bad inputs: not 2-D, empty, mismatched lengths or widths,
    labels outside ``[0, n_classes)``, NaN/inf features (the message names the split), fewer
    than two classes in train, ``n_classes`` below 2.
    """
    n_classes = check_n_classes(n_classes)
    Xte = check_features(X_test, "test") if X_test is not None else None
    Xtr = check_features(X_train, "train")
    ytr = check_labels(y_train, "train", Xtr.shape[0], n_classes)
    Xva = check_features(X_val, "val", Xtr.shape[1])
    yva = check_labels(y_val, "val", Xva.shape[0], n_classes)
    _check_two_classes(ytr)
    if Xte is not None:
        Xte = check_features(Xte, "test", Xtr.shape[1])
    return ProbeInputs(Xtr, ytr, Xva, yva, Xte, n_classes)


@dataclass
class Standardised:
    """What one fit trains on: ``Xt [N, D]``, ``Xv [Nv, D]`` float32 standardised with the
    training rows' ``mean``/``std`` (float32 ``[D]``), ``yt [N]``, ``yv [Nv]`` int64 and the
    'balanced' ``class_weight`` float32 ``[C]`` (or ``None``)."""

    Xt: torch.Tensor
    yt: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    mean: np.ndarray
    std: np.ndarray
    class_weight: np.ndarray | None
    n_classes: int


def standardise(inputs: ProbeInputs, class_weights: bool, train_rows: np.ndarray | None = None) -> Standardised:
    """The tensors of one fit on the training rows ``train_rows`` (default: all of them).

    ``train_rows [M]`` indexes ``inputs.X_train`` (repeats allowed, e.g. a bootstrap resample);
    the mean, std and class weights come from those rows.  Raises :class:`UserError` when
    they hold fewer than two classes.
    """
    Xtr, ytr = inputs.X_train, inputs.y_train
    if train_rows is not None:
        Xtr, ytr = Xtr[train_rows], ytr[train_rows]
        _check_two_classes(ytr)
    # Standardisation from train only, computed in float64 for accuracy.
    Xtr64 = Xtr.astype(np.float64)
    mean = Xtr64.mean(axis=0)
    std = Xtr64.std(axis=0)
    del Xtr64
    constant = std < STD_FLOOR
    std[constant] = 1.0
    if constant.any():
        logger.debug("%d of %d features are constant on train; left unscaled", int(constant.sum()), Xtr.shape[1])
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    return Standardised(
        Xt=torch.from_numpy((Xtr - mean32) / std32),
        yt=torch.from_numpy(ytr),
        Xv=torch.from_numpy((inputs.X_val - mean32) / std32),
        yv=torch.from_numpy(inputs.y_val),
        mean=mean32,
        std=std32,
        class_weight=balanced_class_weights(ytr, inputs.n_classes) if class_weights else None,
        n_classes=inputs.n_classes,
    )
