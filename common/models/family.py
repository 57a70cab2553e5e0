"""The family adapter: everything the rest of the tool needs to know about one backbone family.

A family (``clip``, ``dinov2``, ``dinov3``) is one subclass of :class:`FamilyAdapter`, in a file
of its own.  Building a model, finding its parts, attaching the register-append and the q/k
reader, converting a foreign checkpoint and planting the fixture's neurons are answered here, so
the hook manager, the loader, the fixture and the analysis never ask which family they hold.

Class-level methods describe a *configured* model (before or without building it); an adapter
instance wraps one built model::

    adapter = get_family("dinov2")(model)
    adapter.blocks[3], adapter.mlp_out(3), adapter.final_norm
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torchvision import transforms

from common.models.weights import WeightsHint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Handle = torch.utils.hooks.RemovableHandle
# store(q, k) with q, k: [B, H, N, dh] (after any q/k norm and rotary embedding)
QKStore = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class ModelIdentity:
    """What a register-neuron ranking is only valid for (recorded in register_neurons.json)."""

    family: str
    architecture: str
    layers: int
    mlp_width: int
    weights: str = ""            # portable weights name (tag or file name), informative only

    def as_dict(self) -> dict:
        return {"family": self.family, "architecture": self.architecture, "layers": self.layers,
                "mlp_width": self.mlp_width, "weights": self.weights}

    def describe(self) -> str:
        return f"{self.family} {self.architecture} ({self.layers} layers, {self.mlp_width} MLP units)"

    def same_model(self, other: "ModelIdentity") -> bool:
        """Same family, architecture and shape (the weights may differ: a warning, not an error)."""
        return (self.family, self.architecture, self.layers, self.mlp_width) == \
               (other.family, other.architecture, other.layers, other.mlp_width)


@dataclass(frozen=True)
class BlockParts:
    """Where a family's transformer block keeps its projections (paths inside one block)."""

    mlp_in: str            # e.g. "mlp.fc1"
    mlp_out: str           # its input are the neuron activations
    attn_out: str


@dataclass(frozen=True)
class PlantingGains:
    """How strongly the planted fixture's circuit is wired into a family's small model
    (families without a norm before the blocks need small raw filter responses, amplified later)."""

    filter: float          # patch-embedding high-pass filters
    energy: float          # |filter| detector neurons' input gain
    energy_write: float    # what they write into the energy dimension
    gate: float            # border-patch mark in the position embedding


@dataclass
class TextEncoder:
    """A text tower for zero-shot classification: prompts -> unit-norm embeddings ``[P, d_out]`` in
    the space of the pooled image feature, and the model's logit scale."""

    encode: Callable[[torch.Tensor], torch.Tensor]      # tokens [P, T] -> [P, d_out]
    tokenizer: Callable[[list[str]], torch.Tensor]      # prompts -> tokens [P, T]
    logit_scale: float
    module: nn.Module | None = None                     # what ``encode`` runs (moved with ``to``)
    device: torch.device = torch.device("cpu")

    def to(self, device: torch.device) -> "TextEncoder":
        if self.module is not None:
            self.module.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        embeddings = self.encode(tokens).float()
        return embeddings / embeddings.norm(dim=-1, keepdim=True)


@dataclass
class Built:
    """A freshly built model of a family, ready to wrap as a Backbone."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]     # PIL image -> [3, H, W]
    weights_id: str                               # identifies the weights (cache keys)
    description: str                              # for humans
    text: TextEncoder | None = None               # a text tower, when the family has one and it was asked for


def eval_preprocess(resize: int, crop: int) -> transforms.Compose:
    """DINO's classification-eval transform: resize (bicubic), centre crop, ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, H*dh] -> [B, H, N, dh]``."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def with_registers(tokens: torch.Tensor, num_registers: int,
                   on_tokens: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.Tensor:
    """``tokens [B, N, d]`` with ``num_registers`` zero tokens appended, as ``on_tokens`` leaves them."""
    batch, _, width = tokens.shape
    tokens = torch.cat([tokens, tokens.new_zeros(batch, num_registers, width)], dim=1)
    replaced = on_tokens(tokens)
    return tokens if replaced is None else replaced


def appending_pre_hook(num_registers: int, on_tokens: Callable[[torch.Tensor], torch.Tensor | None]):
    """A forward pre-hook that appends the registers to a module's first input (the tokens)."""
    def pre_hook(module, args):
        return (with_registers(args[0], num_registers, on_tokens),) + tuple(args[1:])

    return pre_hook


