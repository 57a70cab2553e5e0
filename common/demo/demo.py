"""``--demo``: the whole pipeline on generated data with a planted model (docs/demo.md).

The data is written in the layout most users have of the script's dataset (APTOS three-way
Kaggle release, OrthoNet Kaggle CSVs, Pacemaker Train/Test folders), so the real loader reads it;
the backbone is a small planted-register model of the chosen model's structure (its family, token
layout, MLP type and trained registers).  Nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from common.demo.fixture import PlantedModel, fixture_config, make_planted_model

log = logging.getLogger(__name__)

# Enough images per class for a probe to learn, few enough for a one-minute run on 2 cores.
DEMO_IMAGES_PER_CLASS = 40
DEMO_IMAGE_SIZE = 64
DEMO_FOLDER = "synthetic_data"
# The demo's run settings (recorded in config.json; --set still overrides them): the planted
# model is tiny, so decoding workers cost more than they save; the synthetic classes are
# separable, so the probe's validation loss keeps falling as long as the cosine schedule leaves
# it a learning rate - with 1500 epochs early stopping fires (the probe converges) at ~1430.
# Three probe refits (20 in a real run) show the refit statistics at a fraction of the cost.
DEMO_SETTINGS = {"num_workers": 0, "probe_max_epochs": 1500, "probe_refits": 3}
# Under ttr the register must take at least this many times a token's uniform share of the CLS
# attention for the demo to count as "attention moved" (the planted sinks give about 20 times).
ATTENTION_FACTOR = 5


def demo_defaults(model: str) -> dict:
    """Config values a demo runs with before ``--set`` applies: the fixture's and the demo's."""
    return {**fixture_config(model), **DEMO_SETTINGS}


def demo_data_at(dataset: str, folder: Path, seed: int) -> Path:
    """A demo's synthetic dataset in ``folder`` (reused when already complete)."""
    from common.demo.synthetic import make_synthetic

    root = make_synthetic(dataset, Path(folder), per_class=DEMO_IMAGES_PER_CLASS, image_size=DEMO_IMAGE_SIZE,
                          seed=seed)
    log.info("demo: synthetic %s data in %s", dataset, root)
    return root


def demo_data(dataset: str, out: Path, seed: int) -> Path:
    """The synthetic dataset of a demo run, under its output folder."""
    return demo_data_at(dataset, Path(out) / DEMO_FOLDER, seed)


def demo_model(model: str, seed: int, precision: str = "fp32") -> PlantedModel:
    """The planted model of ``--model model``'s structure a demo runs."""
    return make_planted_model(model, seed=seed, precision=precision)


def demo_check(planted: list[tuple[int, int]], ranked: list[tuple[int, int, float]], outliers: pd.DataFrame | None,
               threshold: float, tokens: int) -> list[str]:
    """What a correct demo shows and whether this run shows it, as Markdown lines for its summary.

    A correct demo shows three things (docs/demo.md): detection ranks the ``planted`` (layer, neuron)
    pairs first in ``ranked``; under ttr no image patch stays above the norm ``threshold`` at the
    detect layer while the register's norm rises above it (``outliers``: outliers.csv); and the
    last layer's CLS attention leaves the sinks: its entropy over the patches rises and the register
    takes far more than a token's uniform share (1 / ``tokens``) of it.
    """
    position = {(int(layer), int(neuron)): rank for rank, (layer, neuron, _) in enumerate(ranked, start=1)}
    ranks = [position.get((int(layer), int(neuron))) for layer, neuron in planted]
    first = bool(planted) and sorted(r for r in ranks if r is not None) == list(range(1, len(planted) + 1))
    shown = ", ".join(f"({layer}, {neuron}) rank {rank if rank is not None else 'absent'}"
                      for (layer, neuron), rank in zip(planted, ranks))
    checks = [(first, "detection ranks the planted register neurons first", shown)]
    if outliers is None or not {"no-ttr", "ttr"} <= set(outliers.index):
        checks.append((None, "ttr moves the outlier tokens onto the register", "not measured (analysis_images = 0)"))
        checks.append((None, "ttr moves the CLS attention off the outlier patches", "not measured"))
    else:
        no, ttr = outliers.loc["no-ttr"], outliers.loc["ttr"]
        moved = (no["patch_share_above_threshold"] > 0 and ttr["patch_share_above_threshold"] == 0
                 and ttr["register_norm"] > threshold)
        checks.append((bool(moved), "ttr moves the outlier tokens onto the register",
                       f"image patches above the norm threshold {threshold:g}: {no['patch_share_above_threshold']:.1%} "
                       f"no-ttr, {ttr['patch_share_above_threshold']:.1%} ttr; the register's norm "
                       f"{ttr['register_norm']:.1f}, the largest patch norm {no['mean_max_patch_norm']:.1f} -> "
                       f"{ttr['mean_max_patch_norm']:.1f} (means over images)"))
        uniform = 1 / tokens
        attention = (ttr["cls_attention_entropy"] > no["cls_attention_entropy"]
                     and ttr["cls_attention_on_register"] > ATTENTION_FACTOR * uniform)
        checks.append((bool(attention), "ttr moves the CLS attention off the outlier patches",
                       f"the last layer's CLS attention entropy over the patches {no['cls_attention_entropy']:.2f} -> "
                       f"{ttr['cls_attention_entropy']:.2f} nats; the register takes "
                       f"{ttr['cls_attention_on_register']:.1%} of it (a token's uniform share: {uniform:.1%})"))
    lines = ["**What a correct demo shows, and this run:**", ""]
    lines += [f"- {what}: {'yes' if ok else 'NO' if ok is False else 'not checked'} ({detail})"
              for ok, what, detail in checks]
    failed = [what for ok, what, _ in checks if ok is False]
    if failed:
        lines += ["", f"This run does not show that {'; nor that '.join(failed)}: the tool is not working as it "
                  "should here; please report it with this summary and config.json."]
    elif any(ok is None for ok, _, _ in checks):
        lines += ["", "This run shows what was checked (with analysis_images above 0 the rest is checked too)."]
    else:
        lines += ["", "This run shows what a correct demo shows."]
    return lines
