"""The planted-register fixture (SPEC §8): small ViTs with register neurons put in by hand.

A randomly initialised (seeded) small ViT of either family gets a circuit that makes a few
MLP neurons in a middle layer fire strongly on *uniform* background patches and write one large
vector into the residual stream, so high-norm outlier tokens appear as in pretrained ViTs.
The ground truth (which neurons) is known, so detection and the intervention can be checked.

The circuit, in reserved residual dimensions (nothing else writes into them):

* ``FILTER_DIMS``: the patch embedding computes a few zero-sum (high-pass) filters of each patch.
  They are exactly 0 on a uniform patch and large on textured ones.
* ``GATE_DIM``: the position embedding marks the border patches, where registers may form (real
  ViTs use only a handful of background tokens, and the sparsity filter of SPEC §5 expects
  register neurons to be silent on most positions).
* ``ENERGY_DIM``: in block ``planted_layer - 1``, pairs of neurons compute ``|filter|``
  (``GELU(x) + GELU(-x)``) and write their sum here: the patch's "texture energy".  The CLS token
  starts with a large energy so that it never fires.
* In block ``planted_layer`` the planted neurons read ``gate - energy`` and, when they fire, write
  a large vector along one random direction: the outlier token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.backbones import Backbone, backbone_from_module

FILTER_DIMS = (0, 1, 2, 3)
ENERGY_DIM = 4
GATE_DIM = 5
RESERVED_DIMS = FILTER_DIMS + (ENERGY_DIM, GATE_DIM)

IMAGE_SIZE = 64
PATCH_SIZE = 8
WIDTH = 64
DEPTH = 6
HEADS = 4
MLP_RATIO = 4.0
PLANTED_LAYER = 2
NUM_PLANTED = 3

# Circuit gains (tuned so the planted neurons fire at ~40 on uniform border patches and stay
# silent elsewhere; see tests/test_fixture.py for the margins they give).
# timm's DINOv2-style ViT has no norm before the blocks, so its raw filter responses are kept
# small (they would make textured patches high-norm on their own) and amplified downstream.
FILTER_GAIN = {"clip": 12.0, "dinov2": 1.5}
ENERGY_GAIN = {"clip": 3.0, "dinov2": 24.0}
ENERGY_WRITE = {"clip": 1.0, "dinov2": 0.1}
GATE_VALUE = {"clip": 6.0, "dinov2": 20.0}
CLS_ENERGY = 30.0
PLANTED_GATE_GAIN = 12.0
PLANTED_ENERGY_GAIN = 12.0
PLANTED_BIAS = -4.0
WRITE_NORM = 1.2


@dataclass
class PlantedModel:
    """A planted backbone, the config dict to run it with, and the ground truth."""

    backbone: Backbone
    config: dict
    planted: list[tuple[int, int]]       # (layer, neuron) pairs
    family: str


def _high_pass_filters(patch_size: int) -> torch.Tensor:
    """``[4, patch_size, patch_size]`` zero-sum filters with unit L2 norm."""
    rows = torch.arange(patch_size)[:, None].expand(patch_size, patch_size)
    cols = torch.arange(patch_size)[None, :].expand(patch_size, patch_size)
    half = patch_size // 2
    filters = torch.stack([
        (cols < half).float() * 2 - 1,                        # left vs right
        (rows < half).float() * 2 - 1,                        # top vs bottom
        ((rows + cols) % 2).float() * 2 - 1,                  # checkerboard
        (((rows // 2) + (cols // 2)) % 2).float() * 2 - 1,    # 2x2 checkerboard
    ])
    filters = filters - filters.mean(dim=(1, 2), keepdim=True)
    return filters / filters.flatten(1).norm(dim=1)[:, None, None]


def _border_mask(grid: int) -> torch.Tensor:
    """``[grid*grid]`` bool: every other patch along the image border (sparse by design)."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[0, ::2] = mask[-1, ::2] = mask[::2, 0] = mask[::2, -1] = True
    return mask.flatten()


class _Parts:
    """Family-specific handles on the weights the circuit edits."""

    def __init__(self, family: str, model: nn.Module):
        self.family, self.model = family, model

    def patch_weight(self) -> torch.Tensor:            # [d, 3, p, p]
        return self.model.conv1.weight if self.family == "clip" else self.model.patch_embed.proj.weight

    def patch_bias(self) -> torch.Tensor | None:
        return None if self.family == "clip" else self.model.patch_embed.proj.bias

    def pos_embed(self) -> torch.Tensor:               # [1 + P, d]
        return self.model.positional_embedding if self.family == "clip" else self.model.pos_embed[0]

    def cls_token(self) -> torch.Tensor:               # [d]
        return self.model.class_embedding if self.family == "clip" else self.model.cls_token[0, 0]

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks) if self.family == "clip" else list(self.model.blocks)

    def mlp_in(self, block) -> nn.Linear:
        return block.mlp.c_fc if self.family == "clip" else block.mlp.fc1

    def mlp_out(self, block) -> nn.Linear:
        return block.mlp.c_proj if self.family == "clip" else block.mlp.fc2

    def attn_out(self, block) -> nn.Linear:
        return block.attn.out_proj if self.family == "clip" else block.attn.proj


