#!/usr/bin/env python
"""What the attention localization costs (docs/localization.md), as ratios in one process.

    python benchmarks/localization.py --json benchmarks/results/localization.json
    python benchmarks/localization.py --images 4 --rounds 5                     # a quick look

open_clip ViT-B/16 (random weights: the timing does not depend on them; ``top_k`` random neurons
in layers <= ``highest_layer`` stand in for the register neurons) on the CPU, over ``--images``
synthetic fundus images of ``--size`` px with their object masks (``make_synthetic``).  Three
sides run on the same images, interleaved per round and every other round backwards (A B C C B A),
median over the rounds:

* ``analysis``: the analysis pass of a run (:func:`common.evaluation.analysis.analyse`, no-ttr and
  ttr, every layer's norms and CLS attention, which also keeps each image's last-layer map);
* ``localization``: the lighter pass for images outside the analysis sample (the last layer's CLS
  attention only, both modes: :func:`common.evaluation.localization.last_layer_attention`) plus the
  scoring below - what a test image with a mask costs when the analysis did not see it;
* ``scoring``: reading each mask, bringing it through the image's resize and crop, upsampling both
  maps and the metrics (:func:`~common.evaluation.localization.localize`), then the summary's
  bootstrap and permutation test (run defaults) - all a run adds for images the analysis saw.

=============================  ===========================================  ========
key                            side / side                                  target
=============================  ===========================================  ========
localization_over_analysis     localization / analysis, same images          none
scoring_over_analysis          scoring / analysis, same images               none
=============================  ===========================================  ========

No target in docs/performance.md: the numbers say what ``analysis_images`` and the share of test
images with masks cost.  Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import configs  # noqa: E402
from benchmarks.throughput import random_register_neurons  # noqa: E402
from benchmarks.timing import log, machine_info, summarise  # noqa: E402
from common.data.imagebank import split_preprocess  # noqa: E402
from common.data.masks import mask_at_input, mask_steps  # noqa: E402
from common.demo.synthetic import make_synthetic, synthetic_masks  # noqa: E402
from common.evaluation.analysis import ModeSetup, analyse  # noqa: E402
from common.evaluation.localization import last_layer_attention, localization_summary, localize  # noqa: E402
from common.models.backbone import load_backbone  # noqa: E402
from common.models.hooks import HookedViT  # noqa: E402
from common.registers.intervention import Intervention  # noqa: E402

MIN_ROUNDS = 5
RATIOS = {"localization_over_analysis": ("localization", "analysis"),
          "scoring_over_analysis": ("scoring", "analysis")}


def _data(folder: Path, count: int, size: int) -> list[tuple[str, str]]:
    """``count`` synthetic fundus images of ``size`` px and their object masks."""
    per_class = max(3, -(-count // 5))
    root = make_synthetic("aptos", folder, per_class=per_class, image_size=size, seed=3)
    images = sorted(str(p) for p in root.rglob("*.png") if ".masks" not in p.parts)
    masks = synthetic_masks(root, images)
    return [(image, masks[image]) for image in images if image in masks][:count]


def measure(count: int, size: int, rounds: int) -> dict:
    config = dict(configs.MODEL_CONFIGS["clip"])
    run = configs.RUN_DEFAULTS
    log("loading clip with random weights")
    backbone = load_backbone("clip", config, random_init=True, seed=0)
    hooked = HookedViT(backbone)
    pil_steps, mean, std, _ = split_preprocess(backbone.preprocess)
    with tempfile.TemporaryDirectory(prefix="ttr-loc-bench-") as folder:
        pairs = _data(Path(folder), count, size)
        pixels = torch.stack([torch.from_numpy(np.asarray(pil_steps(Image.open(image).convert("RGB")))
                                               .transpose(2, 0, 1).copy()) for image, _ in pairs])

        def normalise(batch: torch.Tensor) -> torch.Tensor:
            return batch.float().div(255).sub(mean[:, None, None]).div(std[:, None, None])

        registers = int(config["num_registers"])
        intervention = Intervention.from_config(random_register_neurons(backbone, config), config)
        modes = {"no-ttr": ModeSetup(0, []),
                 "ttr": ModeSetup(registers, intervention.fwd_hooks(hooked.token_layout(registers)))}
        labels = [Path(image).name for image, _ in pairs]
        steps = mask_steps(pil_steps)
        rows, cols = backbone.grid_size
        batch = min(count, 16)
        held: dict = {}

        def side_analysis():
            held["analysis"] = analyse(hooked, pixels, normalise, modes, labels=labels, threshold=float("nan"),
                                       detect_layer=config["detect_outliers_layer"], figure_images=0,
                                       batch_size=batch)

        def score(maps: dict[str, np.ndarray]) -> None:
            table, _ = localize(labels, {m: v.reshape(len(v), rows, cols) for m, v in maps.items()},
                                lambda i: mask_at_input(pairs[i][1], pairs[i][0], steps), progress=False)
            localization_summary(table, n_boot=run["bootstrap_resamples"], n_perm=run["permutations"],
                                 seed=run["seed"])

        def side_localization():
            score({mode: last_layer_attention(hooked, pixels, normalise, setup.num_registers, setup.fwd_hooks,
                                              batch, desc="bench") for mode, setup in modes.items()})

        def side_scoring():
            score({mode: result.last_cls_attention for mode, result in held["analysis"].modes.items()})

        sides = {"analysis": side_analysis, "localization": side_localization, "scoring": side_scoring}
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        with torch.no_grad():
            side_analysis()                                   # warm-up, and the maps the scoring reads
            side_localization()
            for r in range(rounds):
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                for name in order:
                    started = time.perf_counter()
                    sides[name]()
                    seconds[name].append(time.perf_counter() - started)
                log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in sides))
    ratios = {key: summarise([a / b for a, b in zip(seconds[top], seconds[bottom])])
              for key, (top, bottom) in RATIOS.items()}
    return {
        **{key: value["median"] for key, value in ratios.items()},
        "ratios": ratios,
        "seconds": {name: summarise(values) for name, values in seconds.items()},
        "setup": {"model": "clip (open_clip ViT-B/16, random weights)", "images": count, "image_size": size,
                  "rounds": rounds, "batch_size": batch, "bootstrap_resamples": run["bootstrap_resamples"],
                  "permutations": run["permutations"], "top_k": config["top_k"]},
        "load_average": os.getloadavg(),
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images (each with its object mask)")
    parser.add_argument("--size", type=int, default=512, help="side of the synthetic images in px")
    parser.add_argument("--rounds", type=int, default=7, help=f"interleaved rounds (at least {MIN_ROUNDS})")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        raise SystemExit(f"--rounds must be at least {MIN_ROUNDS} (docs/performance.md: median of at least 5)")
    result = measure(args.images, args.size, args.rounds)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(json.dumps({key: result[key] for key in RATIOS}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
