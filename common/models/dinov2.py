"""DINOv2: timm's ``vit_*_patch14_dinov2`` (and ``*_reg4_dinov2``, T = 4 trained registers).

Built at 224 px (16x16 patches) with DINOv2's classification-eval preprocess (resize 256 bicubic,
centre crop 224, ImageNet mean/std - never timm's resolved data config, which says 518 px).  The
feature is the final-norm CLS token.  The position embedding is resampled from the checkpoint's
37x37 grid the way Meta's code does it at 224 px (bicubic, scale factor (16 + 0.1) / 37, no
antialias for the plain models; target size with antialias for the register models): timm's own
load-time resampling differs, and the thresholds and published neurons were found on Meta's path.

Hook attachment:

* registers: a forward hook on ``patch_drop`` (right after ``_pos_embed``);
* q/k: a forward hook on ``attn.qkv``: q and k are taken from its output through
  ``q_norm``/``k_norm`` (no recomputation).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.models.family import (
    BlockParts, Built, FamilyAdapter, ModelIdentity, PlantingGains, QKStore,
    eval_preprocess, seeded_init, with_registers
)
from common.models.weights import WeightsHint, file_identity, load_state_dict

IMAGE_SIZE = 224
RESIZE = 256
PATCH = 14
CHECKPOINT_GRID = 37  # 518 px / 14
# Meta's historical interpolation kludge for the models without registers.
INTERPOLATE_OFFSET = 0.1
PRETRAINED_TAG = "lvd142m"

ARCHS = {
    "vits14": "vit_small_patch14_dinov2",
    "vitb14": "vit_base_patch14_dinov2",
    "vitl14": "vit_large_patch14_dinov2",
    "vitg14": "vit_giant_patch14_dinov2",
    "vits14_reg": "vit_small_patch14_reg4_dinov2",
    "vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "vitl14_reg": "vit_large_patch14_reg4_dinov2",
    "vitg14_reg": "vit_giant_patch14_reg4_dinov2",
}


def meta_interpolate_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix_tokens: int,
                               with_registers: bool) -> torch.Tensor:
    """Resample a square position embedding as Meta's DINOv2 code does for a ``grid x grid`` input.

    ``pos_embed``: ``[1, prefix + M*M, d]`` -> ``[1, prefix + grid*grid, d]``.
    """
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = int(round(math.sqrt(patch.shape[1])))
    if side * side != patch.shape[1]:
        raise UserError(f"position embedding with {patch.shape[1]} patch entries is not a square grid")
    if side == grid:
        return pos_embed
    dim = patch.shape[-1]
    patch = patch.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if with_registers:
        kwargs: dict[str, Any] = {"size": (grid, grid), "antialias": True}
    else:
        factor = (grid + INTERPOLATE_OFFSET) / side
        kwargs = {"scale_factor": (factor, factor), "antialias": False}
    patch = F.interpolate(patch, mode="bicubic", **kwargs)
    if patch.shape[-2:] != (grid, grid):
        raise RuntimeError(f"interpolated position grid is {tuple(patch.shape[-2:])}, expected {grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


def convert_state_dict(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A timm or Meta-original DINOv2 checkpoint with the keys of timm's 224 px model.

    timm's converter handles Meta's key layout; it runs against a 518 px template (built on the
    meta device, so it costs nothing) so that it leaves the 37x37 position grid alone, and the
    grid is then resampled by Meta's rule.
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    with torch.device("meta"):
        template = timm.create_model(arch, pretrained=False, num_classes=0, img_size=CHECKPOINT_GRID * PATCH)
    state = checkpoint_filter_fn(dict(state), template)
    prefix = 0 if template.no_embed_class else template.num_prefix_tokens
    grid = IMAGE_SIZE // PATCH
    side = int(round(math.sqrt(state["pos_embed"].shape[1] - prefix)))
    if side == grid:
        import logging

        logging.getLogger(__name__).warning(
            "the checkpoint's position embedding is already %dx%d; used as is, not resampled by Meta's rule",
            grid, grid)
    state["pos_embed"] = meta_interpolate_pos_embed(state["pos_embed"], grid, prefix,
                                                    with_registers=template.reg_token is not None)
    return state


class Dinov2Adapter(FamilyAdapter):
    name = "dinov2"
    title = "DINOv2"
    sizes = ARCHS
    pretrained_tag = PRETRAINED_TAG    # timm's tag of the released weights
    # No norm before the blocks: raw filter responses stay small (they would make textured
    # patches high-norm on their own) and are amplified downstream.
    planting = PlantingGains(filter=1.5, energy=24.0, energy_write=0.1, gate=20.0)
    # fc2's input is the activation output, or SwiGLU's gated product (vitg14): the neurons.
    block_parts = BlockParts(mlp_in="mlp.fc1", mlp_out="mlp.fc2", attn_out="attn.proj")

    # ---------------------------------------------------------------- a configured model
    @classmethod
    def architecture(cls, config: dict) -> str:
        size = config["backbone_size"]
        if size not in cls.sizes:
            raise UserError(f"backbone_size {size!r} is unknown; valid: {', '.join(cls.sizes)}")
        return cls.sizes[size]

    @classmethod
    def _create(cls, arch: str, **kwargs) -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=0, img_size=IMAGE_SIZE, **kwargs)

    @classmethod
    def identity(cls, config: dict) -> ModelIdentity:
        arch = cls.architecture(config)
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            model = cls._create(arch)
        adapter = cls(model)
        return ModelIdentity(cls.name, arch, len(adapter.blocks), adapter.mlp_width,
                             cls.weights_name(config))

    @classmethod
    def weights_name(cls, config: dict) -> str:
        return f"{cls.architecture(config)}.{cls.pretrained_tag}"

    @classmethod
    def _meta_file(cls, config: dict) -> tuple[str, str]:
        """(file name, URL) of Meta's original checkpoint."""
        size = config["backbone_size"].removesuffix("_reg")
        name = f"dinov2_{size}{'_reg4' if config['backbone_size'].endswith('_reg') else ''}_pretrain.pth"
        return name, f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{size}/{name}"

    @classmethod
    def weights_hint(cls, config: dict) -> WeightsHint:
        arch = cls.architecture(config)
        _, url = cls._meta_file(config)
        return WeightsHint(what=f"DINOv2 {config['backbone_size']} weights", repo_id=f"timm/{arch}.{PRETRAINED_TAG}",
                           filenames=("model.safetensors", "pytorch_model.bin"), shown_file="model.safetensors",
                           alternative=f"Meta's {url}")

    @classmethod
    def cached_weights(cls, config: dict) -> str | None:
        # Meta's file in torch hub's cache counts as "the library's own cache".
        name, _ = cls._meta_file(config)
        path = Path(torch.hub.get_dir()) / "checkpoints" / name
        return str(path) if path.is_file() else None

    @classmethod
    def _convert(cls, state: dict, arch: str) -> dict:
        return convert_state_dict(state, arch)

    @classmethod
    def build(cls, config: dict, weights_file: str | None, seed: int) -> Built:
        arch = cls.architecture(config)
        model = seeded_init(seed, lambda: cls._create(arch))
        if weights_file is None:
            weights_id = f"random-init-seed-{seed}"
        else:
            state = load_state_dict(Path(weights_file))
            try:
                model.load_state_dict(cls._convert(state, arch), strict=True)
            except (RuntimeError, KeyError, ValueError) as error:
                hint = cls.weights_hint(config)
                raise UserError(f"--weights {weights_file}: not a {cls.title} {config['backbone_size']} "
                                f"checkpoint ({str(error).splitlines()[0][:160]}); pass {hint.shown_file} of "
                                f"{hint.repo_id}" + (f" or {hint.alternative}" if hint.alternative else "")) from None
            weights_id = f"{arch}|" + file_identity(weights_file)
        description = f"timm {arch} " + ("random init" if weights_file is None else str(weights_file))
        return Built(model=model, preprocess=eval_preprocess(RESIZE, IMAGE_SIZE), weights_id=weights_id,
                     description=description)

    @classmethod
    def build_small(cls, seed: int, *, image_size: int, patch_size: int, width: int, depth: int,
                    heads: int, mlp_ratio: float, trained_registers: int = 0) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        # DINOv2-style: layer scale, final-norm CLS output; the CLS token in the position
        # embedding, or (with trained registers, like *_reg4_dinov2) no prefix position at all.
        return seeded_init(seed, lambda: VisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads,
            mlp_ratio=mlp_ratio, init_values=1.0, num_classes=0, qkv_bias=True,
            reg_tokens=trained_registers, no_embed_class=trained_registers > 0))

    # ---------------------------------------------------------------- a built model's parts
    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def width(self) -> int:
        return int(self.model.embed_dim)

    @property
    def input_size(self) -> int:
        return int(self.model.patch_embed.img_size[0])

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    @property
    def activation(self) -> str:
        mlp = self.blocks[0].mlp
        name = type(mlp.act).__name__
        return f"SwiGLU({name})" if "SwiGLU" in type(mlp).__name__ else name

    # ---------------------------------------------------------------- hook attachment
    def attach_registers(self, num_registers, on_tokens):
        return [self.model.patch_drop.register_forward_hook(
            lambda module, args, output: with_registers(output, num_registers, on_tokens))]

    def attach_qk(self, layer: int, store: QKStore):
        attention = self.blocks[layer].attn  # timm Attention

        def hook(module, args, output):
            batch, tokens, _ = output.shape
            qkv = output.reshape(batch, tokens, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
            store(attention.q_norm(qkv[0]), attention.k_norm(qkv[1]))

        return attention.qkv.register_forward_hook(hook)

    # ---------------------------------------------------------------- fixture planting
    def patch_embedding(self):
        projection = self.model.patch_embed.proj
        return projection.weight, projection.bias

    def position_embedding(self) -> tuple[torch.Tensor, int]:
        table = self.model.pos_embed[0]
        return table, 0 if self.model.no_embed_class else self.num_prefix_tokens

    def cls_embedding(self) -> torch.Tensor:
        return self.model.cls_token[0, 0]

    def trained_register_embedding(self) -> torch.Tensor | None:
        return None if self.model.reg_token is None else self.model.reg_token[0]

    def qkv_projection(self, layer: int):
        qkv = self.blocks[layer].attn.qkv
        return qkv.weight, qkv.bias
