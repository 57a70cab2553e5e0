"""Figures of a run (``figures/*.png``), drawn from a :class:`common.analysis.Analysis`.

* ``norm_maps_<k>.png``: image-patch norm map of every layer (or 12 evenly spaced ones, plus
  the detect layer, for deeper models), no-ttr beside ttr, one colour scale shared by the two
  modes in each row, with the input image as the model sees it.
* ``attention_maps_<k>.png``: the last layer's CLS attention on the image patches, per head and
  head mean, no-ttr above ttr with one colour scale per pair.
* ``layer_curves.png``: mean over images of the largest image-patch norm and of the largest
  CLS -> image-patch attention per layer, both modes, detect layer, threshold and intervened
  layers marked.
* ``norm_histogram.png``: image-patch and register norms at the detect layer under ttr, no-ttr
  patch norms for reference, threshold line, log-scale counts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from common.analysis import Analysis

DPI = 110
MAX_MAP_LAYERS = 12
ATTENTION_COLUMNS = 6
COLOURS = {"no-ttr": "tab:orange", "ttr": "tab:blue", "register": "tab:green"}
NORM_CMAP = "viridis"
ATTENTION_CMAP = "inferno"


def _save(fig, path: Path) -> None:
    """Atomic PNG write; the figure is always closed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(temporary, dpi=DPI, bbox_inches="tight", facecolor="white")
        os.replace(temporary, path)
    finally:
        plt.close(fig)
        temporary.unlink(missing_ok=True)


def map_layers(num_layers: int, detect_layer: int, limit: int = MAX_MAP_LAYERS) -> list[int]:
    """Every layer up to ``limit`` layers; else ``limit`` evenly spaced ones (first and last
    included) plus the detect layer."""
    if num_layers <= limit:
        return list(range(num_layers))
    chosen = set(np.linspace(0, num_layers - 1, limit).round().astype(int).tolist())
    chosen.add(detect_layer)
    return sorted(chosen)


def _extent(grid: tuple[int, int]) -> tuple[float, float, float, float]:
    rows, cols = grid
    return (-0.5, cols - 0.5, rows - 0.5, -0.5)


