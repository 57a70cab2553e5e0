"""The register-neuron intervention of docs/intervention.md: a pure function on one layer's activations, and
the hook functions that apply it (one per intervened layer, at ``blocks.{l}.mlp.hook_post``).

What the registers receive (``register_value``): ``max``, the signed max (ttr); or a control's
substitute (docs/intervention.md, "Controls"): ``mean``, each neuron's mean over this image's
patches; ``noise``, a seeded Gaussian draw with that mean and the patches' standard deviation;
``shuffle``, the value another image of the same batch gives (a seeded derangement).  Which mode
runs with what: :func:`common.registers.controls.mode_setup`.

The seeded draws depend on ``(seed, batch number, layer)`` only, never on the order in which
batches run, so that torchrun's ranks (each computing its own batches) give what one process gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from common.models.hooks import HookFn, TokenLayout, mlp_post

NORMAL_VALUES = ("zero", "mean", "only_outliers", "same")
INTERVENTION_MAX = ("layer", "neuron")
REGISTER_VALUES = ("max", "mean", "noise", "shuffle")
# Tags that keep the seeded streams of different draws apart (docs/intervention.md, "Controls").
NOISE_STREAM, SHUFFLE_STREAM, TRAINED_NOISE_STREAM, RANDOM_NEURONS_STREAM = 1, 2, 3, 4


def stream_seed(*parts: int) -> int:
    """One 32-bit seed from non-negative integers (numpy's SeedSequence mixes them)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def standard_normal(shape: tuple[int, ...], device: torch.device, *parts: int) -> torch.Tensor:
    """Float32 standard-normal draws on ``device`` from the stream ``parts`` (drawn where they are
    used: no transfer per layer; the device type is part of every feature cache key)."""
    generator = torch.Generator(device=device).manual_seed(stream_seed(*parts))
    return torch.randn(shape, generator=generator, device=device)


def derangement(size: int, *parts: int) -> torch.Tensor:
    """A permutation of ``range(size)`` without a fixed point, drawn from the stream ``parts``
    (uniform over derangements: permutations drawn until one has no fixed point).  ``size`` 1 has
    none: ``[0]`` (the caller gives a batch of one a donor image, docs/intervention.md)."""
    if size < 2:
        return torch.zeros(size, dtype=torch.long)
    rng = np.random.default_rng(stream_seed(*parts))
    while True:
        order = rng.permutation(size)
        if not np.any(order == np.arange(size)):
            return torch.from_numpy(order)


@dataclass(frozen=True)
class Intervention:
    """Which register neurons to move, and how.

    ``neurons``: ``{layer: [neuron, ...]}`` (0-based layers).  ``normal_values`` says what
    patch positions get for those neurons; ``per_neuron_max`` uses one maximum per neuron
    instead of one scalar per (image, layer) (config ``intervention_max: neuron``).
    """

    neurons: dict[int, list[int]] = field(default_factory=dict)
    scale: float = 1.0
    normal_values: str = "zero"
    per_neuron_max: bool = False
    register_value: str = "max"     # max (ttr) | mean | noise | shuffle (the controls)
    seed: int = 0                   # of the noise and shuffle draws

    @classmethod
    def from_config(cls, neurons: dict[int, list[int]], config: dict) -> "Intervention":
        """From a run's config (checked where it entered: :mod:`common.app.settings`)."""
        return cls(neurons=dict(neurons), scale=float(config["scale"]), normal_values=config["normal_values"],
                   per_neuron_max=config["intervention_max"] == "neuron")

    def describe(self) -> dict:
        """A JSON-friendly description (used in cache keys and config.json); a control's
        substitute and its seed are named only when there is one (ttr's description is unchanged)."""
        described = {
            "neurons": {str(layer): list(map(int, ids)) for layer, ids in sorted(self.neurons.items())},
            "scale": float(self.scale),
            "normal_values": self.normal_values,
            "per_neuron_max": bool(self.per_neuron_max),
        }
        if self.register_value != "max":
            described.update(register_value=self.register_value, seed=int(self.seed))
        return described

    @property
    def shuffles(self) -> bool:
        """Whether a batch of one image needs a donor image (docs/intervention.md)."""
        return self.register_value == "shuffle"

    def fwd_hooks(self, layout: TokenLayout, batch: int = 0) -> list[tuple[str, HookFn]]:
        """The hook functions that apply this intervention for ``layout`` (its R registers) to
        batch number ``batch`` of an image list (it seeds the noise and the shuffle)."""
        hooks = []
        for layer, ids in sorted(self.neurons.items()):
            if not len(ids):
                continue
            index = list(ids)

            def move(activations: torch.Tensor, name: str, index=index, layer=layer) -> torch.Tensor:
                images, registers = activations.shape[0], layout.registers
                noise = donors = None
                if self.register_value == "noise":
                    noise = standard_normal((images, registers, len(index)), activations.device, self.seed,
                                            NOISE_STREAM, batch, layer)
                elif self.register_value == "shuffle":
                    donors = derangement(images, self.seed, SHUFFLE_STREAM, batch)
                return apply_intervention(
                    activations, index, num_prefix_tokens=layout.prefix, num_registers=registers,
                    scale=self.scale, normal_values=self.normal_values, per_neuron_max=self.per_neuron_max,
                    register_value=self.register_value, noise=noise, donors=donors)

            hooks.append((mlp_post(layer), move))
        return hooks


def signed_max(values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The largest value where its magnitude strictly exceeds the most negative's, else the most negative."""
    largest = values.amax(dim=dims)
    most_negative = values.amin(dim=dims)
    return torch.where(largest.abs() > most_negative.abs(), largest, most_negative)


def apply_intervention(
    activations: torch.Tensor,
    neurons: list[int] | torch.Tensor,
    *,
    num_prefix_tokens: int,
    num_registers: int,
    scale: float = 1.0,
    normal_values: str = "zero",
    per_neuron_max: bool = False,
    register_value: str = "max",
    noise: torch.Tensor | None = None,
    donors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Move register neurons onto the test-time register tokens, each image on its own.

    ``activations``: ``[B, N, D_mlp]`` with tokens ``[CLS, trained registers, patches,
    test-time registers]``; ``num_prefix_tokens`` = 1 + T, ``num_registers`` = R.  Returns a
    new tensor; the input is left as it was.  Computed in float32 whatever the input dtype (the
    signed max and the patch means stay exact under bf16 autocast), written back in its dtype.

    1. ``m`` = signed max over all N positions and the neurons in ``neurons`` (per image).
    2. register positions get ``scale * v`` for those neurons, where ``v`` is (``register_value``)
       ``max``: ``m``; ``mean``: each neuron's mean over the image's patches; ``noise``: that mean
       plus the patches' (unbiased) standard deviation times ``noise`` (standard-normal draws
       ``[B, R, S]``); ``shuffle``: ``m`` of image ``donors[b]`` (an index ``[B]``) of the batch.
    3. patch positions follow ``normal_values`` (zero | mean | only_outliers | same).
    4. CLS and trained registers are never touched.
    """
    if normal_values not in NORMAL_VALUES:   # a user's value is checked where it enters (common.app.settings)
        raise ValueError(f"normal_values {normal_values!r} is unknown; use one of {', '.join(NORMAL_VALUES)}")
    if register_value not in REGISTER_VALUES:
        raise ValueError(f"register_value {register_value!r} is unknown; use one of {', '.join(REGISTER_VALUES)}")
    index = torch.as_tensor(neurons, dtype=torch.long, device=activations.device)
    num_tokens = activations.shape[1]
    patch_start, patch_end = num_prefix_tokens, num_tokens - num_registers
    selected = activations.index_select(2, index).float()              # [B, N, S]
    patches = selected[:, patch_start:patch_end, :]                     # [B, P, S]

    updated = selected.clone()
    if num_registers > 0:
        value = _register_value(selected, patches, per_neuron_max, register_value, noise, donors)  # [B, 1|R, 1|S]
        updated[:, patch_end:, :] = (scale * value).expand(-1, num_registers, updated.shape[2])
    if normal_values == "zero":
        updated[:, patch_start:patch_end, :] = 0.0
    elif normal_values == "mean":
        updated[:, patch_start:patch_end, :] = patches.mean(dim=1, keepdim=True).expand_as(patches)
    elif normal_values == "only_outliers":
        mean = patches.mean(dim=1, keepdim=True)
        std = patches.std(dim=1, keepdim=True, unbiased=True)
        updated[:, patch_start:patch_end, :] = torch.where(patches > mean + std, mean, patches)

    out = activations.clone()
    out.index_copy_(2, index, updated.to(activations.dtype))
    return out


def _register_value(selected: torch.Tensor, patches: torch.Tensor, per_neuron_max: bool, register_value: str,
                    noise: torch.Tensor | None, donors: torch.Tensor | None) -> torch.Tensor:
    """What the registers get before ``scale``: ``[B, 1, 1]``, ``[B, 1, S]`` or ``[B, R, S]``
    (``selected [B, N, S]``, ``patches [B, P, S]``: the activations before the intervention)."""
    if register_value == "mean":
        return patches.mean(dim=1, keepdim=True)
    if register_value == "noise":
        if noise is None:
            raise ValueError("register_value 'noise' needs the standard-normal draws (noise)")
        mean, std = patches.mean(dim=1, keepdim=True), patches.std(dim=1, keepdim=True, unbiased=True)
        return mean + std * noise.to(device=patches.device, dtype=patches.dtype)
    if per_neuron_max:
        value = signed_max(selected, dims=(1,))[:, None, :]            # [B, 1, S]
    else:
        value = signed_max(selected, dims=(1, 2))[:, None, None]       # [B, 1, 1]
    if register_value == "shuffle":
        if donors is None:
            raise ValueError("register_value 'shuffle' needs the donor of each image (donors)")
        value = value[donors.to(value.device)]
    return value
