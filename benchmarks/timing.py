"""Helpers shared by the benchmark scripts: medians with their spread, the machine, progress lines."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
import torch


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summarise(values: list[float]) -> dict:
    """Median, spread and every value of repeated measurements."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(array)),
        "min": float(array.min()),
        "max": float(array.max()),
        "q1": float(np.percentile(array, 25)),
        "q3": float(np.percentile(array, 75)),
        "values": [float(v) for v in array],
    }


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "cpu": cpu, "platform": platform.platform(),
    }
