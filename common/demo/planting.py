"""Where the planted circuit of :mod:`common.demo.fixture` writes, in each library's ViT.

The family adapters know how to run a model; planting by hand needs more: the patch and position
embeddings, the class and register tokens, the q/k/v projection and the MLP input rows.  Those
depend on the library's module classes, not on the model, so they live here, one small class per
kind of transformer (open_clip's ``VisionTransformer``, timm's ``VisionTransformer`` - also the
trunk of open_clip's ``TimmModel`` - and timm's ``Eva``), chosen by :func:`parts_of`.

MLPs: a neuron's input is one row of the MLP's input projection (``c_fc``, ``fc1``); in a gated MLP
(timm's ``GluMlp`` / ``SwiGLUPacked``, ``SwiGLU``) a neuron is ``act(gate) * value``, so the gate row
gets the circuit's weights and the value row a constant 1 (then the neuron is ``act(gate)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.models.family import FamilyAdapter


@dataclass(frozen=True)
class PlantingGains:
    """How strongly the circuit is wired into a kind of model (models without a norm before the
    blocks need small raw filter responses, amplified later)."""

    filter: float          # patch-embedding high-pass filters
    energy: float          # |filter| detector neurons' input gain
    energy_write: float    # what they write into the energy dimension
    gate: float            # border-patch mark in the position embedding


# open_clip's ViT normalises the tokens before the first block (ln_pre).
PRE_NORM_GAINS = PlantingGains(filter=12.0, energy=3.0, energy_write=1.0, gate=6.0)
# No norm before the blocks: raw filter responses stay small (they would make textured patches
# high-norm on their own) and are amplified downstream.
NO_PRE_NORM_GAINS = PlantingGains(filter=1.5, energy=24.0, energy_write=0.1, gate=20.0)


@torch.no_grad()
def set_neuron_input(mlp: nn.Module, neuron: int, weight: torch.Tensor, bias: float) -> None:
    """Make ``neuron``'s pre-activation ``weight . x + bias`` (for a gated MLP: its gate's)."""
    if hasattr(mlp, "c_fc"):                                   # open_clip: c_fc -> gelu -> c_proj
        rows = [(mlp.c_fc, neuron, weight, bias)]
    elif hasattr(mlp, "fc1_g"):                                # timm SwiGLU: act(fc1_g) * fc1_x
        rows = [(mlp.fc1_g, neuron, weight, bias), (mlp.fc1_x, neuron, torch.zeros_like(weight), 1.0)]
    elif type(mlp).__name__ == "GluMlp":                       # timm GluMlp: fc1 -> [x1 | x2]
        half = mlp.fc1.out_features // 2
        gate, value = (neuron + half, neuron) if mlp.gate_last else (neuron, neuron + half)
        rows = [(mlp.fc1, gate, weight, bias), (mlp.fc1, value, torch.zeros_like(weight), 1.0)]
    else:                                                      # timm Mlp: fc1 -> act -> fc2
        rows = [(mlp.fc1, neuron, weight, bias)]
    for linear, row, row_weight, row_bias in rows:
        linear.weight[row] = row_weight
        if linear.bias is None:
            raise ValueError("the planted fixture needs MLP input projections with a bias")
        linear.bias[row] = row_bias


class Parts:
    """A model's parts the circuit writes into (views: writing them changes the model)."""

    gains: PlantingGains = NO_PRE_NORM_GAINS

    def __init__(self, adapter: FamilyAdapter):
        self.adapter = adapter
        self.tower = adapter.tower

    def patch_embedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight ``[d, 3, p, p]``, bias ``[d]`` or None) of the patch embedding."""
        raise NotImplementedError

    def position_embedding(self) -> tuple[torch.Tensor, int]:
        """(the learned absolute position table ``[M, d]``, the row of the first patch): rows before it
        belong to prefix tokens."""
        raise NotImplementedError

    def cls_embedding(self) -> torch.Tensor:
        """The CLS token's input embedding ``[d]``."""
        raise NotImplementedError

    def trained_register_embedding(self) -> torch.Tensor | None:
        """The trained registers' input embeddings ``[T, d]``, None without any."""
        return None

    def qkv_projection(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight ``[3d, d]``, bias ``[3d]`` or None) computing q, k, v of block ``layer`` (rows: q of
        every head, then k, then v; head h's coordinates are ``h*dh .. (h+1)*dh``)."""
        raise NotImplementedError

    def stable_qk_coordinate(self) -> tuple[int, int | None]:
        """(a coordinate within a head whose q.k term positions do not rotate, its rotary partner or
        None): what the attention-sink circuit writes into."""
        return 0, None

    def mlp(self, layer: int) -> nn.Module:
        return self.adapter.blocks[layer].mlp


class OpenClipParts(Parts):
    gains = PRE_NORM_GAINS

    def patch_embedding(self):
        return self.tower.conv1.weight, None

    def position_embedding(self):
        return self.tower.positional_embedding, 1

    def cls_embedding(self):
        return self.tower.class_embedding

    def qkv_projection(self, layer):
        attention = self.adapter.blocks[layer].attn
        return attention.in_proj_weight, attention.in_proj_bias


class TimmParts(Parts):
    def patch_embedding(self):
        projection = self.tower.patch_embed.proj
        return projection.weight, projection.bias

    def position_embedding(self):
        if self.tower.pos_embed is None:
            raise ValueError("the planted fixture needs a learned absolute position embedding")
        return self.tower.pos_embed[0], 0 if self.tower.no_embed_class else self.adapter.num_prefix_tokens

    def cls_embedding(self):
        if self.tower.cls_token is None:
            raise ValueError("the planted fixture needs a class token")
        return self.tower.cls_token[0, 0]

    def trained_register_embedding(self):
        return None if self.tower.reg_token is None else self.tower.reg_token[0]

    def qkv_projection(self, layer):
        qkv = self.adapter.blocks[layer].attn.qkv
        return qkv.weight, qkv.bias


class EvaParts(TimmParts):
    def position_embedding(self):
        if self.tower.pos_embed is None:
            raise ValueError("this Eva model has no absolute position embedding to plant into")
        return self.tower.pos_embed[0], 0 if self.tower.no_embed_class else self.adapter.num_prefix_tokens

    def qkv_projection(self, layer):
        attention = self.adapter.blocks[layer].attn
        if attention.qkv is None or attention.q_bias is not None:
            raise ValueError("only a fused qkv projection without bias can be planted into")
        return attention.qkv.weight, None

    def stable_qk_coordinate(self):
        # The coordinate whose rotation stays closest to none over the whole patch grid.
        table = self.tower.rope.get_embed(shape=self.adapter.grid_size)     # [P, 2 * dh]: sin | cos
        head_dim = table.shape[-1] // 2
        cos = table[:, head_dim:]
        coordinate = int(cos.min(dim=0).values.argmax())
        partner = (coordinate + head_dim // 2) % head_dim if self.adapter.blocks[0].attn.rotate_half else coordinate ^ 1
        return coordinate, partner


def parts_of(adapter: FamilyAdapter) -> Parts:
    """The planting parts of ``adapter``'s transformer, by its library class."""
    from open_clip.transformer import VisionTransformer as OpenClipViT
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    tower = adapter.tower
    if isinstance(tower, OpenClipViT):
        return OpenClipParts(adapter)
    if isinstance(tower, Eva):
        return EvaParts(adapter)
    if isinstance(tower, TimmViT):
        return TimmParts(adapter)
    raise ValueError(f"the planted fixture cannot plant into a {type(tower).__name__}")
