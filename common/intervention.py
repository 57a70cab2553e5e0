"""The register-neuron intervention of SPEC §4, as a pure function on one layer's activations."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.errors import UserError

NORMAL_VALUES = ("zero", "mean", "only_outliers", "same")


@dataclass(frozen=True)
class Intervention:
    """Which register neurons to move, and how.

    ``neurons``: ``{layer: [neuron, ...]}`` (0-based layers).  ``normal_values`` says what
    patch positions get for those neurons; ``per_neuron_max`` uses one maximum per neuron
    instead of one scalar per (image, layer).
    """

    neurons: dict[int, list[int]] = field(default_factory=dict)
    scale: float = 1.0
    normal_values: str = "zero"
    per_neuron_max: bool = False

    def __post_init__(self) -> None:
        if self.normal_values not in NORMAL_VALUES:
            raise UserError(
                f"normal_values {self.normal_values!r} is unknown; use one of {', '.join(NORMAL_VALUES)}"
            )

    def describe(self) -> dict:
        """A JSON-friendly description (used in cache keys and config.json)."""
        return {
            "neurons": {str(layer): list(map(int, ids)) for layer, ids in sorted(self.neurons.items())},
            "scale": float(self.scale),
            "normal_values": self.normal_values,
            "per_neuron_max": bool(self.per_neuron_max),
        }


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
    new tensor; the input is left as it was.

    1. ``m`` = signed max over all N positions and the neurons in ``neurons`` (per image).
    2. register positions get ``scale * m`` for those neurons.
    3. patch positions follow ``normal_values`` (zero | mean | only_outliers | same).
    4. CLS and trained registers are never touched.
    """
    if normal_values not in NORMAL_VALUES:
        raise UserError(f"normal_values {normal_values!r} is unknown; use one of {', '.join(NORMAL_VALUES)}")
    index = torch.as_tensor(neurons, dtype=torch.long, device=activations.device)
    num_tokens = activations.shape[1]
    patch_start, patch_end = num_prefix_tokens, num_tokens - num_registers
    selected = activations.index_select(2, index)                      # [B, N, S]
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
    out.index_copy_(2, index, updated)
    return out
