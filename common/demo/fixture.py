"""The planted-register fixture (docs/demo.md): small ViTs with register neurons put in by hand.

A randomly initialised (seeded) small ViT of any model's structure (its family, token layout, MLP
type, trained registers: the family's ``create`` with small dimensions) gets a circuit that makes a few MLP
neurons in a middle layer fire strongly on *uniform* background patches and write one large
vector into the residual stream, so high-norm outlier tokens appear as in pretrained ViTs - and,
as there, the outlier tokens are *attention sinks*: in the later layers the CLS query attends to
them.  The ground truth (which neurons) is known, so detection, the intervention and the
attention maps can be checked.

The circuit, in reserved residual dimensions (nothing else writes into them):

* ``FILTER_DIMS``: the patch embedding computes a few zero-sum (high-pass) filters of each patch.
  They are exactly 0 on a uniform patch and large on textured ones.
* ``GATE_DIM``: the position embedding marks the border patches, where registers may form (real
  ViTs use only a handful of background tokens, and the sparsity filter of docs/detection.md expects
  register neurons to be silent on most positions).
* ``ENERGY_DIM``: in block ``planted_layer - 1``, pairs of neurons compute ``|filter|``
  (``GELU(x) + GELU(-x)``) and write their sum here: the patch's "texture energy".  The CLS token
  starts with a large energy so that it never fires.
* In block ``planted_layer`` the planted neurons read ``gate - energy`` and, when they fire, write
  a large vector along one random direction: the outlier token.
* ``CLS_DIM``: only the CLS token carries it.  In every later block one query coordinate per head
  reads it and the matching key coordinate reads the outlier direction, so CLS attends to
  whatever token carries the outlier write: the outlier patches without test-time registers,
  the register under ttr (where the intervention moves the write).
* ``OBJECT_DIM``: block ``planted_layer - 1``'s energy neurons also write a quarter of the energy
  here, and the sink's key coordinate reads it too.  Textured (object) patches therefore draw the
  CLS attention that the sinks leave: without ttr the sinks, on the uniform background, pull it
  off the object; under ttr the register takes the sinks' share and, over the image patches, the
  attention sits on the object (the localization of docs/localization.md).

Where each piece is written in a given library's ViT: :mod:`common.demo.planting`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.demo.planting import Parts, parts_of, set_neuron_input
from common.models.backbone import Backbone, backbone_from_module
from common.models.families import FamilyAdapter, get_family
from common.models.family import SmallDims, TextEncoder, seeded_init
from common.models.presets import resolve_model

FILTER_DIMS = (0, 1, 2, 3)
ENERGY_DIM = 4
GATE_DIM = 5
CLS_DIM = 6
OBJECT_DIM = 7
RESERVED_DIMS = FILTER_DIMS + (ENERGY_DIM, GATE_DIM, CLS_DIM, OBJECT_DIM)

IMAGE_SIZE = 64
PATCH_SIZE = 8
WIDTH = 64
DEPTH = 6
HEADS = 4
MLP_RATIO = 4.0
PLANTED_LAYER = 2
NUM_PLANTED = 3

# Circuit gains shared by every model (those of a kind of model are its planting parts'
# ``gains``; tests/demo/test_fixture.py prints the margins they give).
CLS_ENERGY = 30.0
PLANTED_GATE_GAIN = 12.0
PLANTED_ENERGY_GAIN = 12.0
PLANTED_BIAS = -4.0
WRITE_NORM = 1.2
# Attention sink: the CLS mark, the query gain on it and the key gain on the outlier direction
# (after each block's pre-attention norm, an outlier token lies almost along the direction).
CLS_MARK = 8.0
SINK_QUERY_GAIN = 1.0
SINK_KEY_GAIN = 2.5
# The object's pull: the share of the texture energy written to OBJECT_DIM and the key gain on it
# (weaker than the sink's: the sinks win whenever they are there).
OBJECT_KEY_GAIN = 4.0
OBJECT_WRITE = 0.25
# Trained registers of the fixture (``trained_registers=4``) are high-norm by design, as in
# DINOv2-reg and DINOv3: detection must not take them for outliers.
TRAINED_REGISTER_NORM = 200.0


# The fixture's text tower: small, but with CLIP's own tokenizer and vocabulary.
SMALL_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}


@dataclass
class PlantedModel:
    """A planted backbone, the config dict to run it with, and the ground truth."""

    backbone: Backbone
    config: dict
    planted: list[tuple[int, int]]       # (layer, neuron) pairs
    family: str
    model: str                           # the --model name whose structure it has


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


@torch.no_grad()
def _plant(adapter: FamilyAdapter, seed: int) -> list[tuple[int, int]]:
    generator = torch.Generator().manual_seed(seed + 1)
    reserved = list(RESERVED_DIMS)
    parts = parts_of(adapter)
    gains = parts.gains
    depth = len(adapter.blocks)
    grid = IMAGE_SIZE // PATCH_SIZE

    # Nothing but the circuit writes into the reserved dimensions.
    for layer in range(depth):
        for linear in (adapter.attn_out(layer), adapter.mlp_out(layer)):
            linear.weight[reserved] = 0.0
            if linear.bias is not None:
                linear.bias[reserved] = 0.0

    # Patch embedding: high-pass filters (same on every colour channel) into FILTER_DIMS.
    weight, bias = parts.patch_embedding()
    weight[reserved] = 0.0
    filters = _high_pass_filters(PATCH_SIZE) * gains.filter
    for i, dim in enumerate(FILTER_DIMS):
        weight[dim] = filters[i][None].expand(3, -1, -1) / 3 ** 0.5
    if bias is not None:
        bias[reserved] = 0.0

    table, first_patch = parts.position_embedding()
    table[:, reserved] = 0.0
    table[first_patch:, GATE_DIM] = _border_mask(grid).float() * gains.gate
    cls = parts.cls_embedding()
    cls[reserved] = 0.0
    cls[ENERGY_DIM] = CLS_ENERGY
    cls[CLS_DIM] = CLS_MARK
    trained = parts.trained_register_embedding()
    if trained is not None:
        trained[:, reserved] = 0.0
        trained[:, ENERGY_DIM] = CLS_ENERGY                  # never fires, like CLS
        trained.mul_(TRAINED_REGISTER_NORM / trained.norm(dim=1, keepdim=True))

    # Block planted_layer - 1: |filter| detectors writing the texture energy.
    width, hidden = adapter.width, adapter.mlp_width
    mlp, fc_out = parts.mlp(PLANTED_LAYER - 1), adapter.mlp_out(PLANTED_LAYER - 1)
    energy_neurons = list(range(hidden - 2 * len(FILTER_DIMS), hidden))
    for k, neuron in enumerate(energy_neurons):
        dim, sign = FILTER_DIMS[k // 2], (1.0 if k % 2 == 0 else -1.0)
        row = torch.zeros(width)
        row[dim] = sign * gains.energy
        set_neuron_input(mlp, neuron, row, 0.0)
        fc_out.weight[:, neuron] = 0.0
        fc_out.weight[ENERGY_DIM, neuron] = gains.energy_write
        fc_out.weight[OBJECT_DIM, neuron] = gains.energy_write * OBJECT_WRITE

    # Block planted_layer: the register neurons, reading gate - energy, writing one big vector.
    mlp, fc_out = parts.mlp(PLANTED_LAYER), adapter.mlp_out(PLANTED_LAYER)
    planted = sorted(torch.randperm(hidden, generator=generator)[:NUM_PLANTED].tolist())
    direction = torch.randn(fc_out.out_features, generator=generator)
    direction[reserved] = 0.0
    direction = direction / direction.norm() * WRITE_NORM
    for neuron in planted:
        row = torch.zeros(width)
        row[GATE_DIM], row[ENERGY_DIM] = PLANTED_GATE_GAIN, -PLANTED_ENERGY_GAIN
        set_neuron_input(mlp, neuron, row, PLANTED_BIAS)
        fc_out.weight[:, neuron] = direction

    # Later blocks: the outlier tokens become attention sinks for the CLS query.
    _plant_sinks(adapter, parts, direction / direction.norm())
    return [(PLANTED_LAYER, int(n)) for n in planted]


def _plant_sinks(adapter: FamilyAdapter, parts: Parts, direction: torch.Tensor) -> None:
    """In each block after the planted one, per head: query coordinate c reads ``CLS_DIM`` and key
    coordinate c reads ``direction`` (its rotary partner, if any, is silenced)."""
    width, heads = adapter.width, adapter.num_heads
    head_dim = width // heads
    coordinate, partner = parts.stable_qk_coordinate()
    for layer in range(PLANTED_LAYER + 1, len(adapter.blocks)):
        weight, bias = parts.qkv_projection(layer)                  # [3d, d], [3d]
        for head in range(heads):
            query_row = head * head_dim + coordinate
            key_row = width + head * head_dim + coordinate
            weight[query_row] = 0.0
            weight[query_row, CLS_DIM] = SINK_QUERY_GAIN
            weight[key_row] = direction * SINK_KEY_GAIN
            weight[key_row, OBJECT_DIM] = OBJECT_KEY_GAIN
            rows = [query_row, key_row]
            if partner is not None:
                weight[width + head * head_dim + partner] = 0.0
                rows.append(width + head * head_dim + partner)
            if bias is not None:
                bias[rows] = 0.0


def fixture_config(model: str, num_planted: int = NUM_PLANTED) -> dict:
    """The config a planted model of ``--model model``'s structure runs with (its config dict, with
    the fixture's threshold and selection)."""
    base = resolve_model(model).config
    base.update({
        "device": "cpu",
        "register_norm_threshold": 60,
        "highest_layer": PLANTED_LAYER,
        "top_k": num_planted,
    })
    return base


