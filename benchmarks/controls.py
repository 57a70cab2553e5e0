#!/usr/bin/env python
"""The cost of each control relative to a ttr pass (docs/performance.md, docs/intervention.md "Controls").

    python benchmarks/controls.py --json bench_controls.json
    python benchmarks/controls.py --device cuda --images 64 --batch 32 --json bench_controls_gpu.json

A control is one more extraction pass over the images the run already holds decoded (the image
bank serves every mode: no decoding is timed here, the inputs are tensors).  Each side is one
extraction pass with :func:`common.registers.controls.extract_mode_batch`, the function a run
uses, over the same batches; its ratio to the ttr pass of the same model is computed per round and
reported as the median over the rounds (target <= 1.05 each).  The sides run in one process,
interleaved per batch: a round takes each batch in turn and runs every side on it back to back
(every other batch in the reverse order), so that the sides of a ratio are seconds apart and the
drifts of a shared machine hit every side alike; a side's time in a round is the sum over its
batches.  A second ttr pass (``ttr_b``) is the A/A control: the spread of ``ttr_b / ttr`` is the
noise floor of the run.  Process CPU time is recorded beside the wall time (``cpu_time_ratios``):
on a machine shared with other jobs it is the steadier of the two.

Two real architectures with random weights: open_clip ViT-B/16 (the ttr controls: a random-neuron
draw, ttr-mean, ttr-noise, ttr-shuffle, no-ttr-removed) and timm DINOv2 ViT-S/14 with 4 trained
registers (``vits14_reg``: the trained-register controls, their statistics computed on the same
images first).  The selection is ``top_k`` random neurons in layers <= ``highest_layer``
(``benchmarks.throughput.random_register_neurons``).  Never run by the tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import configs  # noqa: E402
from benchmarks.throughput import random_register_neurons  # noqa: E402
from benchmarks.timing import synthetic_batches  # noqa: E402
from benchmarks.timing import log, machine_info, summarise  # noqa: E402
from common.models.backbone import load_backbone  # noqa: E402
from common.models.hooks import HookedViT  # noqa: E402
from common.registers.controls import ControlInputs, extract_mode_batch, mode_setup  # noqa: E402
from common.registers.intervention import Intervention  # noqa: E402
from common.registers.trained import trained_register_stats  # noqa: E402

TARGET = 1.05
MIN_ROUNDS = 5
SETUPS = {
    "clip": ("clip", dict(configs.CLIP), ("ttr-random-01", "ttr-mean", "ttr-noise", "ttr-shuffle", "no-ttr-removed")),
    "dinov2_reg": ("dinov2", dict(configs.DINOV2, backbone_size="vits14_reg", highest_layer=9, top_k=20),
                   ("trained-zero", "trained-mean", "trained-noise", "trained-shuffle")),
}


def benchmark(name: str, images: int, batch: int, rounds: int, device: str) -> dict:
    family, config, controls = SETUPS[name]
    started = time.perf_counter()
    log(f"[{name}] loading {family} ({config.get('backbone_size', config.get('model_name'))}) with random weights")
    backbone = load_backbone(family, config, random_init=True, seed=0, device=torch.device(device))
    hooked = HookedViT(backbone)
    batches = [b.to(backbone.device) for b in synthetic_batches(images, batch, backbone.input_size)]
    selected = random_register_neurons(backbone, config)
    intervention = Intervention.from_config(selected, config)
    trained = trained_register_stats(hooked, batches) if backbone.num_prefix_tokens > 1 else None
    inputs = ControlInputs(seed=0, mlp_width=backbone.mlp_width, layers=backbone.num_layers, trained=trained)
    sides = {"ttr": "ttr", "ttr_b": "ttr", **{mode: mode for mode in controls}}
    runs = {side: mode_setup(mode, intervention, int(config["num_registers"]), inputs) for side, mode in sides.items()}

    def one_batch(side: str, number: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one batch of ``side``."""
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        extract_mode_batch(hooked, batches[number], runs[side], number)   # features to host numpy, as a run does
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu

    order = list(sides)
    for number in range(len(batches)):                                  # warm-up, not timed
        one_batch("ttr", number)
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    cpu_seconds: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(rounds):
        gc.collect()
        spent = {side: np.zeros(2) for side in sides}
        for number in range(len(batches)):
            for side in (order if (round_ + number) % 2 == 0 else order[::-1]):
                spent[side] += one_batch(side, number)
        for side in sides:
            seconds[side].append(float(spent[side][0]))
            cpu_seconds[side].append(float(spent[side][1]))
        log(f"[{name}] round {round_ + 1}/{rounds}: " + ", ".join(f"{s} {seconds[s][-1]:.2f}s" for s in order))
    ratios = {}
    for side in sides:
        if side == "ttr":
            continue
        per_round = [a / b for a, b in zip(seconds[side], seconds["ttr"])]
        stats = summarise(per_round)
        stats.update({"target": f"<= {TARGET}", "met": stats["median"] <= TARGET} if side != "ttr_b" else
                     {"target": "A/A control (noise floor)"})
        ratios[f"{side}_over_ttr"] = stats
    # process CPU time: what a side itself computed (less sensitive to other jobs taking the cores)
    cpu_ratios = {f"{side}_over_ttr": summarise([a / b for a, b in zip(cpu_seconds[side], cpu_seconds["ttr"])])
                  for side in sides if side != "ttr"}
    return {
        "setup": name, "backbone": backbone.description, "device": str(backbone.device), "images": images,
        "batch": batch, "rounds": rounds, "register_neurons": {str(k): v for k, v in selected.items()},
        "order": "per batch: " + ", ".join(order) + "; reversed on every other batch",
        **{key: stats["median"] for key, stats in ratios.items()},
        "all_met": all(stats.get("met", True) for stats in ratios.values()),
        "ratios": ratios, "cpu_time_ratios": cpu_ratios, "threads": torch.get_num_threads(),
        "seconds": {side: summarise(values) for side, values in seconds.items()},
        "machine": {**machine_info(), "load_average": os.getloadavg()}, "wall_s": time.perf_counter() - started,
    }


def print_table(result: dict) -> None:
    print(f"\n{result['backbone']} on {result['device']}: {result['images']} images, batch {result['batch']}, "
          f"{result['rounds']} interleaved rounds")
    print(f"{'ratio':<28} {'median':>8} {'q1':>8} {'q3':>8} {'min':>8} {'max':>8}  target")
    for key, stats in result["ratios"].items():
        print(f"{key:<28} {stats['median']:8.3f} {stats['q1']:8.3f} {stats['q3']:8.3f} {stats['min']:8.3f} "
              f"{stats['max']:8.3f}  {stats['target']}" + ("" if stats.get("met", True) else "  NOT MET")
              + f"   (CPU time: {result['cpu_time_ratios'][key]['median']:.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=(*SETUPS, "both"), default="both")
    parser.add_argument("--images", type=int, default=8, help="images per pass (default 8)")
    parser.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (>= 5, default 7)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        raise SystemExit(f"--rounds must be at least {MIN_ROUNDS} (docs/performance.md: median of at least 5)")
    names = tuple(SETUPS) if args.setup == "both" else (args.setup,)
    results = {name: benchmark(name, args.images, args.batch, args.rounds, args.device) for name in names}
    for result in results.values():
        print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}")
    return 0 if all(r["all_met"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
