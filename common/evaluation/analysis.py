"""Outlier statistics and figures of a run: what the high-norm tokens do, mode beside mode.

One pass per mode over a fixed, seeded subset of the TEST images, in batches, keeping only
per-image reductions (never the activations themselves):

* per layer, the largest **image-patch** norm (L2 norm of the block output) per image;
* per layer, the largest CLS -> image-patch attention per image: the maximum over heads *and*
  image patches of the post-softmax CLS attention row (raw probabilities, not renormalised);
* at the detect layer, every image-patch norm and the test-time register norms (for the
  histogram and ``patch_share_above_threshold``);
* in the last layer, per image: the entropy of the CLS attention over image patches
  (renormalised over the image patches, natural log, averaged over heads; uniform attention
  gives ln P for P patches) and the share of CLS attention on the test-time register(s)
  (summed over registers, averaged over heads);
* for the first ``figure_images`` images only: the image-patch norm map of every layer and the
  CLS attention maps per head at the detect layer and the last layer (for :mod:`common.reporting.plots`);
* in the last layer, per image: the CLS attention map over the image patches (head mean,
  renormalised: :func:`common.evaluation.localization.cls_patch_map`), for the attention
  localization, which also gets these maps for ``extra_pixels`` (the test images with a mask
  outside the sample) from a lighter pass (:func:`common.evaluation.localization.last_layer_attention`).

"Image patches" exclude CLS, the trained registers of ``*_reg`` / DINOv3 models and the
test-time registers.

``outliers.csv`` (one row per mode, docs/run.md):

==============================  ==============================================================
``patch_share_above_threshold``  share of image patches (all analysis images pooled) whose norm
                                 at the detect layer is **> threshold** (as in detection)
``mean_max_patch_norm``          mean over images of the largest image-patch norm at the detect layer
``register_norm``                mean over images and registers of the test-time register norm at
                                 the detect layer; NaN without a register
``cls_attention_entropy``        last-layer CLS attention entropy over image patches (nats)
``cls_attention_on_register``    last-layer share of CLS attention on the test-time register(s);
                                 NaN without a register
==============================  ==============================================================

:func:`analyse` receives what it needs - the hooked backbone, the images and each mode's
registers and hook functions - not a run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common.evaluation.localization import cls_patch_map, last_layer_attention
from common.models.hooks import HookedViT, HookFn, attn_cls_pattern, resid_post
from common.registers.modes import BASELINE, TTR

log = logging.getLogger(__name__)

OUTLIER_COLUMNS = ("mode", "patch_share_above_threshold", "mean_max_patch_norm", "register_norm",
                   "cls_attention_entropy", "cls_attention_on_register")
# Every layer's block output is held during one forward; capping the batch keeps that small
# (ViT-L/14, 16 images: 24 x 16 x 257 x 1024 floats = 0.4 GB).
ANALYSIS_BATCH_CAP = 16


@dataclass
class ModeAnalysis:
    """Per-image reductions of one mode.  ``n`` images, ``L`` layers, ``P`` image patches,
    ``R`` test-time registers, ``H`` heads, ``F`` figure images, ``m`` extra images (localization
    only), grid ``rows x cols``; the figure attention maps hold two layers: the detect layer and
    the last layer."""

    num_registers: int
    max_patch_norm: np.ndarray            # [n, L]  largest image-patch norm
    max_cls_patch_attention: np.ndarray   # [n, L]  largest CLS -> image-patch attention (max over heads, patches)
    detect_patch_norms: np.ndarray        # [n, P]  image-patch norms at the detect layer
    register_norms: np.ndarray            # [n, R]  test-time register norms at the detect layer
    cls_entropy: np.ndarray               # [n]     last layer, over image patches, mean over heads (nats)
    cls_on_register: np.ndarray           # [n]     last layer, share on the test-time registers, mean over heads
    cls_on_patches: np.ndarray            # [n]     last layer, share on the image patches, mean over heads
    figure_norms: np.ndarray              # [F, L, rows, cols] image-patch norm maps
    figure_cls_attention: np.ndarray      # [F, 2, H, rows, cols] CLS attention on image patches (detect, last)
    figure_cls_on_register: np.ndarray    # [F, 2, H] CLS attention share on the registers (detect, last)
    last_cls_attention: np.ndarray        # [n, P]  last layer, head mean, renormalised over image patches
    extra_cls_attention: np.ndarray       # [m, P]  the same for the extra images

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ModeAnalysis":
        values = {f.name: arrays[f.name] for f in fields(cls)}
        values["num_registers"] = int(values["num_registers"])
        return cls(**values)


@dataclass
class Analysis:
    """Everything the outlier table and the figures are drawn from."""

    labels: list[str]                     # analysis images, in the order used (paths relative to the dataset)
    figure_inputs: np.ndarray             # [F, H_px, W_px, 3] in [0, 1], as the model sees them
    modes: dict[str, ModeAnalysis]        # in report order, the baseline first
    threshold: float
    detect_layer: int                     # 0-based
    num_layers: int
    num_heads: int
    grid: tuple[int, int]
    num_registers: int
    intervened_layers: list[int]
    title: str = ""
    notes: list[str] = field(default_factory=list)
    extra_labels: list[str] = field(default_factory=list)   # the extra images (localization only)

    @property
    def figure_labels(self) -> list[str]:
        return self.labels[: len(self.figure_inputs)]


@dataclass(frozen=True)
class ModeSetup:
    """How a mode runs: its test-time registers and hook functions."""

    num_registers: int
    fwd_hooks: list[tuple[str, HookFn]]


# --------------------------------------------------------------------------------------------
# the pass


@torch.no_grad()
def _run_mode(hooked: HookedViT, pixels: torch.Tensor, normalise: Callable[[torch.Tensor], torch.Tensor],
              setup: ModeSetup, detect_layer: int, figure_count: int, batch_size: int,
              desc: str, extra_pixels: torch.Tensor) -> ModeAnalysis:
    backbone = hooked.backbone
    depth = backbone.num_layers
    rows, cols = backbone.grid_size
    layout = hooked.token_layout(setup.num_registers)
    patches, registers = layout.patch_slice, layout.register_slice
    last = depth - 1
    layers = tuple(range(depth))
    with_cls = backbone.has_cls      # without a class token there is no CLS attention: NaN (a note says so)
    names = [resid_post(l) for l in layers] + ([attn_cls_pattern(l) for l in layers] if with_cls else [])
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (
        "max_norm", "max_att", "detect", "reg", "entropy", "on_reg", "on_patch", "fig_norm", "fig_att", "fig_reg",
        "last_map")}
    seen = 0
    for start in tqdm(range(0, len(pixels), batch_size), desc=desc, unit="batch", leave=False, disable=None):
        images = normalise(pixels[start:start + batch_size])
        batch = images.shape[0]
        _, cache = hooked.run_with_cache(images, names, num_registers=setup.num_registers,
                                         fwd_hooks=setup.fwd_hooks)
        norms = torch.stack([cache[resid_post(l)].float().norm(dim=-1) for l in layers], dim=1)  # [B, L, N]
        patch_norms = norms[:, :, patches]                                                     # [B, L, P]
        parts["max_norm"].append(patch_norms.amax(dim=2).cpu().numpy())
        parts["detect"].append(patch_norms[:, detect_layer].cpu().numpy())
        parts["reg"].append(norms[:, detect_layer, registers].cpu().numpy())
        attention = (torch.stack([cache[attn_cls_pattern(l)] for l in layers], dim=1) if with_cls   # [B, L, H, N]
                     else torch.full((batch, depth, backbone.num_heads, layout.total), math.nan))
        patch_attention = attention[..., patches]                                             # [B, L, H, P]
        parts["max_att"].append(patch_attention.amax(dim=(2, 3)).cpu().numpy())
        final = patch_attention[:, last]                                                      # [B, H, P]
        on_patches = final.sum(dim=-1)                                                        # [B, H]
        p = final / on_patches.clamp_min(1e-30)[..., None]
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)                            # [B, H]
        on_register = attention[:, :, :, registers].sum(dim=-1)                               # [B, L, H]
        parts["entropy"].append(entropy.mean(dim=1).cpu().numpy())
        parts["on_reg"].append(on_register[:, last].mean(dim=1).cpu().numpy())
        parts["on_patch"].append(on_patches.mean(dim=1).cpu().numpy())
        parts["last_map"].append(cls_patch_map(final).cpu().numpy())
        take = max(0, min(batch, figure_count - seen))
        if take:
            shown = patch_attention[:take][:, [detect_layer, last]]                           # [F, 2, H, P]
            parts["fig_norm"].append(patch_norms[:take].reshape(take, depth, rows, cols).cpu().numpy())
            parts["fig_att"].append(shown.reshape(*shown.shape[:3], rows, cols).cpu().numpy())
            parts["fig_reg"].append(on_register[:take][:, [detect_layer, last]].cpu().numpy())
        seen += batch
        del cache, norms, attention

    def cat(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts[key]) if parts[key] else np.zeros((0, *shape), np.float32)

    heads = backbone.num_heads
    extra = (last_layer_attention(hooked, extra_pixels, normalise, setup.num_registers, setup.fwd_hooks, batch_size,
                                  desc=f"{desc}, localization images")
             if with_cls else np.full((len(extra_pixels), rows * cols), math.nan, np.float32))
    return ModeAnalysis(
        num_registers=setup.num_registers,
        max_patch_norm=cat("max_norm", (depth,)), max_cls_patch_attention=cat("max_att", (depth,)),
        detect_patch_norms=cat("detect", (rows * cols,)), register_norms=cat("reg", (setup.num_registers,)),
        cls_entropy=cat("entropy", ()), cls_on_register=cat("on_reg", ()), cls_on_patches=cat("on_patch", ()),
        figure_norms=cat("fig_norm", (depth, rows, cols)),
        figure_cls_attention=cat("fig_att", (2, heads, rows, cols)), figure_cls_on_register=cat("fig_reg", (2, heads)),
        last_cls_attention=cat("last_map", (rows * cols,)), extra_cls_attention=extra,
    )


def analyse(
    hooked: HookedViT,
    pixels: torch.Tensor,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    modes: dict[str, ModeSetup],
    *,
    labels: Sequence[str],
    threshold: float,
    detect_layer: int,
    intervened_layers: Sequence[int] = (),
    figure_images: int = 4,
    batch_size: int = ANALYSIS_BATCH_CAP,
    title: str = "",
    cached: dict[str, ModeAnalysis] | None = None,
    extra_pixels: torch.Tensor | None = None,
    extra_labels: Sequence[str] = (),
) -> Analysis:
    """The analysis pass over ``pixels`` (``uint8 [n, 3, H, W]``, labelled by ``labels``): every
    image counts in the statistics, the first ``figure_images`` are also kept as maps.
    ``extra_pixels`` (labelled by ``extra_labels``) only get their last-layer CLS attention maps
    (for the localization).

    ``modes``: mode -> :class:`ModeSetup`, the baseline first.  ``detect_layer`` may be negative.
    A non-finite ``threshold`` is chosen from the baseline's detect-layer norms
    (:func:`common.registers.detection.suggest_threshold`).  ``cached`` results are used instead of a pass.
    """
    backbone = hooked.backbone
    detect_index = hooked.layer_index(detect_layer)
    batch_size = max(1, min(int(batch_size), ANALYSIS_BATCH_CAP))
    figure_count = min(int(figure_images), len(pixels))
    if extra_pixels is None:
        extra_pixels = torch.zeros((0, *pixels.shape[1:]), dtype=torch.uint8)
    results: dict[str, ModeAnalysis] = {}
    for mode, setup in modes.items():
        if cached and mode in cached:
            results[mode] = cached[mode]
        else:
            results[mode] = _run_mode(hooked, pixels, normalise, setup, detect_index, figure_count, batch_size,
                                      desc=f"analysis {mode}", extra_pixels=extra_pixels)
    notes = [] if backbone.has_cls else ["this model has no class token: the CLS attention statistics and maps "
                                         "are skipped (n/a)"]
    threshold = float(threshold) if threshold is not None else math.nan
    if not math.isfinite(threshold):
        from common.registers.detection import suggest_threshold

        norms = results[next(iter(results))].detect_patch_norms.ravel()
        if norms.size:
            threshold, reason = suggest_threshold(norms)
            notes.append(f"no numeric register_norm_threshold was given; the analysis chose {threshold:.2f} "
                         f"from the baseline's detect-layer patch norms ({reason})")
    inputs = pixels[:figure_count].float().div(255).permute(0, 2, 3, 1).numpy()
    registers = max(setup.num_registers for setup in modes.values())
    return Analysis(
        labels=list(labels), figure_inputs=inputs, modes=results, threshold=float(threshold),
        detect_layer=detect_index, num_layers=backbone.num_layers, num_heads=backbone.num_heads,
        grid=tuple(backbone.grid_size), num_registers=registers,
        intervened_layers=sorted(hooked.layer_index(l) for l in intervened_layers), title=title, notes=notes,
        extra_labels=list(extra_labels))


# --------------------------------------------------------------------------------------------
# tables


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else math.nan


def outlier_table(analysis: Analysis) -> pd.DataFrame:
    """``outliers.csv``: one row per mode, columns :data:`OUTLIER_COLUMNS`."""
    rows = []
    for mode, m in analysis.modes.items():
        norms = m.detect_patch_norms
        share = float((norms > analysis.threshold).mean()) if norms.size and math.isfinite(analysis.threshold) \
            else math.nan
        has_register = m.num_registers > 0
        rows.append({
            "mode": mode,
            "patch_share_above_threshold": share,
            "mean_max_patch_norm": _mean(norms.max(axis=1)) if norms.size else math.nan,
            "register_norm": _mean(m.register_norms) if has_register else math.nan,
            "cls_attention_entropy": _mean(m.cls_entropy),
            "cls_attention_on_register": _mean(m.cls_on_register) if has_register else math.nan,
        })
    return pd.DataFrame(rows, columns=list(OUTLIER_COLUMNS))


def layer_curve_table(analysis: Analysis) -> pd.DataFrame:
    """Per mode and layer: mean over images of the largest image-patch norm and of the largest
    CLS -> image-patch attention (the data behind ``figures/layer_curves.png``)."""
    frames = []
    for mode, m in analysis.modes.items():
        frames.append(pd.DataFrame({
            "mode": mode,
            "layer": np.arange(analysis.num_layers),
            "mean_max_patch_norm": m.max_patch_norm.mean(axis=0) if len(m.max_patch_norm) else math.nan,
            "mean_max_cls_patch_attention": (m.max_cls_patch_attention.mean(axis=0)
                                             if len(m.max_cls_patch_attention) else math.nan),
        }))
    return pd.concat(frames, ignore_index=True)


def _cell(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def outlier_effect(table: pd.DataFrame) -> str:
    """One sentence: the outlier effect of ttr in numbers (share of patches above threshold, CLS
    attention entropy and share on the register)."""
    rows = table.set_index("mode")
    if BASELINE not in rows.index or TTR not in rows.index:
        return ""
    before, after = rows.loc[BASELINE], rows.loc[TTR]
    return (f"Outlier effect: the share of image patches above the norm threshold goes from "
            f"{_cell(before['patch_share_above_threshold'] * 100, 1)}% (no-ttr) to "
            f"{_cell(after['patch_share_above_threshold'] * 100, 1)}% (ttr); the last layer's CLS attention "
            f"entropy over patches from {_cell(before['cls_attention_entropy'], 2)} to "
            f"{_cell(after['cls_attention_entropy'], 2)} nats, with {_cell(after['cls_attention_on_register'] * 100, 1)}% "
            "of the CLS attention on the test-time register.")


def outlier_markdown(analysis: Analysis, table: pd.DataFrame) -> str:
    """The outlier table as a Markdown section."""
    patches = analysis.grid[0] * analysis.grid[1]
    max_entropy = math.log(patches)
    lines = [
        "## Outlier tokens and attention",
        "",
        f"Over {len(analysis.labels)} test images (a fixed, seeded subset). Detect layer "
        f"{analysis.detect_layer} (0-based) of {analysis.num_layers}, norm threshold {analysis.threshold:.4g}; "
        f"ttr: {analysis.num_registers} test-time register(s), intervened layers {analysis.intervened_layers}.",
        "",
        "| mode | patches above threshold | mean max patch norm | register norm | "
        "CLS attention entropy (nats) | CLS attention on register |",
        "|---|---|---|---|---|---|",
    ]
    for _, row in table.iterrows():
        lines.append(
            f"| {row['mode']} | {_cell(row['patch_share_above_threshold'] * 100, 2)}% "
            f"| {_cell(row['mean_max_patch_norm'], 1)} | {_cell(row['register_norm'], 1)} "
            f"| {_cell(row['cls_attention_entropy'])} | {_cell(row['cls_attention_on_register'])} |")
    lines += [
        "",
        "Image patches exclude CLS, trained registers and test-time registers. Patches above threshold: "
        "share of image patches whose norm at the detect layer exceeds the threshold. Mean max patch norm: "
        "per image the largest image-patch norm at the detect layer, averaged. Register norm: the test-time "
        "register's norm at the detect layer (n/a without a register). Entropy: the last layer's CLS "
        "attention renormalised over the image patches, averaged over heads and images "
        f"(uniform attention gives ln {patches} = {max_entropy:.2f}). "
        "CLS attention on register: the share of the last layer's CLS attention that lands on the "
        f"test-time register(s), averaged over heads and images (n/a without a register; uniform over all "
        f"tokens would give about {1 / (patches + 2):.3f}).",
    ]
    for note in analysis.notes:
        lines += ["", f"Note: {note}."]
    return "\n".join(lines)


def analysis_paths(test_paths: Sequence[str], count: int, seed: int) -> list[str]:
    """The first ``count`` of a seeded permutation of the (sorted) test images."""
    ordered = sorted(test_paths)
    order = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in order[:count]]
