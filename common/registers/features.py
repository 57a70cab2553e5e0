"""Frozen-feature extraction per mode (docs/run.md): the pooled feature and the patch mean.

Both are in the space of the backbone's pooled feature: the pooled feature is the family's usual
one (CLIP: projected CLS; DINOv2/DINOv3: final-norm CLS); the patch mean is the mean of the
final-norm *image patch* tokens (CLS, trained and test-time registers excluded) put through the
same projection (CLIP projects it with ``proj``, so ``cls+patch_mean`` joins two 512-d halves of
one space rather than a projected CLS with an unprojected 768-d mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from common.models.hooks import FINAL, HookedViT, HookFn

FEATURES = ("cls", "patch_mean", "cls+patch_mean")


@dataclass
class FeatureSet:
    """Features of one image list in one mode."""

    pooled: np.ndarray       # [N, d_out] the backbone's usual pooled feature
    patch_mean: np.ndarray   # [N, d_out] mean of the final-norm image-patch tokens, projected likewise

    def select(self, feature: str) -> np.ndarray:
        """The probe's input for the ``feature`` config key."""
        if feature == "cls":
            return self.pooled
        if feature == "patch_mean":
            return self.patch_mean
        if feature == "cls+patch_mean":
            return np.concatenate([self.pooled, self.patch_mean], axis=1)
        raise ValueError(f"unknown feature {feature!r}; use one of {', '.join(FEATURES)}")

    def arrays(self) -> dict[str, np.ndarray]:
        return {"pooled": self.pooled, "patch_mean": self.patch_mean}

    @classmethod
    def concatenate(cls, parts: list["FeatureSet"]) -> "FeatureSet":
        return cls(np.concatenate([p.pooled for p in parts]), np.concatenate([p.patch_mean for p in parts]))


@torch.no_grad()
def extract_batch(hooked: HookedViT, images: torch.Tensor, *, num_registers: int = 0,
                  fwd_hooks: list[tuple[str, HookFn]] = ()) -> FeatureSet:
    """Features of one batch ``[B, 3, H, W]`` (already on the backbone's device)."""
    adapter = hooked.adapter
    patches = hooked.token_layout(num_registers).patch_slice
    pooled, cache = hooked.run_with_cache(images, [FINAL], num_registers=num_registers, fwd_hooks=fwd_hooks)
    patch_mean = adapter.project(cache[FINAL][:, patches].float().mean(dim=1))   # [B, d_out]
    return FeatureSet(pooled.float().cpu().numpy(), patch_mean.float().cpu().numpy())


def extract_features(hooked: HookedViT, batches: Iterable[torch.Tensor], *, num_registers: int = 0,
                     fwd_hooks: list[tuple[str, HookFn]] = (), progress: tqdm | None = None) -> FeatureSet:
    """Features of every batch, in order."""
    parts = []
    for images in batches:
        parts.append(extract_batch(hooked, images.to(hooked.backbone.device, non_blocking=True),
                                   num_registers=num_registers, fwd_hooks=fwd_hooks))
        if progress is not None:
            progress.update(images.shape[0])
    if not parts:
        width = int(hooked.adapter.project(torch.zeros(1, hooked.backbone.width)).shape[-1])
        return FeatureSet(np.zeros((0, width), np.float32), np.zeros((0, width), np.float32))
    return FeatureSet.concatenate(parts)
