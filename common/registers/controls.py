"""What each mode runs with, controls included (docs/intervention.md, "The modes" and "Controls").

==================  ==========================  ================================================
mode                test-time registers R        what changes the forward
==================  ==========================  ================================================
``no-ttr``          0                            nothing (the model as released)
``ttr``             ``num_registers`` (>= 1)     steps 1-4 on the selected neurons
``no-ttr-removed``  0                            step 3 only: outliers removed, nowhere to go
``ttr-random-NN``   ``num_registers``            steps 1-4 on draw NN of random neurons
                                                 (:func:`random_neurons`)
``ttr-mean``        ``num_registers``            ttr, the registers get each neuron's patch mean
``ttr-noise``       ``num_registers``            ttr, the registers get a seeded Gaussian draw
``ttr-shuffle``     ``num_registers``            ttr, the registers get another image's value
``trained-*``       0                            the trained registers' state replaced at every
                                                 block's output (:mod:`common.registers.trained`)
==================  ==========================  ================================================

A mode's change gives its hook functions per batch number (the noise and the shuffle are seeded
by it), and :func:`extract_mode_batch` runs one batch of a mode; a shuffle gives a batch of one
image a donor: the last image of the previous batch, run beside it and dropped from the features.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from common.errors import UserError
from common.models.hooks import HookedViT, HookFn, TokenLayout
from common.registers.features import FeatureSet, extract_batch
from common.registers.intervention import RANDOM_NEURONS_STREAM, Intervention, stream_seed
from common.registers.modes import (
    BASELINE,
    REMOVED,
    TRAINED_CONTROLS,
    TTR,
    TTR_MEAN,
    TTR_NOISE,
    TTR_SHUFFLE,
    draw_index,
    run_modes,
)
from common.registers.trained import TrainedRegisterStats, TrainedSubstitution

# What each substitute mode puts on the registers (Intervention.register_value).
REGISTER_VALUE_OF = {TTR_MEAN: "mean", TTR_NOISE: "noise", TTR_SHUFFLE: "shuffle"}


@dataclass(frozen=True)
class ControlInputs:
    """What the controls need besides the ttr intervention: the run's seed, the model's MLP width
    and depth, and the trained registers' statistics (None where none were computed)."""

    seed: int
    mlp_width: int
    layers: int
    trained: TrainedRegisterStats | None = None


def modes_of_run(config: dict, trained_registers: int) -> tuple[str, ...]:
    """The modes a run with ``config`` computes on a model with that many trained registers."""
    return run_modes(config["extra_modes"], controls=bool(config.get("controls")),
                     random_draws=int(config.get("random_draws", 0)), trained_registers=trained_registers)


# --------------------------------------------------------------------------------------------
# random neurons


def random_neurons(selected: dict[int, list[int]], mlp_width: int, seed: int, draw: int) -> dict[int, list[int]]:
    """Draw ``draw`` (1-based) of ``ttr-random``: in each layer of ``selected``, as many neurons as
    it selects there, uniformly without replacement among the layer's others (never a selected
    one), sorted; from ``numpy.random.default_rng`` of the stream ``(seed, 4, draw)``."""
    rng = np.random.default_rng(stream_seed(seed, RANDOM_NEURONS_STREAM, draw))
    drawn: dict[int, list[int]] = {}
    for layer, ids in sorted(selected.items()):
        others = np.setdiff1d(np.arange(mlp_width), np.asarray(ids, dtype=np.int64))
        if len(others) < len(ids):
            raise UserError(f"top_k selects {len(ids)} of the {mlp_width} neurons of layer {layer}: a layer-matched "
                            "random draw (ttr-random) needs as many other neurons there; lower top_k")
        drawn[int(layer)] = sorted(int(n) for n in rng.choice(others, size=len(ids), replace=False))
    return drawn


def neurons_hash(neurons: dict[int, list[int]]) -> str:
    """A short hash that names a neuron set (``controls.csv``): sha256 of its sorted JSON."""
    text = json.dumps({str(layer): sorted(map(int, ids)) for layer, ids in sorted(neurons.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# modes


@dataclass(frozen=True)
class ModeRun:
    """How one mode runs: its test-time registers R and what changes the forward (None: nothing)."""

    mode: str
    num_registers: int
    change: Intervention | TrainedSubstitution | None

    def fwd_hooks(self, layout: TokenLayout, batch: int = 0) -> list[tuple[str, HookFn]]:
        """The hook functions for batch number ``batch`` of an image list."""
        return self.change.fwd_hooks(layout, batch) if self.change is not None else []

    @property
    def shuffles(self) -> bool:
        return self.change is not None and self.change.shuffles

    def describe(self) -> dict:
        """What identifies the mode's features in a cache key."""
        return {"mode": self.mode, "num_registers": self.num_registers,
                "intervention": self.change.describe() if self.change is not None else None}


def mode_setup(mode: str, intervention: Intervention, num_registers: int,
               controls: ControlInputs | None = None) -> ModeRun:
    """How ``mode`` runs (module docstring), from the run's ttr intervention and R; ``controls``
    is needed by the random draws and the trained-register controls."""
    if mode == BASELINE:
        return ModeRun(mode, 0, None)
    if mode == REMOVED:
        return ModeRun(mode, 0, intervention)
    if mode in TRAINED_CONTROLS:
        if controls is None:
            raise ValueError(f"{mode} needs the control inputs")
        kind = mode.split("-", 1)[1]
        if kind in ("mean", "noise") and controls.trained is None:
            raise ValueError(f"{mode} needs the trained registers' statistics")
        return ModeRun(mode, 0, TrainedSubstitution(kind, controls.layers, controls.trained, controls.seed))
    if num_registers < 1:
        raise ValueError(f"num_registers={num_registers}: {mode} needs at least one test-time register")
    if mode == TTR:
        return ModeRun(mode, num_registers, intervention)
    if mode in REGISTER_VALUE_OF:
        seed = controls.seed if controls is not None else 0
        return ModeRun(mode, num_registers, replace(intervention, register_value=REGISTER_VALUE_OF[mode], seed=seed))
    draw = draw_index(mode)
    if draw is not None:
        if controls is None:
            raise ValueError(f"{mode} needs the control inputs")
        neurons = random_neurons(intervention.neurons, controls.mlp_width, controls.seed, draw)
        return ModeRun(mode, num_registers, replace(intervention, neurons=neurons))
    raise ValueError(f"unknown mode {mode!r}")


# --------------------------------------------------------------------------------------------
# one batch


@torch.no_grad()
def extract_mode_batch(hooked: HookedViT, images: torch.Tensor, run: ModeRun, batch: int,
                       donor: Callable[[], torch.Tensor] | None = None) -> FeatureSet:
    """Features of batch number ``batch`` (``images [B, 3, H, W]`` on the device) in ``run``'s mode.

    A shuffle needs another image in the batch: a batch of one image runs beside ``donor()`` (the
    last image of the previous batch, ``[1, 3, H, W]``), whose features are dropped.  The first
    batch of an image list has no previous batch: a single image there keeps its own value
    (only a list of one image; nothing else can be shuffled with it)."""
    layout = hooked.token_layout(run.num_registers)
    paired = run.shuffles and images.shape[0] == 1 and donor is not None and batch > 0
    if paired:
        images = torch.cat([donor().to(images.device), images])
    features = extract_batch(hooked, images, num_registers=run.num_registers, fwd_hooks=run.fwd_hooks(layout, batch))
    if paired:
        features = FeatureSet(features.pooled[1:], features.patch_mean[1:])
    return features