def _build_small(family: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if family == "clip":
        from open_clip.transformer import VisionTransformer

        return VisionTransformer(
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, width=WIDTH, layers=DEPTH, heads=HEADS,
            mlp_ratio=MLP_RATIO, output_dim=32,
        )
    from timm.models.vision_transformer import VisionTransformer

    # DINOv2-style: layer scale, CLS token in the position embedding, final-norm CLS output.
    return VisionTransformer(
        img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
        mlp_ratio=MLP_RATIO, init_values=1.0, num_classes=0, qkv_bias=True,
    )


@torch.no_grad()
def _plant(parts: _Parts, seed: int) -> list[tuple[int, int]]:
    generator = torch.Generator().manual_seed(seed + 1)
    reserved = list(RESERVED_DIMS)
    blocks = parts.blocks()
    grid = IMAGE_SIZE // PATCH_SIZE

    # Nothing but the circuit writes into the reserved dimensions.
    for block in blocks:
        for linear in (parts.attn_out(block), parts.mlp_out(block)):
            linear.weight[reserved] = 0.0
            if linear.bias is not None:
                linear.bias[reserved] = 0.0

    # Patch embedding: high-pass filters (same on every colour channel) into FILTER_DIMS.
    weight = parts.patch_weight()
    weight[reserved] = 0.0
    filters = _high_pass_filters(PATCH_SIZE) * FILTER_GAIN[parts.family]
    for i, dim in enumerate(FILTER_DIMS):
        weight[dim] = filters[i][None].expand(3, -1, -1) / 3 ** 0.5
    if parts.patch_bias() is not None:
        parts.patch_bias()[reserved] = 0.0

    pos = parts.pos_embed()
    pos[:, reserved] = 0.0
    pos[1:, GATE_DIM] = _border_mask(grid).float() * GATE_VALUE[parts.family]
    cls = parts.cls_token()
    cls[reserved] = 0.0
    cls[ENERGY_DIM] = CLS_ENERGY

    # Block planted_layer - 1: |filter| detectors writing the texture energy.
    energy_block = blocks[PLANTED_LAYER - 1]
    fc_in, fc_out = parts.mlp_in(energy_block), parts.mlp_out(energy_block)
    hidden = fc_in.out_features
    energy_neurons = list(range(hidden - 2 * len(FILTER_DIMS), hidden))
    for k, neuron in enumerate(energy_neurons):
        dim, sign = FILTER_DIMS[k // 2], (1.0 if k % 2 == 0 else -1.0)
        fc_in.weight[neuron] = 0.0
        fc_in.weight[neuron, dim] = sign * ENERGY_GAIN[parts.family]
        fc_in.bias[neuron] = 0.0
        fc_out.weight[:, neuron] = 0.0
        fc_out.weight[ENERGY_DIM, neuron] = ENERGY_WRITE[parts.family]

    # Block planted_layer: the register neurons, reading gate - energy, writing one big vector.
    block = blocks[PLANTED_LAYER]
    fc_in, fc_out = parts.mlp_in(block), parts.mlp_out(block)
    hidden = fc_in.out_features
    planted = sorted(torch.randperm(hidden, generator=generator)[:NUM_PLANTED].tolist())
    direction = torch.randn(fc_out.out_features, generator=generator)
    direction[reserved] = 0.0
    direction = direction / direction.norm() * WRITE_NORM
    for neuron in planted:
        fc_in.weight[neuron] = 0.0
        fc_in.weight[neuron, GATE_DIM] = PLANTED_GATE_GAIN
        fc_in.weight[neuron, ENERGY_DIM] = -PLANTED_ENERGY_GAIN
        fc_in.bias[neuron] = PLANTED_BIAS
        fc_out.weight[:, neuron] = direction
    return [(PLANTED_LAYER, int(n)) for n in planted]


def fixture_config(family: str, num_planted: int = NUM_PLANTED) -> dict:
    """The model config the fixture runs with (same keys as ``configs.CLIP`` / ``configs.DINOV2``)."""
    import configs

    base = dict(configs.MODEL_CONFIGS[family])
    base.update({
        "device": "cpu",
        "detect_outliers_layer": -1 if family == "clip" else -2,
        "register_norm_threshold": 60,
        "highest_layer": PLANTED_LAYER,
        "top_k": num_planted,
    })
    return base


def make_planted_model(family: str, seed: int = 0, device: str | torch.device = "cpu") -> PlantedModel:
    """A small ViT of ``family`` (``clip``: open_clip VisionTransformer; ``dinov2``: timm
    DINOv2-style ViT) with register neurons planted.  Deterministic for ``seed``."""
    model = _build_small(family, seed)
    planted = _plant(_Parts(family, model), seed)
    backbone = backbone_from_module(
        family, model, description=f"planted {family} fixture (seed {seed})",
        weights_id=f"planted-{family}-seed-{seed}", device=device)
    return PlantedModel(backbone=backbone, config=fixture_config(family), planted=planted, family=family)


def fixture_images(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """``[count, size, size, 3]`` uint8 images: a uniform background and a textured object in the middle."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        background = int(rng.integers(20, 80))
        image = np.full((size, size, 3), background, dtype=np.uint8)
        half = int(rng.integers(size // 6, size // 4))
        centre = size // 2 + rng.integers(-2, 3, size=2)
        top, left = centre - half
        texture = rng.integers(100, 255, size=(2 * half, 2 * half, 1))
        image[top:top + 2 * half, left:left + 2 * half] = texture
        images[i] = image
    return images
