"""The trained registers' controls (docs/intervention.md, "Controls"): the experiment of Parodi et
al. (2026) on the register tokens a model was trained with (DINOv2 ``_reg``, DINOv3, Virchow2,
any timm model with ``reg_tokens``).

* :class:`TrainedRegisterStats`: per layer, trained register and dimension, the mean and the
  (unbiased) standard deviation over images of the trained registers' residual state at the
  output of every block, ``[L, T, d]``.  Accumulated in the detection pass
  (:class:`TrainedAccumulator`, running float64 sums) and cached with the detection.
* :class:`TrainedSubstitution`: at the output of every block (``blocks.{l}.hook_resid_post``)
  the trained registers' state ``[B, T, d]`` is replaced by zeros (``zero``), the mean
  (``mean``), a seeded Gaussian draw with the mean and standard deviation (``noise``), or the
  state of another image of the same batch (``shuffle``: a seeded derangement, the same in every
  block of a batch).  No test-time register, no neuron intervention.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from common.models.hooks import HookedViT, HookFn, TokenLayout, resid_post
from common.registers.intervention import SHUFFLE_STREAM, TRAINED_NOISE_STREAM, derangement, standard_normal

SUBSTITUTE_KINDS = ("zero", "mean", "noise", "shuffle")


@dataclass(frozen=True, eq=False)     # arrays inside: compared by identity
class TrainedRegisterStats:
    """Mean and standard deviation ``[L, T, d]`` (float32) of the trained registers' residual
    state at each block's output, over ``images`` images of the model as released."""

    mean: np.ndarray
    std: np.ndarray
    images: int

    def arrays(self) -> dict[str, np.ndarray]:
        """As entries of a cache file (read back by :meth:`from_arrays`)."""
        return {"trained_mean": self.mean, "trained_std": self.std, "trained_images": np.array(self.images)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "TrainedRegisterStats | None":
        """The statistics of a cache entry; None when it holds none (an older entry)."""
        if "trained_mean" not in arrays:
            return None
        return cls(np.asarray(arrays["trained_mean"], np.float32), np.asarray(arrays["trained_std"], np.float32),
                   int(arrays["trained_images"]))

    def fingerprint(self) -> str:
        """A short hash of the values (features computed with them are cached under it)."""
        digest = hashlib.sha256()
        for array in (self.mean, self.std):
            digest.update(np.ascontiguousarray(array, np.float32).tobytes())
        return digest.hexdigest()[:16]


class TrainedAccumulator:
    """Running float64 sums of the trained registers' state at every block's output; its read-only
    hook functions go into a forward that also does something else (the detection pass)."""

    def __init__(self, hooked: HookedViT):
        backbone = hooked.backbone
        self.layout = hooked.token_layout(0)
        self.layers = backbone.num_layers
        count = self.layout.trained_registers.stop - self.layout.trained_registers.start
        # [2, L, T, d]: sum and sum of squares
        self.sums = torch.zeros(2, self.layers, count, backbone.width, dtype=torch.float64, device=backbone.device)

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        trained = self.layout.trained_registers

        def read(tokens: torch.Tensor, name: str, layer: int) -> None:
            state = tokens[:, trained].double()                               # [B, T, d]
            self.sums[0, layer] += state.sum(dim=0)
            self.sums[1, layer] += state.square().sum(dim=0)

        return [(resid_post(layer), lambda tokens, name, layer=layer: read(tokens, name, layer))
                for layer in range(self.layers)]

    def stats(self, images: int) -> TrainedRegisterStats:
        """Mean and unbiased standard deviation over ``images`` images (the sums of every process)."""
        total, squares = self.sums[0], self.sums[1]
        mean = total / max(images, 1)
        variance = (squares - images * mean.square()) / max(images - 1, 1)
        std = variance.clamp_min(0).sqrt()
        return TrainedRegisterStats(mean.float().cpu().numpy(), std.float().cpu().numpy(), int(images))


@torch.no_grad()
def trained_register_stats(hooked: HookedViT, batches: Iterable[torch.Tensor]) -> TrainedRegisterStats:
    """The statistics over ``batches`` of preprocessed images ``[B, 3, H, W]`` on their own (a
    run whose neurons came from a file, where no detection pass ran)."""
    accumulator = TrainedAccumulator(hooked)
    images = 0
    for batch in batches:
        hooked.run_with_hooks(batch.to(hooked.backbone.device), accumulator.fwd_hooks())
        images += batch.shape[0]
    return accumulator.stats(images)


def substitute_trained(tokens: torch.Tensor, trained: slice, kind: str, *, mean: torch.Tensor | None = None,
                       std: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       donors: torch.Tensor | None = None) -> torch.Tensor:
    """``tokens [B, N, d]`` with the trained registers (positions ``trained``, T of them) replaced;
    a new tensor.  ``mean``, ``std``: ``[T, d]`` of this block; ``noise``: standard-normal draws
    ``[B, T, d]``; ``donors``: ``[B]``, image b takes image ``donors[b]``'s state."""
    if kind not in SUBSTITUTE_KINDS:
        raise ValueError(f"unknown trained-register substitute {kind!r}; use one of {', '.join(SUBSTITUTE_KINDS)}")
    out = tokens.clone()
    state = tokens[:, trained]                                                 # [B, T, d]
    if kind == "zero":
        value = torch.zeros_like(state)
    elif kind == "mean":
        value = mean.to(state.device, state.dtype).expand_as(state)
    elif kind == "noise":
        value = (mean.to(state.device).float() + std.to(state.device).float() * noise.to(state.device)).to(state.dtype)
    else:
        value = state[donors.to(state.device)]
    out[:, trained] = value
    return out


@dataclass(frozen=True)
class TrainedSubstitution:
    """One trained-register control: ``kind`` (zero | mean | noise | shuffle) at every block's output."""

    kind: str
    layers: int                                    # the model's blocks (every block's output is replaced)
    stats: TrainedRegisterStats | None = None      # needed by mean and noise
    seed: int = 0

    def __post_init__(self):
        if self.kind not in SUBSTITUTE_KINDS:
            raise ValueError(f"unknown trained-register substitute {self.kind!r}")
        if self.kind in ("mean", "noise") and self.stats is None:
            raise ValueError(f"trained-{self.kind} needs the trained registers' statistics")

    def describe(self) -> dict:
        """A JSON-friendly description (used in cache keys)."""
        described: dict = {"trained_registers": self.kind}
        if self.kind in ("mean", "noise"):
            described["statistics"] = self.stats.fingerprint()
        if self.kind in ("noise", "shuffle"):
            described["seed"] = int(self.seed)
        return described

    @property
    def shuffles(self) -> bool:
        """Whether a batch of one image needs a donor image (docs/intervention.md)."""
        return self.kind == "shuffle"

    def fwd_hooks(self, layout: TokenLayout, batch: int = 0) -> list[tuple[str, HookFn]]:
        """One hook per block (at its output) for batch number ``batch`` of an image list."""
        trained = layout.trained_registers
        count = trained.stop - trained.start
        on_device: dict[str, torch.Tensor] = {}     # the statistics, moved once per batch, not once per block

        def substitute(tokens: torch.Tensor, name: str, layer: int) -> torch.Tensor:
            images = tokens.shape[0]
            if self.stats is not None and not on_device:
                on_device["mean"] = torch.from_numpy(self.stats.mean).to(tokens.device)
                on_device["std"] = torch.from_numpy(self.stats.std).to(tokens.device)
            mean, std = on_device.get("mean"), on_device.get("std")
            noise = donors = None
            if self.kind == "noise":
                noise = standard_normal((images, count, tokens.shape[-1]), tokens.device, self.seed,
                                        TRAINED_NOISE_STREAM, batch, layer)
            elif self.kind == "shuffle":
                donors = derangement(images, self.seed, SHUFFLE_STREAM, batch)
            return substitute_trained(tokens, trained, self.kind, mean=None if mean is None else mean[layer],
                                      std=None if std is None else std[layer], noise=noise, donors=donors)

        return [(resid_post(layer), lambda tokens, name, layer=layer: substitute(tokens, name, layer))
                for layer in range(self.layers)]
