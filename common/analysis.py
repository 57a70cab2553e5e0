"""Outlier statistics and figures of a run: what the high-norm tokens do, no-ttr beside ttr.

One pass over a fixed, seeded subset of the TEST images per mode (``no-ttr``: R = 0, no
intervention; ``ttr``: R = ``num_registers`` with the register-neuron intervention), in
batches, keeping only per-image reductions (never the activations themselves):

* per layer, the largest **image-patch** norm (L2 norm of the block output) per image;
* per layer, the largest CLS -> image-patch attention per image: the maximum over heads *and*
  image patches of the post-softmax CLS attention row (raw probabilities, not renormalised;
  the single most-attended patch in any head);
* at the detect layer (``detect_outliers_layer``), every image-patch norm and the test-time
  register norms (for the histogram and ``patch_share_above_threshold``);
* in the last layer, per image: the entropy of the CLS attention over image patches
  (renormalised over the image patches, natural log, averaged over heads; the maximum is
  ln P for P patches) and the share of CLS attention on the test-time register token(s)
  (summed over registers, averaged over heads);
* for the first ``figure_images`` images only: the image-patch norm map of every layer and the
  last layer's CLS attention map per head (for :mod:`common.plots`).

"Image patches" are ``HookedViT.token_layout(R)["patches"]``: CLS, the trained registers of
``*_reg`` models and the test-time registers are all left out.

``outliers.csv`` (one row per mode, SPEC §7):

==============================  ==============================================================
``patch_share_above_threshold``  share of image patches (all analysis images pooled) whose norm
                                 at the detect layer is **> threshold** (as in detection)
``mean_max_patch_norm``          mean over images of the largest image-patch norm at the detect layer
``register_norm``                mean over images and registers of the test-time register norm at
                                 the detect layer; NaN for no-ttr (there is no register token)
``cls_attention_entropy``        last-layer CLS attention entropy over image patches (nats)
``cls_attention_on_register``    last-layer share of CLS attention on the register token(s);
                                 NaN for no-ttr (there is no register token to attend to)
==============================  ==============================================================
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common.backbones import Backbone
from common.features import MODES, image_loader
from common.hooks import Capture, HookedViT
from common.intervention import Intervention

log = logging.getLogger(__name__)

OUTLIER_COLUMNS = ("mode", "patch_share_above_threshold", "mean_max_patch_norm", "register_norm",
                   "cls_attention_entropy", "cls_attention_on_register")
# Every layer's block output is held during one forward; capping the batch keeps that small
# (ViT-L/14, 16 images: 24 x 16 x 257 x 1024 floats = 0.4 GB).
ANALYSIS_BATCH_CAP = 16


@dataclass
class ModeAnalysis:
    """Per-image reductions of one mode.  ``n`` images, ``L`` layers, ``P`` image patches,
    ``R`` test-time registers, ``H`` heads, ``F`` figure images, grid ``rows x cols``."""

    mode: str
    num_registers: int
    max_patch_norm: np.ndarray            # [n, L]  largest image-patch norm
    max_cls_patch_attention: np.ndarray   # [n, L]  largest CLS -> image-patch attention (max over heads, patches)
    detect_patch_norms: np.ndarray        # [n, P]  image-patch norms at the detect layer
    register_norms: np.ndarray            # [n, R]  test-time register norms at the detect layer
    cls_entropy: np.ndarray               # [n]     last layer, over image patches, mean over heads (nats)
    cls_on_register: np.ndarray           # [n]     last layer, share on the test-time registers, mean over heads
    cls_on_patches: np.ndarray            # [n]     last layer, share on the image patches, mean over heads
    figure_norms: np.ndarray              # [F, L, rows, cols] image-patch norm maps
    figure_cls_attention: np.ndarray      # [F, H, rows, cols] last-layer CLS attention on image patches
    figure_cls_on_register: np.ndarray    # [F, H] last-layer CLS attention share on the registers


@dataclass
class Analysis:
    """Everything the outlier table and the figures are drawn from."""

    paths: list[str]                      # analysis images, in the order used
    figure_inputs: np.ndarray             # [F, H_px, W_px, 3] in [0, 1], as the model sees them
    modes: dict[str, ModeAnalysis]
    threshold: float
    detect_layer: int                     # 0-based
    num_layers: int
    num_heads: int
    grid: tuple[int, int]
    num_registers: int
    intervened_layers: list[int]
    title: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def figure_paths(self) -> list[str]:
        return self.paths[: len(self.figure_inputs)]


# --------------------------------------------------------------------------------------------
# the pass


def _display_image(backbone: Backbone, tensor: torch.Tensor) -> np.ndarray:
    """A preprocessed ``[3, H, W]`` tensor back to an ``[H, W, 3]`` image in [0, 1] (undoing the
    preprocess's Normalize), so maps and image line up patch for patch."""
    x = tensor.detach().float().cpu()
    normalize = None
    for step in getattr(backbone.preprocess, "transforms", []):
        if type(step).__name__ == "Normalize":
            normalize = step
    if normalize is not None:
        mean = torch.as_tensor(normalize.mean, dtype=x.dtype)[:, None, None]
        std = torch.as_tensor(normalize.std, dtype=x.dtype)[:, None, None]
        x = x * std + mean
    else:
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def _run_mode(hooked: HookedViT, paths: Sequence[str], mode: str, num_registers: int,
              intervention: Intervention | None, detect_layer: int, figure_count: int,
              batch_size: int, num_workers: int, progress: bool) -> tuple[ModeAnalysis, list[np.ndarray]]:
    backbone = hooked.backbone
    depth = backbone.num_layers
    rows, cols = backbone.grid_size
    layout = hooked.token_layout(num_registers)
    patches, registers = layout["patches"], layout["registers"]
    last = depth - 1
    layers = tuple(range(depth))
    capture = Capture(residual=layers, cls_attention=layers)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (
        "max_norm", "max_att", "detect", "reg", "entropy", "on_reg", "on_patch", "fig_norm", "fig_att", "fig_reg")}
    inputs: list[np.ndarray] = []
    seen = 0
    loader = image_loader(paths, backbone.preprocess, batch_size, num_workers, backbone.device)
    for images in tqdm(loader, desc=f"analysis {mode}", unit="batch", leave=False, disable=not progress):
        batch = images.shape[0]
        _, cache = hooked.run(images.to(backbone.device), num_registers=num_registers,
                              intervention=intervention, capture=capture)
        norms = torch.stack([cache[("residual", l)].float().norm(dim=-1) for l in layers], dim=1)  # [B, L, N]
        patch_norms = norms[:, :, patches]                                                     # [B, L, P]
        parts["max_norm"].append(patch_norms.amax(dim=2).cpu().numpy())
        parts["detect"].append(patch_norms[:, detect_layer].cpu().numpy())
        parts["reg"].append(norms[:, detect_layer, registers].cpu().numpy())
        attention = torch.stack([cache[("cls_attention", l)].float() for l in layers], dim=1)   # [B, L, H, N]
        patch_attention = attention[..., patches]                                             # [B, L, H, P]
        parts["max_att"].append(patch_attention.amax(dim=(2, 3)).cpu().numpy())
        final = patch_attention[:, last]                                                      # [B, H, P]
        on_patches = final.sum(dim=-1)                                                        # [B, H]
        p = final / on_patches.clamp_min(1e-30)[..., None]
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)                            # [B, H]
        on_register = attention[:, last, :, registers].sum(dim=-1)                            # [B, H]
        parts["entropy"].append(entropy.mean(dim=1).cpu().numpy())
        parts["on_reg"].append(on_register.mean(dim=1).cpu().numpy())
        parts["on_patch"].append(on_patches.mean(dim=1).cpu().numpy())
        take = max(0, min(batch, figure_count - seen))
        if take:
            parts["fig_norm"].append(patch_norms[:take].reshape(take, depth, rows, cols).cpu().numpy())
            parts["fig_att"].append(final[:take].reshape(take, final.shape[1], rows, cols).cpu().numpy())
            parts["fig_reg"].append(on_register[:take].cpu().numpy())
            inputs.extend(_display_image(backbone, images[i]) for i in range(take))
        seen += batch
        del cache, norms, attention

    def cat(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts[key]) if parts[key] else np.zeros((0, *shape), np.float32)

    heads = backbone.num_heads
    result = ModeAnalysis(
        mode=mode, num_registers=num_registers,
        max_patch_norm=cat("max_norm", (depth,)), max_cls_patch_attention=cat("max_att", (depth,)),
        detect_patch_norms=cat("detect", (rows * cols,)), register_norms=cat("reg", (num_registers,)),
        cls_entropy=cat("entropy", ()), cls_on_register=cat("on_reg", ()), cls_on_patches=cat("on_patch", ()),
        figure_norms=cat("fig_norm", (depth, rows, cols)), figure_cls_attention=cat("fig_att", (heads, rows, cols)),
        figure_cls_on_register=cat("fig_reg", (heads,)),
    )
    return result, inputs


