"""``--demo``: the whole pipeline on generated data with a planted model (SPEC §8).

The data is written in the real layout of the script's dataset, so the real loader reads it;
the backbone is the planted-register fixture of the chosen family.  Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging

from common.fixture import fixture_config, make_planted_model
from common.options import DatasetSpec
from common.run import execute
from common.synthetic import make_synthetic

log = logging.getLogger(__name__)

# Enough images per class for a probe to learn, few enough for a one-minute run on 2 cores.
DEMO_IMAGES_PER_CLASS = 40
DEMO_IMAGE_SIZE = 64
# The demo's run settings (recorded in config.json; --set still overrides them): the planted
# model is tiny, so decoding workers cost more than they save, and a shorter probe schedule
# keeps the demo near a minute.
DEMO_SETTINGS = {"num_workers": 0, "probe_max_epochs": 60}


def run_demo(spec: DatasetSpec, args: argparse.Namespace, argv: list[str]) -> None:
    from common.cli import resolve

    options, config = resolve(spec, args, argv, defaults={**fixture_config(args.model), **DEMO_SETTINGS})
    options.demo = True
    options.weights = None
    if options.image_path is None:
        options.image_path = str(make_synthetic(
            spec.name, options.out / "synthetic_data", per_class=DEMO_IMAGES_PER_CLASS,
            image_size=DEMO_IMAGE_SIZE, seed=config["seed"]))
    log.info("demo: synthetic %s data in %s", spec.name, options.image_path)
    planted = make_planted_model(args.model, seed=config["seed"])
    execute(spec, options, config, planted_model=planted)
