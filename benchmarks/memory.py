#!/usr/bin/env python
"""Detection's peak memory on N and on 4N images (``memory_4n_over_n`` of benchmarks/throughput.py),
measured in one fresh subprocess per measurement so that nothing else the benchmark holds counts.

Run by benchmarks/throughput.py; this file is also the subprocess's entry point
(``python benchmarks/memory.py '<spec json>'``).  Never run by the tests.
"""

from __future__ import annotations

import ctypes
import gc
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import configs  # noqa: E402
from benchmarks.timing import log, synthetic_batches  # noqa: E402
from common.models.backbone import load_backbone  # noqa: E402
from common.models.hooks import HookedViT  # noqa: E402
from common.registers.detection import NoOutliersError, detect_register_neurons  # noqa: E402

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False


def memory_child(spec: dict) -> dict:
    """In a fresh interpreter: load the backbone once, then detection on N and 4N images,
    interleaved (N, 4N, 4N, N, ...), each from a reset peak-RSS counter."""
    config = dict(configs.MODEL_CONFIGS[spec["model"]])
    backbone = load_backbone(spec["model"], config, random_init=True, seed=0)
    hooked = HookedViT(backbone)
    n, batch = spec["n"], spec["batch"]

    def detect(count: int) -> tuple[int, int]:
        batches = synthetic_batches(count, batch, backbone.input_size)  # generated lazily
        try:
            result = detect_register_neurons(hooked, batches, detect_layer=config["detect_outliers_layer"],
                                             threshold=spec["threshold"])
            return result.images_used, result.images_counted
        except NoOutliersError as error:
            return error.images, 0

    runs = []
    with torch.no_grad():
        detect(batch)  # warm-up: one-time allocations (thread pools, kernels) are not measured
        for pair in range(spec["pairs"]):
            counts = (n, 4 * n) if pair % 2 == 0 else (4 * n, n)
            for count in counts:
                _release_free_memory()
                rss_before = _status_kb("VmRSS")
                reset = _reset_peak_rss()
                used, counted = detect(count)
                runs.append({"pair": pair, "images": count, "images_used": used, "images_counted": counted,
                             "rss_before_kb": rss_before, "hwm_reset": reset,
                             "peak_kb": _status_kb("VmHWM") if reset else None})
    return {"runs": runs, "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def measure_memory(model: str, batch: int, n: int, threshold: float, pairs: int) -> dict:
    """Detection peak RSS on 4N vs N images, measured in one fresh subprocess."""
    spec = {"model": model, "n": n, "batch": batch, "threshold": threshold, "pairs": pairs}
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
        capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{completed.stderr[-3000:]}")
    child = json.loads(completed.stdout.strip().splitlines()[-1])
    runs = child["runs"]
    if not all(run["hwm_reset"] for run in runs):
        raise RuntimeError("cannot reset the peak RSS through /proc/self/clear_refs on this system")
    ratios = []
    for pair in range(pairs):
        peaks = {run["images"]: run["peak_kb"] for run in runs if run["pair"] == pair}
        ratios.append(peaks[4 * n] / peaks[n])
        log(f"  memory pair {pair + 1}/{pairs}: N={n} {peaks[n] / 1024:.0f} MiB, "
            f"4N={4 * n} {peaks[4 * n] / 1024:.0f} MiB, ratio {ratios[-1]:.4f}")
    method = ("peak RSS (VmHWM, /proc/self/status) of one fresh python subprocess that holds only the "
              "model: before each detection run garbage is collected, freed heap is returned to the OS "
              "(malloc_trim) and the peak is reset (/proc/self/clear_refs); N and 4N runs interleaved. "
              "The peak includes the resident model weights and the interpreter.")
    return {"ratios": ratios, "method": method, "n": n, "batch": batch, "runs": runs,
            "child_ru_maxrss_kb": child["ru_maxrss_kb"]}


if __name__ == "__main__":
    print(json.dumps(memory_child(json.loads(sys.argv[1]))))
