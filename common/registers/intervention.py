"""The register-neuron intervention of docs/intervention.md: a pure function on one layer's activations, and
the hook functions that apply it (one per intervened layer, at ``blocks.{l}.mlp.hook_post``).

What each mode runs with (:func:`mode_setup`):

==================  ==========================  ==========================================
mode                test-time registers R        intervention
==================  ==========================  ==========================================
``no-ttr``          0                            none (the model as released)
``ttr``             ``num_registers`` (>= 1)     steps 1-4: the max moved onto the registers
``no-ttr-removed``  0                            step 3 only: outliers removed, nowhere to go
==================  ==========================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.models.hooks import HookFn, TokenLayout, mlp_post
from common.registers.modes import BASELINE, REMOVED, TTR

NORMAL_VALUES = ("zero", "mean", "only_outliers", "same")
INTERVENTION_MAX = ("layer", "neuron")


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

    @classmethod
    def from_config(cls, neurons: dict[int, list[int]], config: dict) -> "Intervention":
        """From a run's config (checked where it entered: :mod:`common.app.settings`)."""
        return cls(neurons=dict(neurons), scale=float(config["scale"]), normal_values=config["normal_values"],
                   per_neuron_max=config["intervention_max"] == "neuron")

    def describe(self) -> dict:
        """A JSON-friendly description (used in cache keys and config.json)."""
        return {
            "neurons": {str(layer): list(map(int, ids)) for layer, ids in sorted(self.neurons.items())},
            "scale": float(self.scale),
            "normal_values": self.normal_values,
            "per_neuron_max": bool(self.per_neuron_max),
        }

    def fwd_hooks(self, layout: TokenLayout) -> list[tuple[str, HookFn]]:
        """The hook functions that apply this intervention for ``layout`` (its R registers)."""
        hooks = []
        for layer, ids in sorted(self.neurons.items()):
            if not len(ids):
                continue
            index = list(ids)

            def move(activations: torch.Tensor, name: str, index=index) -> torch.Tensor:
                return apply_intervention(
                    activations, index, num_prefix_tokens=layout.prefix, num_registers=layout.registers,
                    scale=self.scale, normal_values=self.normal_values, per_neuron_max=self.per_neuron_max)

            hooks.append((mlp_post(layer), move))
        return hooks


def mode_setup(mode: str, intervention: Intervention, num_registers: int) -> tuple[int, Intervention | None]:
    """(test-time registers, intervention or None) that ``mode`` runs with (table above)."""
    if mode == BASELINE:
        return 0, None
    if mode == TTR:
        if num_registers < 1:
            raise ValueError(f"num_registers={num_registers}: ttr needs at least one test-time register")
        return num_registers, intervention
    if mode == REMOVED:
        return 0, intervention
    raise ValueError(f"unknown mode {mode!r}")


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
) -> torch.Tensor:
    """Move register neurons onto the test-time register tokens, each image on its own.

    ``activations``: ``[B, N, D_mlp]`` with tokens ``[CLS, trained registers, patches,
    test-time registers]``; ``num_prefix_tokens`` = 1 + T, ``num_registers`` = R.  Returns a
    new tensor; the input is left as it was.  Computed in float32 whatever the input dtype (the
    signed max and the patch means stay exact under bf16 autocast), written back in its dtype.

    1. ``m`` = signed max over all N positions and the neurons in ``neurons`` (per image).
    2. register positions get ``scale * m`` for those neurons.
    3. patch positions follow ``normal_values`` (zero | mean | only_outliers | same).
    4. CLS and trained registers are never touched.
    """
    if normal_values not in NORMAL_VALUES:   # a user's value is checked where it enters (common.app.settings)
        raise ValueError(f"normal_values {normal_values!r} is unknown; use one of {', '.join(NORMAL_VALUES)}")
    index = torch.as_tensor(neurons, dtype=torch.long, device=activations.device)
    num_tokens = activations.shape[1]
    patch_start, patch_end = num_prefix_tokens, num_tokens - num_registers
    selected = activations.index_select(2, index).float()              # [B, N, S]
    if per_neuron_max:
        register_value = signed_max(selected, dims=(1,))[:, None, :]    # [B, 1, S]
    else:
        register_value = signed_max(selected, dims=(1, 2))[:, None, None]  # [B, 1, 1]

    updated = selected.clone()
    if num_registers > 0:
        updated[:, patch_end:, :] = (scale * register_value).expand(-1, num_registers, updated.shape[2])
    patches = selected[:, patch_start:patch_end, :]                     # [B, P, S]
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