def analyse(
    backbone: Backbone,
    paths: Sequence[str],
    *,
    threshold: float,
    detect_layer: int,
    neurons: dict[int, list[int]],
    num_registers: int = 1,
    scale: float = 1.0,
    normal_values: str = "zero",
    intervention: Intervention | None = None,
    figure_images: int = 4,
    batch_size: int = ANALYSIS_BATCH_CAP,
    num_workers: int = 0,
    title: str = "",
    progress: bool = True,
) -> Analysis:
    """The analysis pass over ``paths`` (every image counts in the statistics; the first
    ``figure_images`` are also kept as maps), no-ttr then ttr.

    ``detect_layer`` may be negative (counts from the end).  ``intervention`` overrides the
    one built from ``neurons``, ``scale``, ``normal_values``.  A non-finite ``threshold`` is
    chosen from the no-ttr detect-layer norms (``common.detection.suggest_threshold``).
    """
    if num_registers < 1:
        raise ValueError("ttr needs at least one test-time register (num_registers >= 1)")
    hooked = HookedViT(backbone)
    detect_index = hooked.layer_index(detect_layer)
    if intervention is None:
        intervention = Intervention(neurons=dict(neurons), scale=float(scale), normal_values=normal_values)
    batch_size = max(1, min(int(batch_size), ANALYSIS_BATCH_CAP))
    figure_count = min(int(figure_images), len(paths))
    modes: dict[str, ModeAnalysis] = {}
    inputs: list[np.ndarray] = []
    for mode in MODES:
        registers, iv = (0, None) if mode == "no-ttr" else (num_registers, intervention)
        modes[mode], mode_inputs = _run_mode(hooked, paths, mode, registers, iv, detect_index, figure_count,
                                             batch_size, num_workers, progress)
        inputs = inputs or mode_inputs
    notes = []
    threshold = float(threshold) if threshold is not None else math.nan
    if not math.isfinite(threshold):
        from common.detection import suggest_threshold

        norms = modes["no-ttr"].detect_patch_norms.ravel()
        if norms.size:
            threshold, reason = suggest_threshold(norms)
            notes.append(f"no numeric register_norm_threshold was given; the analysis chose {threshold:.2f} "
                         f"from the no-ttr detect-layer patch norms ({reason})")
    rows, cols = backbone.grid_size
    return Analysis(
        paths=list(paths),
        figure_inputs=np.stack(inputs) if inputs else np.zeros((0, 1, 1, 3), np.float32),
        modes=modes, threshold=float(threshold), detect_layer=detect_index, num_layers=backbone.num_layers,
        num_heads=backbone.num_heads, grid=(rows, cols), num_registers=num_registers,
        intervened_layers=sorted(hooked.layer_index(l) for l, ids in intervention.neurons.items() if len(ids)),
        title=title, notes=notes,
    )


