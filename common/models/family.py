"""The family adapter: everything the rest of the tool needs to know about one library's ViTs.

A family (``clip``: open_clip; ``timm``: timm's ``VisionTransformer``; ``dinov2``, ``dinov3``) is
one subclass of :class:`FamilyAdapter`, in a file of its own.  Building a model, finding its parts,
attaching the register-append and the q/k reader, converting a foreign checkpoint are answered
here, so the hook manager, the loader and the analysis never ask which family they hold.  Which
config dict and which family a ``--model`` name stands for is :mod:`common.models.presets`'s
business (docs/models.md); how the demo plants neurons is the demo's (``common/demo/planting.py``).

Class-level methods describe a *configured* model (before or without building it); an adapter
instance wraps one built model::

    adapter = get_family("timm").wrap(model)
    adapter.blocks[3], adapter.mlp_out(3), adapter.final_norm, adapter.num_prefix_tokens
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
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
    """What a register-neuron ranking is only valid for (recorded in register_neurons.json), and
    what ``--describe`` prints: the token layout and sizes of the configured model."""

    family: str
    architecture: str
    layers: int
    mlp_width: int               # neurons per block: the width fed to the MLP's output projection
    weights: str = ""            # portable weights name (tag, hub repository or file name), informative only
    width: int = 0               # residual-stream width d (0: not recorded, an older file)
    patch_size: int = 0
    image_size: int = 0
    trained_registers: int = 0
    has_cls: bool = True

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelIdentity":
        """Read back :meth:`as_dict` (also an older file with fewer keys)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        return f"{self.family} {self.architecture} ({self.layers} layers, {self.mlp_width} MLP units)"

    def same_model(self, other: "ModelIdentity") -> bool:
        """Same family, architecture and shape (the weights may differ: a warning, not an error)."""
        return (self.family, self.architecture, self.layers, self.mlp_width) == \
               (other.family, other.architecture, other.layers, other.mlp_width)


@dataclass(frozen=True)
class BlockParts:
    """Where a family's transformer block keeps its output projections (paths inside one block)."""

    mlp_out: str           # its input are the neuron activations (for a gated MLP: the gated product)
    attn_out: str