def _image_axes(ax, image: np.ndarray, grid: tuple[int, int]) -> None:
    """The input image stretched over the patch grid, so that a patch (r, c) sits at (c, r)."""
    ax.imshow(image, extent=_extent(grid), interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def _map_axes(ax, values: np.ndarray, vmin: float, vmax: float, cmap: str):
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return image


def _layer_tag(analysis: "Analysis", layer: int) -> str:
    tags = []
    if layer == analysis.detect_layer:
        tags.append("detect")
    if layer in analysis.intervened_layers:
        tags.append("intervened")
    return f"layer {layer}" + (f"\n({', '.join(tags)})" if tags else "")


# --------------------------------------------------------------------------------------------


def norm_maps(analysis: "Analysis", index: int, path: Path) -> None:
    """Patch-norm maps of figure image ``index``: rows = layers, columns no-ttr | ttr."""
    layers = map_layers(analysis.num_layers, analysis.detect_layer)
    no, ttr = analysis.modes["no-ttr"].figure_norms[index], analysis.modes["ttr"].figure_norms[index]
    grid = analysis.grid
    n = len(layers)
    fig = plt.figure(figsize=(5.2, 2.0 * (n + 1) + 0.9), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.06)
    spec = fig.add_gridspec(n + 1, 3, width_ratios=[1, 1, 0.07])

    ax = fig.add_subplot(spec[0, 0])
    _image_axes(ax, analysis.figure_inputs[index], grid)
    ax.set_title("input (as the model sees it)", fontsize=9)
    ax = fig.add_subplot(spec[0, 1])
    _image_axes(ax, analysis.figure_inputs[index], grid)
    detect = no[analysis.detect_layer]
    above = np.argwhere(detect > analysis.threshold) if math.isfinite(analysis.threshold) else []
    for r, c in above:
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_title(f"no-ttr patches > {analysis.threshold:.4g}\nat layer {analysis.detect_layer} (red): {len(above)}",
                 fontsize=9)

    for row, layer in enumerate(layers, start=1):
        vmin = float(min(no[layer].min(), ttr[layer].min()))
        vmax = float(max(no[layer].max(), ttr[layer].max()))
        axes = [fig.add_subplot(spec[row, 0]), fig.add_subplot(spec[row, 1])]
        for ax, mode, values in zip(axes, ("no-ttr", "ttr"), (no[layer], ttr[layer])):
            image = _map_axes(ax, values, vmin, vmax, NORM_CMAP)
            ax.set_title(f"{mode}: max {values.max():.3g}", fontsize=9)
        axes[0].set_ylabel(_layer_tag(analysis, layer), fontsize=9,
                           fontweight="bold" if layer == analysis.detect_layer else "normal")
        bar = fig.colorbar(image, cax=fig.add_subplot(spec[row, 2]))
        bar.ax.tick_params(labelsize=7)
        bar.set_label("norm", fontsize=8)
    name = Path(analysis.figure_paths[index]).name
    fig.suptitle(f"Image-patch norms per layer, no-ttr vs ttr\n{name}\n"
                 "(one colour scale per row, shared by no-ttr and ttr)", fontsize=10)
    _save(fig, path)


def attention_maps(analysis: "Analysis", index: int, path: Path) -> None:
    """Last-layer CLS attention on the image patches per head and head mean, no-ttr above ttr."""
    no_mode, ttr_mode = analysis.modes["no-ttr"], analysis.modes["ttr"]
    no, ttr = no_mode.figure_cls_attention[index], ttr_mode.figure_cls_attention[index]   # [H, r, c]
    on_register = ttr_mode.figure_cls_on_register[index]                                   # [H]
    heads = no.shape[0]
    panels = [("input", None)] + [(f"head {h}", h) for h in range(heads)] + [("head mean", "mean")]
    columns = min(ATTENTION_COLUMNS, len(panels))
    blocks = math.ceil(len(panels) / columns)
    # per block: the no-ttr row, the ttr row, and a spacer for the ttr row's colour bars
    fig = plt.figure(figsize=(2.15 * columns, 4.9 * blocks + 0.9))
    spec = fig.add_gridspec(blocks * 3, columns, hspace=0.3, wspace=0.12,
                            height_ratios=[1, 1, 0.3] * blocks)
    uniform = 1.0 / (analysis.grid[0] * analysis.grid[1])
    grid = analysis.grid
    for k, (label, head) in enumerate(panels):
        block, column = divmod(k, columns)
        top = fig.add_subplot(spec[3 * block, column])
        bottom = fig.add_subplot(spec[3 * block + 1, column])
        if head is None:
            _image_axes(top, analysis.figure_inputs[index], grid)
            top.set_title("input", fontsize=9)
            bottom.axis("off")
            bottom.text(0.5, 0.55, "top row: no-ttr\nbottom row: ttr\n\nraw CLS attention\nprobabilities on\n"
                        "image patches;\none colour scale\nper head (pair);\ncyan tick on the bar:\nuniform 1/P", ha="center", va="center",
                        fontsize=8, transform=bottom.transAxes)
            continue
        if head == "mean":
            a, b = no.mean(axis=0), ttr.mean(axis=0)
            share = float(on_register.mean())
        else:
            a, b = no[head], ttr[head]
            share = float(on_register[head])
        vmax = float(max(a.max(), b.max(), 1e-12))
        _map_axes(top, a, 0.0, vmax, ATTENTION_CMAP)
        image = _map_axes(bottom, b, 0.0, vmax, ATTENTION_CMAP)
        top.set_title(f"{label}: no-ttr\non patches {a.sum():.0%}", fontsize=8.5)
        bottom.set_title(f"ttr: on patches {b.sum():.0%}\non register {share:.0%}", fontsize=8.5)
        cax = bottom.inset_axes([0.0, -0.12, 1.0, 0.07])
        bar = fig.colorbar(image, cax=cax, orientation="horizontal")
        bar.ax.tick_params(labelsize=7)
        bar.locator = matplotlib.ticker.MaxNLocator(3)
        bar.update_ticks()
        if uniform <= vmax:
            bar.ax.axvline(uniform, color="cyan", linewidth=2)
        if column == 0:
            top.set_ylabel("no-ttr", fontsize=9)
            bottom.set_ylabel("ttr", fontsize=9)
    name = Path(analysis.figure_paths[index]).name
    fig.suptitle(f"CLS attention of the last layer (layer {analysis.num_layers - 1}) per head, no-ttr vs ttr\n{name}",
                 fontsize=10, y=0.995)
    fig.subplots_adjust(top=1 - 0.75 / fig.get_figheight())
    _save(fig, path)


def _mark_layers(ax, analysis: "Analysis") -> None:
    for k, layer in enumerate(analysis.intervened_layers):
        ax.axvspan(layer - 0.5, layer + 0.5, color="tab:purple", alpha=0.12,
                   label="intervened layer" if k == 0 else None)
    ax.axvline(analysis.detect_layer, color="0.35", linestyle=":", linewidth=1.5,
               label=f"detect layer ({analysis.detect_layer})")


def layer_curves(analysis: "Analysis", path: Path) -> None:
    """Mean over images of the per-image largest patch norm and CLS -> patch attention per layer."""
    layers = np.arange(analysis.num_layers)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.6))
    series = (("max_patch_norm", "largest image-patch norm"),
              ("max_cls_patch_attention", "largest CLS -> image-patch attention"))
    for ax, (attribute, label) in zip(axes, series):
        _mark_layers(ax, analysis)
        for mode in ("no-ttr", "ttr"):
            values = getattr(analysis.modes[mode], attribute)          # [n, L]
            if not len(values):
                continue
            low, high = np.percentile(values, [10, 90], axis=0)
            ax.fill_between(layers, low, high, color=COLOURS[mode], alpha=0.15, linewidth=0)
            style = ({"linestyle": "-", "linewidth": 2.4, "marker": "o", "markersize": 5} if mode == "no-ttr"
                     else {"linestyle": "--", "linewidth": 1.6, "marker": "s", "markersize": 3.5})
            ax.plot(layers, values.mean(axis=0), color=COLOURS[mode], label=f"{mode} (mean; band 10-90th pct)",
                    **style)
        ax.set_xlabel("layer (0-based block output)")
        ax.set_ylabel(f"{label}\n(mean over {len(analysis.paths)} images)")
        ax.set_title(label[0].upper() + label[1:] + " per layer", fontsize=10)
        ax.set_xticks(layers if len(layers) <= 16 else layers[::2])
        ax.grid(alpha=0.3)
    if math.isfinite(analysis.threshold):
        axes[0].axhline(analysis.threshold, color="black", linestyle="--", linewidth=1,
                        label=f"threshold {analysis.threshold:.4g} (applies at the detect layer)")
    uniform = 1.0 / (analysis.grid[0] * analysis.grid[1])
    axes[1].axhline(uniform, color="0.5", linestyle="-.", linewidth=1, label=f"uniform attention 1/P = {uniform:.3g}")
    axes[1].set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(axes[1].get_legend_handles_labels()[0][-1])
    labels.append(axes[1].get_legend_handles_labels()[1][-1])
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle("Layer curves: no-ttr vs ttr" + (f"\n{analysis.title}" if analysis.title else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    _save(fig, path)


def norm_histogram(analysis: "Analysis", path: Path) -> None:
    """Image-patch vs register norms at the detect layer under ttr (no-ttr patches for reference)."""
    no, ttr = analysis.modes["no-ttr"], analysis.modes["ttr"]
    data = {
        "no-ttr image patches": no.detect_patch_norms.ravel(),
        "ttr image patches": ttr.detect_patch_norms.ravel(),
        "ttr register token(s)": ttr.register_norms.ravel(),
    }
    everything = np.concatenate([v for v in data.values() if v.size] or [np.zeros(1)])
    top = float(max(everything.max(), analysis.threshold if math.isfinite(analysis.threshold) else 0)) * 1.05
    bins = np.linspace(0.0, max(top, 1e-6), 61)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    values = data["no-ttr image patches"]
    ax.hist(values, bins=bins, histtype="step", linewidth=1.6, color=COLOURS["no-ttr"],
            label=f"no-ttr image patches (n={values.size})")
    values = data["ttr image patches"]
    ax.hist(values, bins=bins, alpha=0.55, color=COLOURS["ttr"], label=f"ttr image patches (n={values.size})")
    values = data["ttr register token(s)"]
    ax.hist(values, bins=bins, alpha=0.85, color=COLOURS["register"],
            label=f"ttr register token(s) (n={values.size})")
    if math.isfinite(analysis.threshold):
        ax.axvline(analysis.threshold, color="black", linestyle="--", linewidth=1.2,
                   label=f"threshold {analysis.threshold:.4g}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    ax.set_xlim(0, bins[-1])
    ax.set_xlabel(f"token norm at the detect layer (layer {analysis.detect_layer})")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title(f"Image-patch and register norms at layer {analysis.detect_layer}, "
                 f"{len(analysis.paths)} test images", fontsize=10)
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def write_figures(analysis: "Analysis", folder: Path) -> list[tuple[str, str]]:
    """Every figure under ``folder``; returns ``(file name, one-line caption)`` in summary order."""
    folder = Path(folder)
    figures: list[tuple[str, str]] = []
    if len(analysis.paths):
        layer_curves(analysis, folder / "layer_curves.png")
        figures.append(("layer_curves.png",
                        "Per layer, mean over test images of the largest image-patch norm (left) and the largest "
                        "CLS -> image-patch attention (right), no-ttr vs ttr; band = 10th-90th percentile."))
        norm_histogram(analysis, folder / "norm_histogram.png")
        figures.append(("norm_histogram.png",
                        f"Token norms at the detect layer {analysis.detect_layer}: ttr image patches and register "
                        "token(s), no-ttr image patches for reference; dashed line = threshold."))
    for index in range(len(analysis.figure_inputs)):
        name = Path(analysis.figure_paths[index]).name
        norm_maps(analysis, index, folder / f"norm_maps_{index + 1}.png")
        figures.append((f"norm_maps_{index + 1}.png",
                        f"Image-patch norm maps per layer for {name}, no-ttr beside ttr (colour scale shared per row)."))
        attention_maps(analysis, index, folder / f"attention_maps_{index + 1}.png")
        figures.append((f"attention_maps_{index + 1}.png",
                        f"Last-layer CLS attention per head and head mean for {name}, no-ttr above ttr."))
    return figures