# --------------------------------------------------------------------------------------------
# tables


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else math.nan


def outlier_table(analysis: Analysis) -> pd.DataFrame:
    """``outliers.csv``: one row per mode (no-ttr, ttr), columns :data:`OUTLIER_COLUMNS`."""
    rows = []
    for mode in MODES:
        m = analysis.modes[mode]
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
    for mode in MODES:
        m = analysis.modes[mode]
        frames.append(pd.DataFrame({
            "mode": mode,
            "layer": np.arange(analysis.num_layers),
            "mean_max_patch_norm": m.max_patch_norm.mean(axis=0) if len(m.max_patch_norm) else math.nan,
            "mean_max_cls_patch_attention": (m.max_cls_patch_attention.mean(axis=0)
                                             if len(m.max_cls_patch_attention) else math.nan),
        }))
    return pd.concat(frames, ignore_index=True)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    frame.to_csv(temporary, index=False)
    os.replace(temporary, path)


def _cell(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def outlier_markdown(analysis: Analysis, table: pd.DataFrame) -> str:
    """The outlier table as a Markdown section."""
    max_entropy = math.log(analysis.grid[0] * analysis.grid[1])
    lines = [
        "## Outlier tokens and attention",
        "",
        f"Over {len(analysis.paths)} test images (a fixed, seeded subset). Detect layer "
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
        f"(uniform attention gives ln {analysis.grid[0] * analysis.grid[1]} = {max_entropy:.2f}). "
        "CLS attention on register: the share of the last layer's CLS attention that lands on the "
        "test-time register(s), averaged over heads and images (n/a without a register).",
    ]
    for note in analysis.notes:
        lines += ["", f"Note: {note}."]
    return "\n".join(lines)


def write_outputs(analysis: Analysis, out: Path) -> list[str]:
    """``outliers.csv``, ``figures/*.png`` (and ``figures/layer_curves.csv``) under ``out``;
    returns the summary sections (outlier table, then the figures with captions)."""
    from common import plots

    out = Path(out)
    table = outlier_table(analysis)
    _write_csv(table, out / "outliers.csv")
    _write_csv(layer_curve_table(analysis), out / "figures" / "layer_curves.csv")
    figures = plots.write_figures(analysis, out / "figures")
    lines = ["## Figures", ""]
    for name, caption in figures:
        lines += [f"![{caption}](figures/{name})", "", f"*{caption}*", ""]
    return [outlier_markdown(analysis, table), "\n".join(lines).rstrip()]


# --------------------------------------------------------------------------------------------
# the run's entry point


def analysis_paths(test_paths: Sequence[str], count: int, seed: int) -> list[str]:
    """The first ``count`` of a seeded permutation of the (sorted) test images."""
    ordered = sorted(test_paths)
    order = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in order[:count]]


