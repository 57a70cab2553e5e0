#!/usr/bin/env python
"""Costs at real scale (docs/performance.md): decoding, the whole extraction, the probe, a GPU.

    python benchmarks/scale.py --quick --json bench_scale.json
    python benchmarks/scale.py --gpu --json bench_gpu.json        # wherever CUDA is available

=================================  ================================================================  =========
key                                what                                                              target
=================================  ================================================================  =========
decodes_per_image                  image decodes in a whole run (the demo pipeline: detection, both   1.0
                                   modes, analysis) / images in the dataset
decodes_per_image_rerun_new_ttr    the same run again with other ttr settings (top_k), same cache     0
e2e_over_forward                   one run's extraction from real-size files (PNG 2416x1736 and       <= 1.10
                                   3216x2136, JPEG X-ray 2000x2000, generated): decode once, no-ttr
                                   and ttr features / the same forwards on pre-decoded tensors
                                   (ViT-B/16, CPU, random weights), interleaved rounds, median
probe_seconds_45_classes           the probe stage of one mode: 5,000 x 1,024 features, 45 classes,   (report)
                                   3 seeds, default grid (``benchmarks/probe.py``)
gpu (``--gpu``)                    images/s of a whole extraction (decode + no-ttr + ttr) for         (report)
                                   ViT-B/16 and ViT-L/14 in bf16 with fused attention, and the share
                                   of its wall time the GPU is busy (CUDA events around the forwards)
=================================  ================================================================  =========

Never run by the tests.
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
from benchmarks.timing import log, summarise  # noqa: E402
from common.app.settings import resolve_workers  # noqa: E402
from common.data.cache import Cache  # noqa: E402
from common.data.imagebank import ImageBank  # noqa: E402
from common.models.backbone import load_backbone  # noqa: E402
from common.models.hooks import HookedViT  # noqa: E402
from common.registers.features import extract_features  # noqa: E402
from common.registers.intervention import Intervention  # noqa: E402

TARGETS = {"decodes_per_image": ("==", 1.0), "decodes_per_image_rerun_new_ttr": ("==", 0.0),
           "e2e_over_forward": ("<=", 1.10)}
REAL_SIZES = (("png", (2416, 1736)), ("png", (3216, 2136)), ("jpg", (2000, 2000)))
MIN_ROUNDS = 5


def real_size_files(folder: Path, per_kind: int, seed: int = 0) -> list[str]:
    """Fundus-like PNGs and X-ray-like JPEGs of real sizes: smooth content plus noise, so they
    compress like photographs rather than like noise or flat colour."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, (width, height) in REAL_SIZES:
        for index in range(per_kind):
            yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
            base = 128 + 90 * np.sin(xx / (37 + index)) * np.cos(yy / (53 + index))
            noise = rng.normal(0, 12, size=(height, width)).astype(np.float32)
            grey = np.clip(base + noise, 0, 255).astype(np.uint8)
            if kind == "png":
                image = Image.fromarray(np.stack([grey, (grey * 0.6).astype(np.uint8), (grey * 0.3).astype(np.uint8)], -1))
                path = folder / f"fundus_{width}x{height}_{index}.png"
                image.save(path, compress_level=6)
            else:
                path = folder / f"xray_{width}x{height}_{index}.jpg"
                Image.fromarray(grey, "L").save(path, quality=92)
            paths.append(str(path))
    return paths


# --------------------------------------------------------------------------------------------


def decodes(workdir: Path) -> dict:
    """A whole demo run, then the same with other ttr settings: decodes per image from config.json."""
    from common.app.cli import main
    from common.app.settings import DatasetSpec
    from common.demo.synthetic import make_synthetic

    spec = DatasetSpec("aptos", "APTOS 2019", qwk=True)
    data = make_synthetic("aptos", workdir / "data", per_class=20, image_size=64)
    images = sum(1 for _ in data.rglob("*.png"))
    counts = {}
    for name, extra in (("first", []), ("rerun_new_ttr", ["--set", "top_k=2"])):
        out = workdir / f"run_{name}"
        code = main(spec, ["--demo", "--model", "dinov2", "--image_path", str(data), "--out", str(out),
                           "--cache_dir", str(workdir / "cache"), "--set", "probe_seeds=(0,)",
                           "--set", "bootstrap_resamples=100", "--set", "figure_images=1", *extra])
        if code != 0:
            raise RuntimeError(f"the demo run failed with exit code {code}")
        counts[name] = json.loads((out / "config.json").read_text())["images_decoded"]
    return {"decodes_per_image": counts["first"] / images,
            "decodes_per_image_rerun_new_ttr": counts["rerun_new_ttr"] / images,
            "images": images, "decodes": counts}