def seeded_init(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with torch's RNG seeded by ``seed``, leaving the caller's global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class FamilyAdapter(ABC):
    """Base class of the family adapters (see the module docstring)."""

    name: ClassVar[str]
    title: ClassVar[str]                  # for humans, e.g. "CLIP"
    planting: ClassVar[PlantingGains]     # the fixture's circuit gains for this family
    block_parts: ClassVar[BlockParts]     # where a block keeps its MLP and attention projections
    supports_zero_shot: ClassVar[bool] = False   # has a text tower (build(..., zero_shot=True))

    def __init__(self, model: nn.Module):
        self.model = model

    # ---------------------------------------------------------------- a configured model
    @classmethod
    @abstractmethod
    def architecture(cls, config: dict) -> str:
        """The library's architecture name for ``config``; a UserError naming an unknown
        ``backbone_size`` or ``model_name`` (cheap: the settings call it to check a config)."""

    @classmethod
    @abstractmethod
    def identity(cls, config: dict) -> ModelIdentity:
        """Depth and MLP width of the configured model, without loading weights."""

    @classmethod
    @abstractmethod
    def weights_name(cls, config: dict) -> str:
        """Portable name of the configured weights (a pretrained tag)."""

    @classmethod
    @abstractmethod
    def weights_hint(cls, config: dict) -> WeightsHint:
        """What to download when the weights are missing (named in the error; a UserError for
        configured names that have no released weights)."""

    @classmethod
    def cached_weights(cls, config: dict) -> str | None:
        """A weights file in a library cache other than the hub's (e.g. torch hub), or None."""
        return None

    @classmethod
    @abstractmethod
    def build(cls, config: dict, weights_file: str | None, seed: int) -> Built:
        """The model with ``weights_file`` loaded (converted from a foreign format where needed),
        or randomly initialised with ``seed`` when it is None.  The global RNG is left alone."""

    @classmethod
    @abstractmethod
    def build_small(cls, seed: int, *, image_size: int, patch_size: int, width: int, depth: int,
                    heads: int, mlp_ratio: float) -> nn.Module:
        """A small randomly initialised model of this family (the planted fixture's)."""

    @classmethod
    def small_preprocess(cls, image_size: int) -> Callable:
        """The fixture's preprocess: this family's, at ``image_size``."""
        return eval_preprocess(image_size, image_size)

    @classmethod
    def small_text_encoder(cls, embed_dim: int, seed: int) -> TextEncoder | None:
        """A small randomly initialised text tower for the fixture (families with one)."""
        return None

    # ---------------------------------------------------------------- a built model's parts
    @property
    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order."""

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus trained registers (1 + T)."""
        return 1

    @property
    @abstractmethod
    def grid_size(self) -> tuple[int, int]:
        """(rows, cols) of the image-patch grid."""

    @property
    @abstractmethod
    def width(self) -> int:
        """Residual-stream width d."""

    @property
    @abstractmethod
    def input_size(self) -> int:
        """Side of the square input image, in pixels."""

    @property
    def num_heads(self) -> int:
        return int(self.blocks[0].attn.num_heads)

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm after the last block (its output tokens are the final-norm tokens)."""

    def mlp_in(self, layer: int) -> nn.Linear:
        """The MLP input projection of block ``layer``."""
        return self.blocks[layer].get_submodule(self.block_parts.mlp_in)

    def mlp_out(self, layer: int) -> nn.Linear:
        """The MLP output projection of block ``layer``: its input are the neuron activations
        ``[B, N, D_mlp]``."""
        return self.blocks[layer].get_submodule(self.block_parts.mlp_out)

    def attn_out(self, layer: int) -> nn.Linear:
        """The attention output projection of block ``layer``."""
        return self.blocks[layer].get_submodule(self.block_parts.attn_out)

    @property
    def mlp_width(self) -> int:
        """D_mlp: the neurons of one block's MLP."""
        return int(self.mlp_out(0).in_features)

    @property
    @abstractmethod
    def activation(self) -> str:
        """Name of the MLP activation actually used (recorded in config.json and cache keys)."""

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens ``[B, ..., d]`` -> the space of the pooled feature ``[B, ..., d_out]``
        (CLIP's projection; the identity elsewhere).  The pooled feature is ``project`` of the
        final-norm CLS token."""
        return tokens

    # ---------------------------------------------------------------- hook attachment
    @abstractmethod
    def attach_registers(self, num_registers: int,
                         on_tokens: Callable[[torch.Tensor], torch.Tensor | None]) -> list[Handle]:
        """Append ``num_registers`` zero tokens right after the position embedding; ``on_tokens``
        sees (and may replace) the tokens ``[B, N + R, d]`` there."""

    @abstractmethod
    def attach_qk(self, layer: int, store: QKStore) -> Handle:
        """Call ``store(q, k)`` with block ``layer``'s queries and keys ``[B, H, N, dh]`` as its
        attention uses them, computed on the side (the block's output is unchanged)."""

    # ---------------------------------------------------------------- fixture planting
    @abstractmethod
    def patch_embedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight ``[d, 3, p, p]``, bias ``[d]`` or None) of the patch embedding."""

    @abstractmethod
    def position_embedding(self) -> tuple[torch.Tensor, int]:
        """(the learned absolute position table ``[M, d]`` (a view), the row of the first patch):
        rows before it belong to prefix tokens."""

    @abstractmethod
    def cls_embedding(self) -> torch.Tensor:
        """The CLS token's input embedding ``[d]`` (a view)."""

    def trained_register_embedding(self) -> torch.Tensor | None:
        """The trained registers' input embeddings ``[T, d]`` (a view), None without any."""
        return None

    @abstractmethod
    def qkv_projection(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight ``[3d, d]``, bias ``[3d]`` or None) computing q, k, v of block ``layer``
        (rows: q of every head, then k, then v; head h's coordinates are ``h*dh .. (h+1)*dh``)."""

    def stable_qk_coordinate(self) -> tuple[int, int | None]:
        """(a coordinate within a head whose q.k term positions do not rotate, its rotary partner or
        None): what the fixture's attention-sink circuit writes into."""
        return 0, None

