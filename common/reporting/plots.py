"""The analysis of a run written out: ``outliers.csv`` and the figures (``figures/*.png``), drawn
from a :class:`common.evaluation.analysis.Analysis` (:func:`write_outputs`).

* ``norm_maps_<k>.png``: image-patch norm map of every layer (or 12 evenly spaced ones, plus
  the detect layer, for deeper models), no-ttr beside ttr, one colour scale shared by the two
  modes in each row, with the input image as the model sees it.
* ``attention_maps_<k>.png``: CLS attention on the image patches at the detect layer and the
  last layer, head mean and heads (at most four: the most concentrated), no-ttr above ttr with
  one colour scale per pair.
* ``layer_curves.png``: mean over images of the largest image-patch norm and of the largest
  CLS -> image-patch attention per layer, both modes, detect layer, threshold and intervened
  layers marked.
* ``norm_histogram.png``: image-patch and register norms at the detect layer under ttr, no-ttr
  patch norms for reference, threshold line, log-scale counts.
* ``localization.png`` (:func:`localization_maps`, runs with object masks): the last layer's CLS
  attention upsampled onto the image with the mask's contour, no-ttr beside ttr.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.ticker
import numpy as np
from matplotlib.patches import Rectangle

from common.evaluation.analysis import (
    Analysis,
    layer_curve_table,
    outlier_markdown,
    outlier_table,
)
from common.evaluation.localization import image_metrics, upsample
from common.io import write_csv
from common.registers.modes import BASELINE, TTR
from common.reporting.figures import COLOURS, plt, save_png

MAX_MAP_LAYERS = 12
MAX_HEADS_SHOWN = 4
NORM_CMAP = "viridis"
ATTENTION_CMAP = "inferno"


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


def _layer_tag(analysis: Analysis, layer: int) -> str:
    tags = []
    if layer == analysis.detect_layer:
        tags.append("detect")
    if layer in analysis.intervened_layers:
        tags.append("intervened")
    return f"layer {layer}" + (f"\n({', '.join(tags)})" if tags else "")


# --------------------------------------------------------------------------------------------


def _pair_scale(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """One colour scale for a no-ttr/ttr pair, from the pair's own minimum (not from zero: flat
    maps far from zero would otherwise come out as one colour)."""
    low, high = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    return (low, high) if high > low else (low, low + max(abs(low), 1e-12) * 1e-3)


def norm_maps(analysis: Analysis, index: int, path: Path) -> None:
    """Patch-norm maps of figure image ``index``: rows = layers, columns no-ttr | ttr."""
    layers = map_layers(analysis.num_layers, analysis.detect_layer)
    no, ttr = analysis.modes[BASELINE].figure_norms[index], analysis.modes[TTR].figure_norms[index]
    grid = analysis.grid
    n = len(layers)
    fig = plt.figure(figsize=(5.4, 2.0 * (n + 1) + 1.0), layout="constrained")
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
        vmin, vmax = _pair_scale(no[layer], ttr[layer])
        axes = [fig.add_subplot(spec[row, 0]), fig.add_subplot(spec[row, 1])]
        for ax, mode, values in zip(axes, (BASELINE, TTR), (no[layer], ttr[layer])):
            image = _map_axes(ax, values, vmin, vmax, NORM_CMAP)
            ax.set_title(f"{mode}: max {values.max():.3g}", fontsize=9)
        axes[0].set_ylabel(_layer_tag(analysis, layer), fontsize=9,
                           fontweight="bold" if layer == analysis.detect_layer else "normal")
        bar = fig.colorbar(image, cax=fig.add_subplot(spec[row, 2]))
        bar.ax.tick_params(labelsize=7)
        bar.locator = matplotlib.ticker.MaxNLocator(4)
        bar.update_ticks()
        bar.set_label("L2 norm", fontsize=8)
    fig.suptitle(f"Image-patch norms per layer, no-ttr vs ttr\n{_wrap(analysis.figure_labels[index], 60)}\n"
                 "(one colour scale per row, shared by no-ttr and ttr)", fontsize=10)
    save_png(fig, path)


def _shown_heads(no: np.ndarray, limit: int) -> list[int]:
    """The heads to draw: all when few, else the ``limit`` whose no-ttr attention is most
    concentrated (lowest entropy), where a sink shows first."""
    heads = no.shape[0]
    if heads <= limit:
        return list(range(heads))
    flat = no.reshape(heads, -1)
    p = flat / np.clip(flat.sum(axis=1, keepdims=True), 1e-30, None)
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1)
    return sorted(np.argsort(entropy)[:limit].tolist())


def attention_maps(analysis: Analysis, index: int, path: Path) -> None:
    """CLS attention on the image patches at the detect layer and the last layer: per layer a
    no-ttr row above a ttr row; columns = head mean and the heads drawn; one colour scale per
    (no-ttr, ttr) pair."""
    no_mode, ttr_mode = analysis.modes[BASELINE], analysis.modes[TTR]
    last = analysis.num_layers - 1
    layer_names = ([f"detect layer {analysis.detect_layer}", f"last layer {last}"] if analysis.detect_layer != last
                   else [f"last layer {last} (the detect layer)"])
    heads = _shown_heads(no_mode.figure_cls_attention[index, 1], MAX_HEADS_SHOWN)
    columns = ["mean"] + heads
    uniform = 1.0 / (analysis.grid[0] * analysis.grid[1])
    # per layer: no-ttr row, ttr row, colour bars; a spacer row between two layers
    ratios = [1, 1, 0.1, 0.3, 1, 1, 0.1][: 7 if len(layer_names) == 2 else 3]
    fig = plt.figure(figsize=(2.05 * (len(columns) + 1), 1.2 + 4.4 * len(layer_names)))
    spec = fig.add_gridspec(len(ratios), len(columns) + 1, height_ratios=ratios, hspace=0.5, wspace=0.15)
    for block, layer_name in enumerate(layer_names):
        top_row, bottom_row, bar_row = 4 * block, 4 * block + 1, 4 * block + 2
        no = no_mode.figure_cls_attention[index, block]            # [H, r, c]
        ttr = ttr_mode.figure_cls_attention[index, block]
        on_register = ttr_mode.figure_cls_on_register[index, block]  # [H]
        ax = fig.add_subplot(spec[top_row, 0])
        _image_axes(ax, analysis.figure_inputs[index], analysis.grid)
        ax.set_title("input", fontsize=9)
        ax.set_ylabel(f"{layer_name}\nno-ttr", fontsize=9)
        ax = fig.add_subplot(spec[bottom_row, 0])
        ax.axis("off")
        ax.text(0.5, 0.5, f"{layer_name}\n\ntop: no-ttr\nbottom: ttr\n\nCLS attention\nprobability per\n"
                "image patch;\ncyan tick: uniform\n1/P", ha="center", va="center", fontsize=8,
                transform=ax.transAxes)
        for column, head in enumerate(columns, start=1):
            if head == "mean":
                a, b, share, label = no.mean(axis=0), ttr.mean(axis=0), float(on_register.mean()), "head mean"
            else:
                a, b, share, label = no[head], ttr[head], float(on_register[head]), f"head {head}"
            vmin, vmax = _pair_scale(a, b)
            top, bottom = fig.add_subplot(spec[top_row, column]), fig.add_subplot(spec[bottom_row, column])
            _map_axes(top, a, vmin, vmax, ATTENTION_CMAP)
            image = _map_axes(bottom, b, vmin, vmax, ATTENTION_CMAP)
            top.set_title(f"{label}, no-ttr\non patches {a.sum():.0%}", fontsize=8)
            bottom.set_title(f"ttr: patches {b.sum():.0%}\nregister {share:.0%}", fontsize=8)
            cax = fig.add_subplot(spec[bar_row, column])
            bar = fig.colorbar(image, cax=cax, orientation="horizontal")
            bar.ax.tick_params(labelsize=6.5, rotation=0)
            bar.locator = matplotlib.ticker.MaxNLocator(2)
            bar.formatter = matplotlib.ticker.FormatStrFormatter("%.2g")
            bar.update_ticks()
            if vmin <= uniform <= vmax:
                bar.ax.axvline(uniform, color="cyan", linewidth=2)
    fig.suptitle("CLS attention per head, no-ttr above ttr, at the detect layer and the last layer\n"
                 f"{_wrap(analysis.figure_labels[index], 80)}", fontsize=10, y=0.995)
    fig.subplots_adjust(top=1 - 0.8 / fig.get_figheight(), bottom=0.03, left=0.04, right=0.99)
    save_png(fig, path)


def _wrap(text: str, width: int) -> str:
    """A long relative path broken onto lines of at most ``width`` characters."""
    return "\n".join(text[i:i + width] for i in range(0, len(text), width)) or text


def _mark_layers(ax, analysis: Analysis) -> None:
    for k, layer in enumerate(analysis.intervened_layers):
        ax.axvspan(layer - 0.5, layer + 0.5, color="tab:purple", alpha=0.12,
                   label="intervened layer" if k == 0 else None)
    ax.axvline(analysis.detect_layer, color="0.35", linestyle=":", linewidth=1.5,
               label=f"detect layer ({analysis.detect_layer})")


def layer_curves(analysis: Analysis, path: Path) -> None:
    """Mean over images of the per-image largest patch norm and CLS -> patch attention per layer."""
    layers = np.arange(analysis.num_layers)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.6))
    series = (("max_patch_norm", "largest image-patch norm"),
              ("max_cls_patch_attention", "largest CLS -> image-patch attention"))
    for ax, (attribute, label) in zip(axes, series):
        _mark_layers(ax, analysis)
        for mode, result in analysis.modes.items():
            values = getattr(result, attribute)                        # [n, L]
            if not len(values):
                continue
            low, high = np.percentile(values, [10, 90], axis=0)
            ax.fill_between(layers, low, high, color=COLOURS.get(mode, "tab:gray"), alpha=0.15, linewidth=0)
            style = ({"linestyle": "-", "linewidth": 2.4, "marker": "o", "markersize": 5} if mode == BASELINE
                     else {"linestyle": "--", "linewidth": 1.6, "marker": "s", "markersize": 3.5})
            ax.plot(layers, values.mean(axis=0), color=COLOURS.get(mode, "tab:gray"),
                    label=f"{mode} (mean; band 10-90th pct)",
                    **style)
        ax.set_xlabel("layer (0-based block output)")
        ax.set_ylabel(f"{label}\n(mean over {len(analysis.labels)} images)")
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
    save_png(fig, path)


def norm_histogram(analysis: Analysis, path: Path) -> None:
    """Image-patch vs register norms at the detect layer under ttr (no-ttr patches for reference)."""
    no, ttr = analysis.modes[BASELINE], analysis.modes[TTR]
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
    ax.hist(values, bins=bins, histtype="step", linewidth=1.6, color=COLOURS[BASELINE],
            label=f"no-ttr image patches (n={values.size})")
    values = data["ttr image patches"]
    ax.hist(values, bins=bins, alpha=0.55, color=COLOURS[TTR], label=f"ttr image patches (n={values.size})")
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
                 f"{len(analysis.labels)} test images", fontsize=10)
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def localization_maps(inputs: np.ndarray, masks: np.ndarray, maps: dict[str, np.ndarray], labels: list[str],
                      path: Path) -> None:
    """One row per image (``inputs [F, H, W, 3]`` in [0, 1], ``masks bool [F, H, W]``), one column per mode
    (``maps``: mode -> ``[F, rows, cols]``, no-ttr first): the attention upsampled as the metrics see
    it, over the image, one colour scale per row; the mask's contour (cyan), the region above the
    attention's mean that the IoU uses (white, dashed) and the attention's maximum (white cross)."""
    modes = list(maps)
    count = len(inputs)
    fig, axes = plt.subplots(count, len(modes) + 1, figsize=(3.1 * (len(modes) + 1) + 0.6, 3.0 * count + 0.5),
                             squeeze=False, layout="constrained")
    for i in range(count):
        mask = masks[i]
        upsampled = upsample(np.stack([maps[mode][i] for mode in modes]), mask.shape)
        scale = (0.0, float(upsampled.max()))
        ax = axes[i, 0]
        ax.imshow(inputs[i], interpolation="nearest")
        ax.contour(mask, levels=[0.5], colors="cyan", linewidths=1.2)
        ax.set_title(f"input, mask contour (cyan)\n{_wrap(labels[i], 34)}", fontsize=8)
        for ax, mode, attention in zip(axes[i, 1:], modes, upsampled):
            metrics = image_metrics(attention, mask)
            ax.imshow(inputs[i].mean(axis=-1), cmap="gray", interpolation="nearest")
            image = ax.imshow(attention, cmap=ATTENTION_CMAP, alpha=0.65, vmin=scale[0], vmax=scale[1],
                              interpolation="nearest")
            ax.contour(mask, levels=[0.5], colors="cyan", linewidths=1.2)
            ax.contour(attention > attention.mean(), levels=[0.5], colors="white", linewidths=0.9,
                       linestyles="dashed")
            row, col = np.unravel_index(int(np.argmax(attention)), attention.shape)
            ax.plot(col, row, marker="x", color="white", markersize=9, markeredgewidth=2, clip_on=False, zorder=10)
            ax.set_title(f"{mode}: energy in mask {metrics['energy_in_mask']:.2f}\n"
                         f"max inside: {'yes' if metrics['pointing_hit'] else 'no'}, IoU {metrics['iou']:.2f}",
                         fontsize=8)
        bar = fig.colorbar(image, ax=list(axes[i, 1:]), fraction=0.05, pad=0.02)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("attention (per pixel)", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Last-layer CLS attention (head mean, over the image patches) and the object mask, "
                 + " beside ".join(modes), fontsize=10)
    save_png(fig, path)


def write_figures(analysis: Analysis, folder: Path) -> list[tuple[str, str]]:
    """Every figure under ``folder``; returns ``(file name, one-line caption)`` in summary order."""
    folder = Path(folder)
    figures: list[tuple[str, str]] = []
    if len(analysis.labels):
        layer_curves(analysis, folder / "layer_curves.png")
        figures.append(("layer_curves.png",
                        "Per layer, mean over test images of the largest image-patch norm (left) and the largest "
                        "CLS -> image-patch attention (right), per mode; band = 10th-90th percentile."))
        norm_histogram(analysis, folder / "norm_histogram.png")
        figures.append(("norm_histogram.png",
                        f"Token norms at the detect layer {analysis.detect_layer}: ttr image patches and register "
                        "token(s), no-ttr image patches for reference; dashed line = threshold."))
    for index in range(len(analysis.figure_inputs)):
        label = analysis.figure_labels[index]
        norm_maps(analysis, index, folder / f"norm_maps_{index + 1}.png")
        figures.append((f"norm_maps_{index + 1}.png",
                        f"Image-patch norm maps per layer for {label}, no-ttr beside ttr (colour scale shared per row)."))
        attention_maps(analysis, index, folder / f"attention_maps_{index + 1}.png")
        figures.append((f"attention_maps_{index + 1}.png",
                        f"CLS attention at the detect layer and the last layer for {label}: head mean and heads, "
                        "no-ttr above ttr (one colour scale per pair)."))
    return figures


def write_outputs(analysis: Analysis, out: Path) -> list[str]:
    """``outliers.csv``, ``figures/*.png`` (and ``figures/layer_curves.csv``) under ``out``;
    returns the summary sections (outlier table, then the figures with captions)."""
    out = Path(out)
    table = outlier_table(analysis)
    write_csv(out / "outliers.csv", table)
    write_csv(out / "figures" / "layer_curves.csv", layer_curve_table(analysis))
    figures = write_figures(analysis, out / "figures")
    lines = ["## Figures", ""]
    for name, caption in figures:
        lines += [f"![{caption}](figures/{name})", "", f"*{caption}*", ""]
    return [outlier_markdown(analysis, table), "\n".join(lines).rstrip()]