def small_text_encoder(embed_dim: int, seed: int) -> TextEncoder:
    """A small randomly initialised CLIP text tower (CLIP's tokenizer) in a ``embed_dim`` space."""
    import open_clip
    from open_clip.transformer import TextTransformer

    tower = seeded_init(seed, lambda: TextTransformer(output_dim=embed_dim, **SMALL_TEXT)).eval()
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    return TextEncoder(encode=tower, tokenizer=open_clip.get_tokenizer("ViT-B-16"), logit_scale=100.0, module=tower)


def make_planted_model(model: str, seed: int = 0, device: str | torch.device = "cpu", *,
                       trained_registers: int | None = None, precision: str = "fp32") -> PlantedModel:
    """A small ViT of ``--model model``'s structure with register neurons planted.  Deterministic
    for ``seed``.

    ``trained_registers`` gives the model that many high-norm trained registers (detection must
    ignore them) instead of the configured count.
    """
    choice = resolve_model(model)
    adapter_class = get_family(choice.family)
    dims = SmallDims(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, width=WIDTH, depth=DEPTH, heads=HEADS,
                     mlp_ratio=MLP_RATIO, trained_registers=trained_registers)
    module = adapter_class.create(choice.config, seed, dims)
    adapter = adapter_class.wrap(module)
    planted = _plant(adapter, seed)
    # a text tower for zero-shot demos (families with one), in the pooled feature's space
    text = (small_text_encoder(int(adapter.project(torch.zeros(1, WIDTH)).shape[-1]), seed)
            if adapter_class.supports_zero_shot else None)
    registers = "" if trained_registers is None else f", {trained_registers} trained registers"
    backbone = backbone_from_module(
        model, module, preprocess=adapter_class.preprocess(choice.config, image_size=IMAGE_SIZE),
        description=f"planted {model} fixture (seed {seed}{registers})",
        weights_id=f"planted-{model}-seed-{seed}{registers.replace(', ', '-').replace(' ', '-')}",
        device=device, precision=precision, text=text)
    return PlantedModel(backbone=backbone, config=fixture_config(model), planted=planted, family=choice.family,
                        model=model)


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
