"""``--demo``: the whole pipeline on generated data with a planted model (docs/demo.md).

The data is written in the layout most users have of the script's dataset (APTOS three-way
Kaggle release, OrthoNet Kaggle CSVs, Pacemaker Train/Test folders), so the real loader reads it;
the backbone is a small planted-register model of the chosen model's structure (its family, token
layout, MLP type and trained registers).  Nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
