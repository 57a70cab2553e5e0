"""Helpers shared by the benchmark scripts: synthetic inputs, medians with their spread, the machine,
progress lines."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np
import torch


IMAGE_SEED = 1234


def synthetic_image(index: int, size: int) -> torch.Tensor:
    """Image ``index`` as a preprocessed-looking tensor ``[3, size, size]`` (seeded per index)."""
    generator = torch.Generator().manual_seed(IMAGE_SEED + index)
    return torch.randn(3, size, size, generator=generator)


def synthetic_batches(count: int, batch: int, size: int, start: int = 0):
    """Lazily generated batches ``[b, 3, size, size]`` of images ``start .. start+count-1``."""
    for first in range(start, start + count, batch):
        last = min(first + batch, start + count)
        yield torch.stack([synthetic_image(i, size) for i in range(first, last)])


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
