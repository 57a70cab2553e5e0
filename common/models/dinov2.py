"""DINOv2: timm's ``vit_*_patch14_dinov2`` (and ``*_reg4_dinov2``, T = 4 trained registers).

Built at 224 px (16x16 patches) with DINOv2's classification-eval preprocess (resize 256 bicubic,
centre crop 224, ImageNet mean/std - never timm's resolved data config, which says 518 px).  The
feature is the final-norm CLS token.  The position embedding is resampled from the checkpoint's
37x37 grid the way Meta's code does it at 224 px (bicubic, scale factor (16 + 0.1) / 37, no
antialias for the plain models; target size with antialias for the register models): timm's own
load-time resampling differs, and the thresholds and published neurons were found on Meta's path.

Everything about the built model (its parts, where registers are appended, q/k) is the generic
timm adapter's (:mod:`common.models.timm_vit`); this family adds the sizes, Meta's checkpoints and
the 224 px position grid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.models.family import SmallDims, eval_preprocess
from common.models.timm_vit import TimmViTAdapter
from common.models.weights import WeightsHint

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


class Dinov2Adapter(TimmViTAdapter):
    name = "dinov2"
    title = "DINOv2"
    sizes = ARCHS
    pretrained_tag = PRETRAINED_TAG    # timm's tag of the released weights
    building_keys = ("backbone_size",)
    generic_defaults = {}

    # ---------------------------------------------------------------- a configured model
    @classmethod
    def architecture(cls, config: dict) -> str:
        size = config["backbone_size"]
        if size not in cls.sizes:
            raise UserError(f"backbone_size {size!r} is unknown; valid: {', '.join(cls.sizes)}")
        return cls.sizes[size]

    @classmethod
    def _create(cls, config: dict, **overrides) -> nn.Module:
        import timm

        return timm.create_model(cls.architecture(config), pretrained=False, num_classes=0,
                                 **{"img_size": IMAGE_SIZE, **overrides})

    @classmethod
    def _small_overrides(cls, config: dict, dims: SmallDims) -> dict[str, Any]:
        # DINOv2-style: live layer scale; with trained registers (like *_reg4_dinov2) no prefix
        # position at all.
        overrides: dict[str, Any] = dict(img_size=dims.image_size, patch_size=dims.patch_size, embed_dim=dims.width,
                                         depth=dims.depth, num_heads=dims.heads, mlp_ratio=dims.mlp_ratio,
                                         init_values=1.0)
        if dims.trained_registers is not None:
            overrides.update(reg_tokens=dims.trained_registers, no_embed_class=dims.trained_registers > 0)
        return overrides

    @classmethod
    def preprocess(cls, config: dict, image_size: int | None = None) -> Callable:
        return eval_preprocess(RESIZE, IMAGE_SIZE) if image_size is None else eval_preprocess(image_size, image_size)

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
    def convert(cls, state: dict, model: nn.Module, config: dict) -> dict:
        return convert_state_dict(state, cls.architecture(config))

    @classmethod
    def generic_config(cls, spec: str) -> dict:
        raise UserError(f"{cls.name} takes backbone_size, not a name; use --model {cls.name} "
                        "--set backbone_size=..., or --model timm:<name>")
