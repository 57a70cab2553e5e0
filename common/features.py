"""Frozen-feature extraction in the two modes, and the on-disk feature cache (SPEC §7).

* ``no-ttr``: the model as released (no register token, no intervention).
* ``ttr``: ``R`` zero register tokens appended and the register neurons moved onto them.

Both modes store the pooled feature (CLIP: projected CLS; DINOv2: final-norm CLS) and the mean
of the final-norm *image patch* tokens (CLS, trained and test-time registers excluded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.hooks import Capture, HookedViT
from common.images import load_rgb
from common.intervention import Intervention

log = logging.getLogger(__name__)

FEATURES = ("cls", "patch_mean", "cls+patch_mean")
MODES = ("no-ttr", "ttr")
# Bump when the extraction code changes what it computes: old cache entries stop matching.
FEATURE_VERSION = 1


class ImageFiles(Dataset):
    """Decoded, preprocessed images for a list of paths: item ``i`` -> ``[3, H, W]``."""

    def __init__(self, paths: Sequence[str], preprocess: Callable):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(load_rgb(self.paths[index]))


def image_loader(paths: Sequence[str], preprocess: Callable, batch_size: int, num_workers: int,
                 device: torch.device | None = None) -> DataLoader:
    """Batches in path order; decoding overlaps compute when ``num_workers`` > 0."""
    return DataLoader(
        ImageFiles(paths, preprocess), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, pin_memory=device is not None and device.type == "cuda",
        persistent_workers=False,
    )


@dataclass
class FeatureSet:
    """Features of one image list in one mode."""

    pooled: np.ndarray       # [N, d_out] the backbone's usual pooled feature
    patch_mean: np.ndarray   # [N, d]     mean of final-norm image-patch tokens

    def select(self, feature: str) -> np.ndarray:
        """The probe's input for the ``feature`` config key."""
        if feature == "cls":
            return self.pooled
        if feature == "patch_mean":
            return self.patch_mean
        if feature == "cls+patch_mean":
            return np.concatenate([self.pooled, self.patch_mean], axis=1)
        raise ValueError(f"unknown feature {feature!r}; use one of {', '.join(FEATURES)}")


def mode_settings(mode: str, num_registers: int, intervention: Intervention | None) -> tuple[int, Intervention | None]:
    """(registers, intervention) that ``mode`` runs with."""
    if mode == "no-ttr":
        return 0, None
    if mode == "ttr":
        if num_registers < 1:
            raise ValueError("ttr needs at least one test-time register (num_registers >= 1)")
        return num_registers, intervention
    raise ValueError(f"unknown mode {mode!r}")


@torch.no_grad()
def extract_features(
    hooked: HookedViT,
    loader: DataLoader,
    *,
    num_registers: int = 0,
    intervention: Intervention | None = None,
    progress: tqdm | None = None,
) -> FeatureSet:
    """Run every batch of ``loader`` once and keep the pooled feature and the patch mean."""
    backbone = hooked.backbone
    patches = hooked.token_layout(num_registers)["patches"]
    pooled_parts, patch_parts = [], []
    with hooked.hooks(num_registers=num_registers, intervention=intervention,
                      capture=Capture(final_tokens=True)) as cache:
        for images in loader:
            pooled = backbone.model(images.to(backbone.device, non_blocking=True))
            tokens = cache[("final_tokens", None)]                 # [B, N, d]
            pooled_parts.append(pooled.float().cpu())
            patch_parts.append(tokens[:, patches].mean(dim=1).float().cpu())
            if progress is not None:
                progress.update(images.shape[0])
    if not pooled_parts:
        width = backbone.width
        return FeatureSet(np.zeros((0, width), np.float32), np.zeros((0, width), np.float32))
    return FeatureSet(torch.cat(pooled_parts).numpy(), torch.cat(patch_parts).numpy())


# --------------------------------------------------------------------------------------------
# Cache


def file_fingerprints(paths: Sequence[str]) -> list[list]:
    """``[path, size, mtime_ns]`` per image: a changed file changes the cache key."""
    rows = []
    for path in paths:
        stat = os.stat(path)
        rows.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return rows


def cache_key(description: dict) -> str:
    """SHA-256 of a canonical JSON of everything that changes the features."""
    payload = json.dumps({"feature_version": FEATURE_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class FeatureCache:
    """``.npz`` files named by their key under ``root``; writes are atomic."""

    def __init__(self, root: str | Path | None, enabled: bool = True):
        self.root = Path(root) if root is not None else None
        self.enabled = enabled and root is not None

    def path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f"features-{key}.npz"

    def load(self, key: str) -> FeatureSet | None:
        if not self.enabled:
            return None
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return FeatureSet(pooled=data["pooled"], patch_mean=data["patch_mean"])
        except (OSError, ValueError, KeyError) as error:
            log.warning("ignoring unreadable cache file %s (%s)", path, error)
            return None

    def save(self, key: str, features: FeatureSet, description: dict) -> None:
        if not self.enabled:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.root, prefix=".features-", suffix=".npz.tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, pooled=features.pooled, patch_mean=features.patch_mean,
                         description=np.array(json.dumps(description, default=str)))
            os.replace(temporary, self.path(key))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def default_cache_dir() -> Path:
    """``$TTR_CACHE_DIR``, else ``$XDG_CACHE_HOME/ttr-medical``, else ``~/.cache/ttr-medical``."""
    if os.environ.get("TTR_CACHE_DIR"):
        return Path(os.environ["TTR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ttr-medical"