def end_to_end(workdir: Path, per_kind: int, rounds: int, batch: int) -> dict:
    """ViT-B/16 (random weights, CPU): decode-once extraction of both modes from real-size files
    vs the same forwards on pre-decoded tensors, interleaved."""
    config = dict(configs.CLIP)
    backbone = load_backbone("clip", config, random_init=True, seed=0)
    hooked = HookedViT(backbone)
    paths = real_size_files(workdir / "real", per_kind)
    workers = resolve_workers("auto", "cpu")
    neurons = {2: [10, 20, 30], 4: [5, 6]}
    intervention = Intervention.from_config(neurons, config)
    ttr_hooks = intervention.fwd_hooks(hooked.token_layout(1))
    decoded = ImageBank(backbone.preprocess, cache=Cache(None), num_workers=workers)
    decoded.prepare(paths)
    tensors = list(decoded.batches(paths, batch))

    def forwards(batches):
        extract_features(hooked, batches)
        extract_features(hooked, batches, num_registers=1, fwd_hooks=ttr_hooks)

    def whole():
        bank = ImageBank(backbone.preprocess, cache=Cache(None), num_workers=workers)   # decodes again
        forwards(list(bank.batches(paths, batch)))

    def pre_decoded():
        forwards(tensors)

    ratios, seconds = [], {"whole": [], "forward": []}
    with torch.no_grad():
        pre_decoded()   # warm-up
        for repeat in range(rounds):
            order = [("whole", whole), ("forward", pre_decoded)]
            if repeat % 2:
                order.reverse()
            for name, side in order:
                start = time.perf_counter()
                side()
                seconds[name].append(time.perf_counter() - start)
            ratios.append(seconds["whole"][-1] / seconds["forward"][-1])
            log(f"  e2e round {repeat + 1}/{rounds}: whole {seconds['whole'][-1]:.2f} s, forwards "
                f"{seconds['forward'][-1]:.2f} s, ratio {ratios[-1]:.3f}")
    return {"e2e_over_forward": float(np.median(ratios)), "ratios": summarise(ratios),
            "seconds": {k: summarise(v) for k, v in seconds.items()}, "images": len(paths),
            "decode_workers": workers, "batch": batch,
            "sizes": [f"{kind} {w}x{h}" for kind, (w, h) in REAL_SIZES]}


def probe_seconds() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import probe as probe_benchmark  # benchmarks/probe.py

    data = probe_benchmark.make_features()
    config = probe_benchmark.probe_config(no_early_stop=False)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        probe_benchmark.run_new(data, config, None)
        times.append(time.perf_counter() - start)
    return {"probe_seconds_45_classes": float(np.median(times)), "seconds": summarise(times)}


def gpu(workdir: Path, per_kind: int) -> dict:
    """Images/s of a whole extraction (decode + no-ttr + ttr) in bf16 and the GPU's busy share."""
    results = {}
    paths = real_size_files(workdir / "gpu", per_kind)
    for family, config in (("clip", configs.CLIP), ("dinov2", configs.DINOV2)):
        backbone = load_backbone(family, dict(config), random_init=True, seed=0, device="cuda", precision="bf16")
        hooked = HookedViT(backbone)
        intervention = Intervention.from_config({2: [10, 20, 30]}, config)
        hooks = intervention.fwd_hooks(hooked.token_layout(1))
        busy = []

        def timed_forward(batches, **kwargs):
            for images in batches:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                extract_features(hooked, [images], **kwargs)
                end.record()
                end.synchronize()
                busy.append(start.elapsed_time(end) / 1000)

        bank = ImageBank(backbone.preprocess, cache=Cache(None), num_workers=resolve_workers("auto", "cuda"),
                         device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        bank.prepare(paths)
        timed_forward(bank.batches(paths, 64))
        timed_forward(bank.batches(paths, 64), num_registers=1, fwd_hooks=hooks)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        results[family] = {"images_per_s": len(paths) / wall, "gpu_busy_share": sum(busy) / wall,
                           "images": len(paths), "device": torch.cuda.get_device_name()}
        log(f"  gpu {family}: {results[family]['images_per_s']:.1f} images/s, GPU busy "
            f"{results[family]['gpu_busy_share']:.0%}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer real-size images")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS, help="interleaved e2e rounds (>= 5)")
    parser.add_argument("--gpu", action="store_true", help="also the CUDA case (needs a GPU)")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        raise SystemExit(f"--rounds must be at least {MIN_ROUNDS}")
    started = time.perf_counter()
    result: dict = {"machine": {"nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "torch": torch.__version__, "load_average_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="ttr-scale-") as folder:
        workdir = Path(folder)
        log("decodes per image (the demo pipeline, twice)")
        result["decodes"] = decodes(workdir)
        log("real-size files: decode once + both modes vs the same forwards on pre-decoded tensors")
        result["e2e"] = end_to_end(workdir, per_kind=2 if args.quick else 6, rounds=args.rounds, batch=8)
        log("the probe stage, 45 classes")
        result["probe"] = probe_seconds()
        if args.gpu:
            if not torch.cuda.is_available():
                raise SystemExit("--gpu: CUDA is not available here")
            result["gpu"] = gpu(workdir, per_kind=30)
    for key in ("decodes_per_image", "decodes_per_image_rerun_new_ttr"):
        result[key] = result["decodes"][key]
    result["e2e_over_forward"] = result["e2e"]["e2e_over_forward"]
    result["probe_seconds_45_classes"] = result["probe"]["probe_seconds_45_classes"]
    met = {}
    for key, (op, target) in TARGETS.items():
        value = result[key]
        met[key] = value == target if op == "==" else value <= target
        print(f"{key:<34}{value:>10.4f}   target {op} {target}   {'met' if met[key] else 'NOT met'}")
    print(f"{'probe_seconds_45_classes':<34}{result['probe_seconds_45_classes']:>10.2f}")
    result["met"] = met
    result["machine"]["load_average_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - started
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
