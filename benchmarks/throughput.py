#!/usr/bin/env python
"""Throughput and memory ratios of docs/performance.md, measured in one process on a noisy machine.

    python benchmarks/throughput.py --model clip   --quick --json bench_clip.json
    python benchmarks/throughput.py --model dinov2 --quick --json bench_dinov2.json

The real architectures (open_clip ViT-B/16, timm DINOv2 ViT-L/14 at 224 px) are built with
random weights (``load_backbone(..., random_init=True)``) and fed synthetic images.  Every timed
ratio compares two *sides* run on the same images in the same process, timed with
``time.perf_counter`` under ``torch.no_grad`` with torch's default thread count.  One *round*
runs every side once, in an order that makes the two sides of each ratio neighbours in time;
every other round runs the order backwards (A B .. B A ..), so drifts of a shared machine hit
both sides alike.  A ratio is computed per round and reported as the median over the rounds
with min, max and interquartile range (process CPU-time ratios are reported alongside).  The
stock forward is timed twice per round: that A/A ratio is the noise floor of the run.

=======================  =====================================================  ==========
key                      side A / side B                                        target
=======================  =====================================================  ==========
hooked_over_stock        ``extract_features`` R=0, no intervention /            <= 1.02
                         ``backbone.stock_forward`` (the library's own forward)
ttr_over_no_ttr          ``extract_features`` R=1 + intervention on top_k        <= 1.05
                         random neurons in layers <= highest_layer / no-ttr
detect_over_forward      ``detect_register_neurons`` / stock forward, same      <= 1.25
                         batches (``detection_batch_size``)
reference_over_detect    the reference repo's way (pinned by docs/performance.md) / ours    >= 1.3
cached_over_first        all (mode, split) features of a run from               <= 0.05
                         the checked feature cache / extracting them from PNGs on disk
memory_4n_over_n         detection peak RSS on 4N images / on N images, in a    <= 1.1
                         fresh subprocess (interleaved N, 4N runs)
=======================  =====================================================  ==========

The reference side is written here with plain torch hooks, as the reference repository does
it: batch size 1; every block's output, every MLP's hidden activations (input of the output
projection) and every attention map (materialised by the attention module itself: open_clip's
``nn.MultiheadAttention`` called with ``need_weights=True``, timm's non-fused attention path)
``.detach().cpu().numpy()``-ed and appended to lists, ``np.concatenate``-d at the end, then
scored layer by layer with numpy (norms, outlier mask, mean |act| at outliers, sparsity).

Never run by the tests (timings do not belong there).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import configs  # noqa: E402
from benchmarks.memory import measure_memory  # noqa: E402
from benchmarks.reference import ranking_to_scores, reference_detection  # noqa: E402
from benchmarks.timing import IMAGE_SEED, log, machine_info, summarise, synthetic_batches  # noqa: E402
from common.data.cache import Cache, cache_key  # noqa: E402
from common.data.imagebank import ImageBank  # noqa: E402
from common.models.backbone import Backbone, load_backbone  # noqa: E402
from common.models.hooks import HookedViT  # noqa: E402
from common.registers.detection import (  # noqa: E402
    collect_norms,
    detect_register_neurons,
    detection_batch_size,
)
from common.registers.features import FeatureSet, extract_features  # noqa: E402
from common.registers.controls import mode_setup  # noqa: E402
from common.registers.intervention import Intervention  # noqa: E402
from common.registers.modes import MODES  # noqa: E402

TARGETS: dict[str, tuple[str, float]] = {
    "hooked_over_stock": ("<=", 1.02),
    "ttr_over_no_ttr": ("<=", 1.05),
    "detect_over_forward": ("<=", 1.25),
    "reference_over_detect": (">=", 1.3),
    "cached_over_first": ("<=", 0.05),
    "memory_4n_over_n": ("<=", 1.1),
}

# images: benchmark images, one detection batch (detection_batch_size(backbone, images));
# rounds: interleaved rounds of the cheap sides (ttr, no_ttr, stock, stock_b, detect); heavy_rounds: the
# first rounds also run the costly sides (reference, first, cached); splits: images per
# train/val/test split of the cached-vs-first run; memory_*: N, its batch size and the number of
# interleaved (N, 4N) measurements.
PRESETS = {
    ("clip", True): {"images": 4, "rounds": 17, "heavy_rounds": 7, "splits": (1, 1, 1),
                     "memory_n": 2, "memory_batch": 2, "memory_pairs": 5},
    ("clip", False): {"images": 16, "rounds": 21, "heavy_rounds": 9, "splits": (8, 4, 4),
                      "memory_n": 16, "memory_batch": 16, "memory_pairs": 5},
    ("dinov2", True): {"images": 2, "rounds": 15, "heavy_rounds": 5, "splits": (1, 1, 1),
                       "memory_n": 1, "memory_batch": 1, "memory_pairs": 5},
    ("dinov2", False): {"images": 8, "rounds": 15, "heavy_rounds": 7, "splits": (4, 2, 2),
                        "memory_n": 8, "memory_batch": 8, "memory_pairs": 5},
}
MIN_ROUNDS = 5
# (numerator side, denominator side) of each timed ratio
TIMED_RATIOS = {
    "hooked_over_stock": ("no_ttr", "stock"),
    "ttr_over_no_ttr": ("ttr", "no_ttr"),
    "detect_over_forward": ("detect", "stock_b"),
    "reference_over_detect": ("reference", "detect"),
    "cached_over_first": ("cached", "first"),
}
# Not a target: the stock forward timed twice in a row (A/A).  Its spread is the noise floor of
# this machine at the moment of the run; a ratio within it of its target is not resolved.
CONTROL_RATIO = {"stock_b_over_stock": ("stock_b", "stock")}
NEURON_SEED = 0
PNG_SIZE = 96
# Decoding in the main process: no worker start-up in the "first" side, which makes it shorter
# and cached_over_first larger (conservative) than with the run's num_workers.
FIRST_NUM_WORKERS = 0


# --------------------------------------------------------------------------------------------
# inputs


def write_pngs(folder: Path, splits: tuple[int, int, int]) -> dict[str, list[str]]:
    """Small random RGB PNGs per split; returns ``{split: [paths]}``."""
    from PIL import Image

    rng = np.random.default_rng(IMAGE_SEED)
    paths: dict[str, list[str]] = {}
    for split, count in zip(("train", "val", "test"), splits):
        paths[split] = []
        for i in range(count):
            pixels = rng.integers(0, 256, size=(PNG_SIZE, PNG_SIZE, 3), dtype=np.uint8)
            path = folder / f"{split}_{i:04d}.png"
            Image.fromarray(pixels).save(path)
            paths[split].append(str(path))
    return paths


def random_register_neurons(backbone: Backbone, config: dict) -> dict[int, list[int]]:
    """``top_k`` distinct random (layer, neuron) pairs in layers <= highest_layer (fixed seed)."""
    rng = np.random.default_rng(NEURON_SEED)
    layers = config["highest_layer"] + 1
    flat = rng.choice(layers * backbone.mlp_width, size=config["top_k"], replace=False)
    selected: dict[int, list[int]] = {}
    for value in flat:
        selected.setdefault(int(value) // backbone.mlp_width, []).append(int(value) % backbone.mlp_width)
    return dict(sorted(selected.items()))


# --------------------------------------------------------------------------------------------
# statistics


def meets(key: str, value: float) -> bool:
    op, target = TARGETS[key]
    return value <= target if op == "<=" else value >= target


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds by ``time.perf_counter``, process CPU seconds) of one call."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - start, time.process_time() - cpu


# --------------------------------------------------------------------------------------------
# one model


def benchmark(model: str, quick: bool, overrides: dict) -> dict:
    preset = dict(PRESETS[(model, quick)])
    preset.update({k: v for k, v in overrides.items() if v is not None})
    rounds, heavy_rounds, n_images = preset["rounds"], preset["heavy_rounds"], preset["images"]
    if min(rounds, heavy_rounds, preset["memory_pairs"]) < MIN_ROUNDS:
        raise SystemExit(f"rounds, heavy rounds and memory pairs must be at least {MIN_ROUNDS} "
                         "(docs/performance.md: median of at least 5)")
    heavy_rounds = min(heavy_rounds, rounds)
    config = dict(configs.MODEL_CONFIGS[model])
    run_defaults = configs.RUN_DEFAULTS
    started = time.perf_counter()
    load_average_start = os.getloadavg()

    log(f"[{model}] loading {model} with random weights")
    backbone = load_backbone(model, config, random_init=True, seed=0)
    load_s = time.perf_counter() - started
    hooked = HookedViT(backbone)
    size = backbone.input_size
    batch = detection_batch_size(backbone, n_images)
    if batch != n_images:
        raise SystemExit(f"{n_images} images do not fit one detection batch ({batch}); use fewer")
    batches = list(synthetic_batches(n_images, batch, size))
    stacked = torch.cat(batches)
    detect_index = hooked.layer_index(config["detect_outliers_layer"])

    # Threshold from the observed norms: a high quantile, lowered so that every image counts.
    norms = collect_norms(hooked, batches, config["detect_outliers_layer"]).reshape(n_images, -1)
    threshold = float(min(np.quantile(norms, 0.99), 0.999 * norms.max(axis=1).min()))
    log(f"[{model}] threshold {threshold:.3f} (norms at layer {detect_index}: median "
        f"{np.median(norms):.2f}, max {norms.max():.2f})")

    selected = random_register_neurons(backbone, config)
    intervention = Intervention.from_config(selected, config)
    num_registers = int(config["num_registers"])
    ttr_hooks = intervention.fwd_hooks(hooked.token_layout(num_registers))

    # the run's features for cached-vs-first: PNGs on disk, every (mode, split)
    workdir = tempfile.TemporaryDirectory(prefix="ttr-bench-")
    paths = write_pngs(Path(workdir.name), preset["splits"])
    cache_round = [0]

    def key_of(mode: str, split_paths: list[str]) -> str:
        return cache_key({"kind": "features", "weights": backbone.weights_id,
                          **mode_setup(mode, intervention, num_registers).describe(), "images": split_paths,
                          "round": cache_round[0]})

    # ---- the sides
    def side_stock():
        for images in batches:
            backbone.stock_forward(images)

    def side_no_ttr():
        extract_features(hooked, batches)

    def side_ttr():
        extract_features(hooked, batches, num_registers=num_registers, fwd_hooks=ttr_hooks)

    # Only the first result of each is kept (for the agreement check): a growing pile of
    # rankings (L x D Python tuples each) would slow Python's garbage collector, and with it
    # every later side.
    detection_outputs: list = []

    def side_detect():
        result = detect_register_neurons(hooked, batches, detect_layer=config["detect_outliers_layer"],
                                         threshold=threshold)
        if not detection_outputs:
            detection_outputs.append(result)

    reference_outputs: list = []

    def side_reference():
        result = reference_detection(backbone, stacked, detect_index, threshold)
        if not reference_outputs:
            reference_outputs.append(result)

    def side_first():
        # a fresh cache each round: the images decoded once (no image cache), every (mode, split)
        # extracted and written to the feature cache
        cache_round[0] += 1
        cache = Cache(Path(workdir.name) / f"cache_{cache_round[0]}")
        bank = ImageBank(backbone.preprocess, cache=Cache(None), num_workers=FIRST_NUM_WORKERS)
        for mode in MODES:
            run = mode_setup(mode, intervention, num_registers)
            registers = run.num_registers
            hooks = run.fwd_hooks(hooked.token_layout(registers))
            for split, split_paths in paths.items():
                features = extract_features(hooked, bank.batches(split_paths, run_defaults["batch_size"]),
                                            num_registers=registers, fwd_hooks=hooks)
                cache.save("features", key_of(mode, split_paths), features.arrays())

    def side_cached():
        cache = Cache(Path(workdir.name) / f"cache_{cache_round[0]}")
        for mode in MODES:
            for split, split_paths in paths.items():
                arrays = cache.load("features", key_of(mode, split_paths))
                if arrays is None or len(FeatureSet(arrays["pooled"], arrays["patch_mean"]).pooled) != len(split_paths):
                    raise RuntimeError(f"cache miss for {mode}/{split}")

    # The order makes both sides of every ratio neighbours in time: ttr | no_ttr | stock |
    # stock_b | detect | reference is a chain (ttr/no_ttr, no_ttr/stock, stock_b/stock (the A/A
    # control), detect/stock_b, reference/detect), then first | cached.  Odd rounds run the same
    # order backwards (round 0 runs "first" before "cached", so the cache is filled before it is
    # read).  The costly sides run in the first ``heavy_rounds`` rounds only; a ratio uses the
    # rounds that ran both of its sides.
    sides = {"ttr": side_ttr, "no_ttr": side_no_ttr, "stock": side_stock, "stock_b": side_stock,
             "detect": side_detect, "reference": side_reference, "first": side_first,
             "cached": side_cached}
    heavy = {"reference", "first", "cached"}
    wall: dict[str, dict[int, float]] = {name: {} for name in sides}
    cpu: dict[str, dict[int, float]] = {name: {} for name in sides}
    with torch.no_grad():
        for repeat in range(rounds):
            order = [name for name in sides if repeat < heavy_rounds or name not in heavy]
            if repeat % 2:
                order.reverse()
            round_start = time.perf_counter()
            for name in order:
                wall[name][repeat], cpu[name][repeat] = timed(sides[name])
            log(f"[{model}] round {repeat + 1}/{rounds} ({time.perf_counter() - round_start:.1f} s): "
                + ", ".join(f"{name} {wall[name][repeat]:.3f}s" for name in sides if repeat in wall[name]))
    workdir.cleanup()

    # the reference and ours must agree (same images, same threshold)
    ours = ranking_to_scores(detection_outputs[0].ranked, backbone.num_layers, backbone.mlp_width)
    reference_scores, reference_counted = reference_outputs[0]
    agreement = {
        "max_abs_diff": float(np.abs(ours - reference_scores).max()),
        "allclose_rtol1e-4": bool(np.allclose(ours, reference_scores, rtol=1e-4, atol=1e-5)),
        "counted_ours": detection_outputs[0].images_counted, "counted_reference": reference_counted,
    }

    def paired(times: dict[str, dict[int, float]], top: str, bottom: str) -> list[float]:
        return [times[top][r] / times[bottom][r] for r in sorted(times[top]) if r in times[bottom]]

    per_round = {key: paired(wall, *sides_) for key, sides_ in TIMED_RATIOS.items()}
    cpu_ratios = {key: summarise(paired(cpu, *sides_)) for key, sides_ in TIMED_RATIOS.items()}
    control = {key: {**summarise(paired(wall, *sides_)), "cpu_time": summarise(paired(cpu, *sides_))}
               for key, sides_ in CONTROL_RATIO.items()}

    memory_n, memory_batch, pairs = preset["memory_n"], preset["memory_batch"], preset["memory_pairs"]
    log(f"[{model}] memory: one fresh subprocess, {pairs} interleaved (N, 4N) pairs, N={memory_n}, "
        f"batch {memory_batch}")
    memory = measure_memory(model, memory_batch, memory_n, threshold, pairs)
    per_round["memory_4n_over_n"] = memory.pop("ratios")

    ratios = {}
    for key, values in per_round.items():
        stats = summarise(values)
        op, target = TARGETS[key]
        stats.update({"target": f"{op} {target}", "met": meets(key, stats["median"]), "repeats": len(values)})
        ratios[key] = stats
    split_images = sum(preset["splits"])

    def rate(side: str, count: int, rounds_: range = range(heavy_rounds)) -> float:
        """Images per second of ``side``: median over the rounds that ran every side."""
        return count / float(np.median([wall[side][r] for r in rounds_]))

    result = {
        "model": model,
        "backbone": backbone.description,
        "quick": quick,
        **{key: ratios[key]["median"] for key in TARGETS},
        "all_met": all(r["met"] for r in ratios.values()),
        "ratios": ratios,
        "cpu_time_ratios": cpu_ratios,
        "noise_control": control,
        "images_per_s": {
            "stock_forward_all_rounds": rate("stock", n_images, range(rounds)),
            "stock_forward": rate("stock", n_images),
            "no_ttr_extraction": rate("no_ttr", n_images),
            "ttr_extraction": rate("ttr", n_images),
            "detection": rate("detect", n_images),
            "reference_detection": rate("reference", n_images),
            "first_extraction_both_modes": rate("first", 2 * split_images),
        },
        "seconds": {name: summarise(list(values.values())) for name, values in wall.items()},
        "cpu_seconds": {name: summarise(list(values.values())) for name, values in cpu.items()},
        "setup": {
            **preset, "batch": batch, "image_size": size, "png_size": PNG_SIZE,
            "first_batch_size": run_defaults["batch_size"], "first_num_workers": FIRST_NUM_WORKERS,
            "threshold": threshold, "detect_layer": config["detect_outliers_layer"],
            "register_neurons": {str(k): v for k, v in selected.items()},
            "num_registers": num_registers, "backbone_load_s": load_s,
            "order": "ttr, no_ttr, stock, stock_b, detect, reference, first, cached; reversed on odd rounds",
        },
        "reference_agreement": agreement,
        "memory": memory,
        "machine": {**machine_info(), "load_average_start": load_average_start,
                    "load_average_end": os.getloadavg()},
        "wall_s": time.perf_counter() - started,
    }
    return result


def print_table(result: dict) -> None:
    machine = result["machine"]
    print(f"\n== {result['model']}: {result['backbone']}  ({'quick' if result['quick'] else 'full'}, "
          f"{result['setup']['images']} images, batch {result['setup']['batch']}, "
          f"{result['setup']['rounds']} interleaved rounds, {result['setup']['heavy_rounds']} with "
          "reference/first/cached)")
    print(f"   machine: {machine['nproc']} CPUs, torch {machine['torch']} ({machine['torch_threads']} threads), "
          f"load average {machine['load_average_start'][0]:.1f} -> {machine['load_average_end'][0]:.1f}")
    print(f"   {'ratio (wall clock)':<24}{'median':>9}{'min':>9}{'q1':>9}{'q3':>9}{'max':>9}  {'n':>2}  "
          f"{'target':<9} met  {'cpu-time median':>15}")
    for key in TARGETS:
        r = result["ratios"][key]
        cpu_median = result["cpu_time_ratios"].get(key, {}).get("median")
        print(f"   {key:<24}{r['median']:>9.4f}{r['min']:>9.4f}{r['q1']:>9.4f}{r['q3']:>9.4f}"
              f"{r['max']:>9.4f}  {r['repeats']:>2}  {r['target']:<9} {'yes' if r['met'] else 'NO ':<4}"
              f"{'' if cpu_median is None else f'{cpu_median:>15.4f}'}")
    for key, r in result["noise_control"].items():
        print(f"   {key + ' (A/A)':<24}{r['median']:>9.4f}{r['min']:>9.4f}{r['q1']:>9.4f}{r['q3']:>9.4f}"
              f"{r['max']:>9.4f}  {len(r['values']):>2}  {'noise':<9} {'':<4}{r['cpu_time']['median']:>15.4f}")
    print("   images/s (median over the rounds that ran every side): "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["images_per_s"].items()))
    agreement = result["reference_agreement"]
    print(f"   reference vs ours: max |score diff| {agreement['max_abs_diff']:.2e}, "
          f"allclose {agreement['allclose_rtol1e-4']}, counted {agreement['counted_ours']}/"
          f"{agreement['counted_reference']}")
    print(f"   memory: {result['memory']['method']}")
    print(f"   wall time {result['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("clip", "dinov2", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="few images and rounds: a few minutes per model on a quiet 2-core CPU")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the cheap sides (>= 5)")
    parser.add_argument("--heavy_rounds", type=int, help="rounds that also run reference/first/cached (>= 5)")
    parser.add_argument("--images", type=int, help="benchmark images (one detection batch)")
    parser.add_argument("--memory_n", type=int, help="N of memory_4n_over_n")
    parser.add_argument("--memory_batch", type=int, help="detection batch size of the memory runs")
    parser.add_argument("--memory_pairs", type=int, help="interleaved (N, 4N) memory measurements (>= 5)")
    args = parser.parse_args(argv)
    models = ("clip", "dinov2") if args.model == "both" else (args.model,)
    results = {}
    for model in models:
        overrides = {key: getattr(args, key) for key in
                     ("rounds", "heavy_rounds", "images", "memory_n", "memory_batch", "memory_pairs")}
        results[model] = benchmark(model, args.quick, overrides)
        print_table(results[model])
    if args.json:
        payload = results[models[0]] if len(models) == 1 else results
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"\nwrote {args.json}")
    return 0 if all(r["all_met"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
