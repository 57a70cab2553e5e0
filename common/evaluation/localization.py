"""Attention localization: does the last layer's CLS attention sit on the object a mask marks, and
does ttr move it there (docs/localization.md, docs/statistics.md)?

Per test image with a mask and per mode, from the **last layer's CLS -> image-patch attention**:
the post-softmax CLS row, image patches only (CLS, trained registers and test-time registers left
out), averaged over heads, then renormalised to sum to 1 over the patches (:func:`cls_patch_map`);
upsampled bilinearly (``align_corners=False``) from the patch grid to the preprocessed image, the
size the mask was brought to (:mod:`common.data.masks`):

==================  =============================================================================
``energy_in_mask``  the share of the attention inside the mask (threshold-free; uniform attention
                    gives the mask's share of the image, ``mask_share``)
``pointing_hit``    1 if the attention's maximum lies inside the mask, else 0 (the first maximum
                    in row-major order where several pixels share it)
``iou``             IoU of the attention binarised at its mean (pixels strictly above the mean)
                    with the mask; ``intersection`` and ``union`` are its pixel counts
==================  =============================================================================

An image whose mask is empty after the preprocessing (cropped away) is left out and counted.
:func:`localization_summary` gives per metric the mean per mode with its percentile-bootstrap
interval and, against the baseline, the paired difference with its paired-bootstrap interval
(:func:`common.evaluation.stats.resample_weights`, :func:`~common.evaluation.stats.bootstrap_difference`:
the same resamples of the images for both modes) and its two-sided paired permutation p-value (each
image's two modes swapped with probability 1/2: :func:`~common.evaluation.stats.swap_weights`,
:func:`~common.evaluation.stats.permutation_p`); ``iou_accumulated`` is the dataset-accumulated
IoU (intersections and unions summed over the images before dividing), the form of the
test-time-registers paper's zero-shot segmentation table.

The attention maps come from the analysis pass (:mod:`common.evaluation.analysis`), which keeps
them for its images; :func:`last_layer_attention` is the lighter pass (one attention row of one
layer) for the images with a mask outside its sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.evaluation.stats import (
    bootstrap_difference,
    percentile_interval,
    permutation_p,
    resample_weights,
    swap_weights,
    untie,
)
from common.models.hooks import HookedViT, HookFn, attn_cls_pattern
from common.registers.modes import BASELINE

METRICS = ("energy_in_mask", "pointing_hit", "iou")
ACCUMULATED_IOU = "iou_accumulated"
SUMMARY_METRICS = METRICS + (ACCUMULATED_IOU,)
LOCALIZATION_COLUMNS = ("path", "mode", "energy_in_mask", "pointing_hit", "iou", "intersection", "union",
                        "mask_share")
SUMMARY_COLUMNS = ("metric", "mode", "images", "mean", "mean_lo", "mean_hi", "diff", "diff_lo", "diff_hi",
                   "diff_se", "diff_p")


@dataclass
class LocalizationResult:
    """What a run's localization hands the summary: ``localization.csv``'s table, its summary,
    the images left out (empty mask after the preprocessing), notes and the figures
    (``(file name, caption)``)."""

    table: pd.DataFrame
    summary: pd.DataFrame
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# the attention maps


def cls_patch_map(patch_attention: torch.Tensor) -> torch.Tensor:
    """``[B, H, P]`` CLS attention on the image patches -> ``[B, P]``: mean over heads, renormalised
    to sum to 1 over the patches."""
    mean = patch_attention.float().mean(dim=1)
    return mean / mean.sum(dim=-1, keepdim=True).clamp_min(1e-30)


@torch.no_grad()
def last_layer_attention(hooked: HookedViT, pixels: torch.Tensor, normalise: Callable[[torch.Tensor], torch.Tensor],
                         num_registers: int, fwd_hooks: Sequence[tuple[str, HookFn]], batch_size: int,
                         desc: str = "localization") -> np.ndarray:
    """``[n, P]`` :func:`cls_patch_map` of the last layer for ``pixels`` (``uint8 [n, 3, H, W]``) under a
    mode (its test-time registers and hook functions): one forward per batch, only the last
    layer's CLS attention row computed."""
    backbone = hooked.backbone
    last = attn_cls_pattern(backbone.num_layers - 1)
    patches = hooked.token_layout(num_registers).patch_slice
    maps = []
    for start in tqdm(range(0, len(pixels), batch_size), desc=desc, unit="batch", leave=False, disable=None):
        _, cache = hooked.run_with_cache(normalise(pixels[start:start + batch_size]), [last],
                                         num_registers=num_registers, fwd_hooks=fwd_hooks)
        maps.append(cls_patch_map(cache[last][..., patches]).cpu().numpy())
    return np.concatenate(maps) if maps else np.zeros((0, backbone.num_patches), np.float32)


# --------------------------------------------------------------------------------------------
# the metrics


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[M, rows, cols]`` -> ``[M, H, W]``, bilinear (``align_corners=False``), in float64."""
    tensor = torch.as_tensor(np.asarray(maps, dtype=np.float64))[:, None]
    return F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)[:, 0].numpy()


def image_metrics(attention: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The metrics of one attention map ``[H, W]`` (non-negative, not all 0) against a non-empty
    ``bool`` mask of the same size."""
    mask = np.asarray(mask, dtype=bool)
    attention = np.asarray(attention, dtype=np.float64)
    above = attention > attention.mean()
    intersection = int(np.count_nonzero(above & mask))
    union = int(np.count_nonzero(above | mask))
    return {
        "energy_in_mask": float(attention[mask].sum() / attention.sum()),
        "pointing_hit": float(mask.ravel()[int(np.argmax(attention))]),
        "iou": intersection / union,
        "intersection": intersection,
        "union": union,
        "mask_share": float(mask.mean()),
    }