@dataclass(frozen=True)
class SmallDims:
    """The dimensions of a small model of a configured architecture (the demo's planted models):
    everything else (MLP type, activation, trained registers, layer scale, pooling) is the
    configured model's.  ``trained_registers`` None keeps the configured count."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_ratio: float
    trained_registers: int | None = None


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


INTERPOLATIONS = {"bicubic": transforms.InterpolationMode.BICUBIC,
                  "bilinear": transforms.InterpolationMode.BILINEAR,
                  "nearest": transforms.InterpolationMode.NEAREST}


def eval_preprocess(resize: int, crop: int, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    interpolation: str = "bicubic") -> transforms.Compose:
    """An evaluation transform: resize the short side (``interpolation``), centre crop, normalise
    (DINO's classification eval with the defaults).  It ends in ToTensor and Normalize, as the
    image bank needs."""
    return transforms.Compose([
        transforms.Resize(resize, interpolation=INTERPOLATIONS[interpolation]),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(tuple(mean), tuple(std)),
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


def depth_share_layer(depth: int, share: float) -> int:
    """The 0-based index of the last layer in the first ``share`` of ``depth`` blocks (the seeds:
    CLIP ViT-B 12 x 0.5 -> 5, DINOv2 ViT-L 24 x 5/6 -> 19)."""
    return max(0, min(depth - 1, round(depth * share) - 1))


class FamilyAdapter(ABC):
    """Base class of the family adapters (see the module docstring)."""

    name: ClassVar[str]
    title: ClassVar[str]                  # for humans, e.g. "CLIP"
    block_parts: ClassVar[BlockParts]     # where a block keeps its MLP and attention output projections
    supports_zero_shot: ClassVar[bool] = False   # has a text tower (build with config zero_shot=True)
    # Config keys that choose or build the model (the demo's planted model has none of them).
    building_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def wrap(cls, model: nn.Module) -> "FamilyAdapter":
        """The adapter of a built ``model`` of this family (a family with several kinds of towers
        returns the one that fits)."""
        return cls(model)

    # ---------------------------------------------------------------- a configured model
    @classmethod
    @abstractmethod
    def architecture(cls, config: dict) -> str:
        """The library's architecture name for ``config``; a UserError naming an unknown
        ``backbone_size`` or ``model_name`` (cheap: the settings call it to check a config)."""

    @classmethod
    @abstractmethod
    def create(cls, config: dict, seed: int, dims: SmallDims | None = None) -> nn.Module:
        """The configured architecture, randomly initialised with ``seed`` (the global RNG left
        alone), or a small model of the same structure with ``dims``.  Built under
        ``torch.device("meta")`` it allocates nothing (how :meth:`identity` reads shapes)."""

    @classmethod
    @abstractmethod
    def preprocess(cls, config: dict, image_size: int | None = None) -> Callable:
        """The configured model's evaluation transform (``image_size``: the same at another input
        size, for a small model); a ``Compose`` ending in ``ToTensor`` and ``Normalize``."""

    @classmethod
    def identity(cls, config: dict) -> ModelIdentity:
        """Depth, widths and token layout of the configured model, without loading weights (built on
        the meta device: nothing allocated or initialised)."""
        with torch.device("meta"):
            adapter = cls.wrap(cls.create(config, seed=0))
        return adapter.identity_of(cls.name, cls.architecture(config), cls.weights_name(config))

    @classmethod
    @abstractmethod
    def weights_name(cls, config: dict) -> str:
        """Portable name of the configured weights (a pretrained tag, a hub repository)."""

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
    def generic_config(cls, spec: str) -> dict:
        """The model keys of ``--model <library>:<spec>`` (any model of this family by name), or a
        UserError when the family takes none."""
        from common.errors import UserError

        raise UserError(f"the {cls.name} family has no generic form; use a preset")

    # ---------------------------------------------------------------- a built model's parts
    @property
    def tower(self) -> nn.Module:
        """The transformer itself (embeddings, blocks, final norm): the model, or the trunk a
        wrapper holds."""
        return self.model

    @property
    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order."""

    @property
    def num_prefix_tokens(self) -> int:
        """CLS (when the model has one) plus trained registers."""
        return 1

    @property
    def has_cls(self) -> bool:
        """Whether token 0 is a class token (otherwise the pooled output is the feature)."""
        return True

    @property
    def trained_registers(self) -> int:
        """T: the model's own register tokens (part of the prefix)."""
        return self.num_prefix_tokens - int(self.has_cls)

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
    def patch_size(self) -> int:
        return self.input_size // self.grid_size[0]

    @property
    def num_heads(self) -> int:
        return int(self.blocks[0].attn.num_heads)

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm after the last block (its output tokens are the final-norm tokens)."""

    def mlp_out(self, layer: int) -> nn.Linear:
        """The MLP output projection of block ``layer``: its input are the neuron activations
        ``[B, N, D_mlp]``."""
        return self.blocks[layer].get_submodule(self.block_parts.mlp_out)

    def attn_out(self, layer: int) -> nn.Linear:
        """The attention output projection of block ``layer``."""
        return self.blocks[layer].get_submodule(self.block_parts.attn_out)

    @property
    def mlp_width(self) -> int:
        """D_mlp: the neurons of one block's MLP (the width fed to its output projection)."""
        return int(self.mlp_out(0).in_features)

    @property
    @abstractmethod
    def activation(self) -> str:
        """Name of the MLP activation actually used (recorded in config.json and cache keys)."""

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens ``[B, ..., d]`` -> the space of the pooled feature ``[B, ..., d_out]``
        (CLIP's projection; the identity elsewhere).  The pooled feature is ``project`` of the
        final-norm CLS token (of the patch mean for a model pooled by averaging)."""
        return tokens

    def identity_of(self, family: str, architecture: str, weights: str) -> ModelIdentity:
        """This built model's identity."""
        return ModelIdentity(family, architecture, len(self.blocks), self.mlp_width, weights, width=self.width,
                             patch_size=self.patch_size, image_size=self.input_size,
                             trained_registers=self.trained_registers, has_cls=self.has_cls)

    # ---------------------------------------------------------------- hook attachment
    @abstractmethod
    def attach_registers(self, num_registers: int,
                         on_tokens: Callable[[torch.Tensor], torch.Tensor | None]) -> list[Handle]:
        """Append ``num_registers`` zero tokens right after the position embedding; ``on_tokens``
        sees (and may replace) the tokens ``[B, N + R, d]`` there."""

    def attach_pooling_guard(self, num_registers: int) -> list[Handle]:
        """Keep the ``num_registers`` test-time registers out of the pooled feature where the model
        pools by averaging tokens (a class-token model pools token 0 and needs nothing).  Attached
        after every other hook, so the final-norm tokens are seen with their registers."""
        return []

    @abstractmethod
    def attach_qk(self, layer: int, store: QKStore) -> Handle:
        """Call ``store(q, k)`` with block ``layer``'s queries and keys ``[B, H, N, dh]`` as its
        attention uses them, computed on the side (the block's output is unchanged)."""