def _run_threshold(ctx) -> float:
    """The threshold the run actually used: the detection's (also an ``auto`` choice), else the
    configured number, else NaN (chosen from the analysis norms)."""
    candidates = [getattr(ctx.detection, "threshold", None), ctx.config.get("register_norm_threshold")]
    for value in candidates:
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            return number
    return math.nan


def write_analysis(ctx) -> list[str]:
    """Run the analysis of a finished :class:`common.run.RunContext`; write ``outliers.csv`` and
    ``figures/``; return the summary sections."""
    from common.run import _intervention

    config = ctx.config
    table = ctx.dataset.table
    test_paths = table.loc[table["split"] == "test", "path"].tolist()
    count = min(len(test_paths), max(int(config["analysis_images"]), int(config["figure_images"])))
    if count == 0:
        return ["## Outlier tokens and attention\n\nSkipped: no test images (or analysis_images = 0)."]
    paths = analysis_paths(test_paths, count, int(config["seed"]))
    title = f"{ctx.spec.title}: {ctx.backbone.description}"
    analysis = analyse(
        ctx.backbone, paths, threshold=_run_threshold(ctx), detect_layer=int(config["detect_outliers_layer"]),
        neurons=ctx.selected, num_registers=int(config["num_registers"]), intervention=_intervention(ctx),
        figure_images=int(config["figure_images"]), batch_size=int(config["batch_size"]),
        num_workers=int(config["num_workers"]), title=title)
    sections = write_outputs(analysis, ctx.options.out)
    log.info("outliers.csv and %d figure(s) written", len(list((ctx.options.out / "figures").glob("*.png"))))
    return sections
