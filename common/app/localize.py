"""The attention localization of a run (docs/localization.md): the test images with an object mask, scored
from the last-layer CLS attention maps the analysis pass keeps (:mod:`common.evaluation.localization`);
``localization.csv``, ``figures/localization.png`` and what the summary says.

Masks come from the dataset (a manifest's ``mask`` column) and, in a demo, from the synthetic
data (:func:`common.demo.synthetic.synthetic_masks`).  Each mask is checked against its image's
size and brought to the model's input with the image's own resize and crop (nearest-neighbour:
:mod:`common.data.masks`) when it is scored, so nothing but the attention maps is cached: a changed
mask changes the numbers without a forward pass.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from common.app.runstate import RunState
from common.data.masks import mask_at_input, mask_steps
from common.demo.synthetic import synthetic_masks
from common.evaluation.analysis import Analysis
from common.evaluation.localization import (
    LOCALIZATION_COLUMNS,
    SUMMARY_COLUMNS,
    LocalizationResult,
    localization_summary,
    localize,
)
from common.io import write_csv
from common.registers.modes import BASELINE, TTR
from common.reporting.plots import localization_maps

log = logging.getLogger(__name__)

FIGURE = "localization.png"


def localization_paths(state: RunState) -> list[str]:
    """The test images that have an object mask, in the dataset's order (none for a model without
    a class token); a demo's synthetic masks are attached to the dataset first."""
    dataset = state.dataset
    if state.options.demo and not dataset.masks:
        dataset.masks.update(synthetic_masks(dataset.root, list(dataset.table["path"])))
    if not state.backbone.has_cls:
        return []
    return [p for p in state.split_paths("test") if p in dataset.masks]


def _maps(analysis: Analysis, labels: list[str]) -> dict[str, np.ndarray]:
    """mode -> ``[n, rows, cols]`` last-layer attention maps of the images ``labels``: from the
    analysis sample where they are in it, else from the extra images' lighter pass."""
    where = {label: (False, i) for i, label in enumerate(analysis.labels)}
    where.update({label: (True, i) for i, label in enumerate(analysis.extra_labels)})
    maps = {}
    for mode, result in analysis.modes.items():
        rows = [(result.extra_cls_attention if extra else result.last_cls_attention)[i]
                for extra, i in (where[label] for label in labels)]
        maps[mode] = np.asarray(rows, dtype=np.float64).reshape(len(labels), *analysis.grid)
    return maps


def _skipped(note: str) -> LocalizationResult:
    return LocalizationResult(pd.DataFrame(columns=list(LOCALIZATION_COLUMNS)),
                              pd.DataFrame(columns=list(SUMMARY_COLUMNS)), notes=[note])


def write_localization(state: RunState, analysis: Analysis) -> None:
    """Score the test images with a mask (``state.localization``; None when the dataset has no
    masks), write ``localization.csv`` and ``figures/localization.png``."""
    dataset, config, out = state.dataset, state.config, state.options.out
    state.localization = None
    paths = localization_paths(state)              # a demo's masks attached first
    if not dataset.masks:
        return
    if not state.backbone.has_cls:
        state.localization = _skipped("this model has no class token, and the tool reads no pooling query's "
                                      "attention: the localization is skipped")
        return
    if not paths:
        state.localization = _skipped(f"{len(dataset.masks)} image(s) have an object mask, none of them in the "
                                      "test split")
        return
    labels = [dataset.display(p) for p in paths]
    steps = mask_steps(state.bank.pil_steps)

    def mask_of(i: int) -> np.ndarray:
        return mask_at_input(dataset.masks[paths[i]], paths[i], steps, dataset.display)

    maps = _maps(analysis, labels)
    table, left_out = localize(labels, maps, mask_of)
    if left_out:
        log.warning("localization: %d test image(s) left out, their mask is empty after the preprocessing "
                    "(cropped away): %s", len(left_out), ", ".join(left_out[:5]))
    summary = localization_summary(table, n_boot=config["bootstrap_resamples"], n_perm=config["permutations"],
                                   seed=config["seed"])
    write_csv(out / "localization.csv", table)
    result = LocalizationResult(table, summary, left_out)
    dropped = set(left_out)
    kept = [i for i, label in enumerate(labels) if label not in dropped][:config["figure_images"]]
    if kept and BASELINE in maps and TTR in maps:
        inputs = state.bank.pixels([paths[i] for i in kept]).float().div(255).permute(0, 2, 3, 1).numpy()
        localization_maps(inputs, np.stack([mask_of(i) for i in kept]),
                          {mode: maps[mode][kept] for mode in (BASELINE, TTR)}, [labels[i] for i in kept],
                          out / "figures" / FIGURE)
        result.figures.append((FIGURE, "Last-layer CLS attention (head mean) upsampled onto test images with "
                                       "their object mask (cyan contour), no-ttr beside ttr; dashed: the "
                                       "region above the attention's mean (IoU); cross: its maximum."))
    state.localization = result