def localize(labels: Sequence[str], maps: dict[str, np.ndarray], mask_of: Callable[[int], np.ndarray],
             progress: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """(``localization.csv``'s table: one row per image and mode, columns :data:`LOCALIZATION_COLUMNS`;
    the labels of the images left out because their mask is empty).

    ``maps``: mode -> ``[n, rows, cols]`` attention maps of the images ``labels``; ``mask_of(i)``: image
    ``i``'s mask at the preprocessed image's size (``bool [H, W]``).  One image at a time, so that
    real-size runs never hold every upsampled map.
    """
    modes = list(maps)
    rows, left_out = [], []
    for i, label in enumerate(tqdm(labels, desc="localization", unit="img", leave=False,
                                   disable=None if progress else True)):
        mask = mask_of(i)
        if not mask.any():
            left_out.append(label)
            continue
        upsampled = upsample(np.stack([maps[mode][i] for mode in modes]), mask.shape)
        for mode, attention in zip(modes, upsampled):
            rows.append({"path": label, "mode": mode, **image_metrics(attention, mask)})
    return pd.DataFrame(rows, columns=list(LOCALIZATION_COLUMNS)), left_out


# --------------------------------------------------------------------------------------------
# the summary


def _statistic(table: pd.DataFrame, mode: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``(numerator, denominator)`` per image of a summary metric (the metric is their sums' ratio):
    ``(value, 1)`` for the per-image means, ``(intersection, union)`` for the accumulated IoU."""
    rows = table[table["mode"] == mode]
    if metric == ACCUMULATED_IOU:
        return rows["intersection"].to_numpy(np.float64), rows["union"].to_numpy(np.float64)
    return rows[metric].to_numpy(np.float64), np.ones(len(rows))


def _weighted(pair: tuple[np.ndarray, np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``[1 + B]``: the metric over all images, then under each row of ``weights [B, n]``
    (multiplicities of the images in the table's order)."""
    top, bottom = pair
    return np.concatenate([[top.sum() / bottom.sum()], (weights @ top) / (weights @ bottom)])


def _permutation_p(mode: tuple[np.ndarray, np.ndarray], base: tuple[np.ndarray, np.ndarray], n_perm: int,
                   seed: int) -> float:
    """Two-sided paired permutation p of mode - baseline: in each permutation every image's two
    rows are swapped with probability 1/2."""
    keep, swap = swap_weights(len(mode[0]), n_perm, seed)
    top, bottom = np.concatenate([mode[0], base[0]]), np.concatenate([mode[1], base[1]])
    permuted = untie((keep @ top) / (keep @ bottom) - (swap @ top) / (swap @ bottom))
    observed = float(untie(np.array([mode[0].sum() / mode[1].sum() - base[0].sum() / base[1].sum()]))[0])
    return permutation_p(observed, permuted)


def localization_summary(table: pd.DataFrame, *, n_boot: int, n_perm: int, seed: int,
                         baseline: str = BASELINE) -> pd.DataFrame:
    """Per summary metric and mode (columns :data:`SUMMARY_COLUMNS`): the mean over the images with its
    95% percentile-bootstrap interval and, for every mode but ``baseline``, the paired difference
    mode - baseline with its 95% paired-bootstrap interval, standard error (the same ``n_boot``
    resamples, drawn with ``seed``, for every mode and metric) and paired permutation p-value
    (``n_perm`` permutations)."""
    modes = list(dict.fromkeys(table["mode"]))
    if not modes:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    order = list(dict.fromkeys(table["path"]))
    for mode in modes:                                  # every mode covers the same images, in one order
        if list(table.loc[table["mode"] == mode, "path"]) != order:
            raise ValueError(f"mode {mode!r} does not cover the same images as the others")
    weights = resample_weights(len(order), n_boot, seed)
    rows = []
    for metric in SUMMARY_METRICS:
        pairs = {mode: _statistic(table, mode, metric) for mode in modes}
        values = {mode: _weighted(pair, weights) for mode, pair in pairs.items()}
        for mode in modes:
            resampled = values[mode]
            lo, hi = percentile_interval(resampled[1:])
            row = {"metric": metric, "mode": mode, "images": len(order), "mean": float(resampled[0]),
                   "mean_lo": lo, "mean_hi": hi}
            if mode != baseline and baseline in values:
                d, d_lo, d_hi, se = bootstrap_difference(resampled, values[baseline])
                row.update({"diff": d, "diff_lo": d_lo, "diff_hi": d_hi, "diff_se": se,
                            "diff_p": _permutation_p(pairs[mode], pairs[baseline], n_perm, seed)})
            rows.append(row)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def summary_value(summary: pd.DataFrame, metric: str, mode: str, column: str = "mean") -> float:
    """One number of a :func:`localization_summary` table (NaN when absent)."""
    rows = summary[(summary["metric"] == metric) & (summary["mode"] == mode)]
    return float(rows[column].iloc[0]) if len(rows) and pd.notna(rows[column].iloc[0]) else math.nan
