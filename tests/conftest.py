"""Shared, session-scoped backbones (random weights, real architectures) and test images.

The models are built once per session; tests that change a model's state (``fused_attn``)
restore it before they return.
"""

from __future__ import annotations

import pytest
import torch

import configs
from common.models.backbone import load_backbone


@pytest.fixture(scope="session")
def clip_b16():
    """open_clip ViT-B/16 visual tower, random init with seed 0."""
    return load_backbone("clip", configs.CLIP, random_init=True, seed=0)


@pytest.fixture(scope="session")
def dinov2_l14():
    """timm vit_large_patch14_dinov2 at 224 px, random init with seed 0."""
    return load_backbone("dinov2", configs.DINOV2, random_init=True, seed=0)


def _live_layer_scale(backbone, value: float = 0.5):
    """timm initialises DINOv2's and DINOv3's LayerScale to 1e-5, so with random weights the
    blocks barely move the tokens and every image gives nearly the same CLS feature.  Raising
    the scales (architecture unchanged) makes the small models' outputs depend on the image and
    on interventions, which the tests need."""
    for block in backbone.blocks:
        if hasattr(block, "ls1"):          # timm VisionTransformer blocks
            block.ls1.gamma.fill_(value)
            block.ls2.gamma.fill_(value)
        else:                              # timm Eva blocks (DINOv3)
            block.gamma_1.fill_(value)
            block.gamma_2.fill_(value)
    return backbone


@pytest.fixture(scope="session")
def dinov2_s14():
    """timm vit_small_patch14_dinov2 at 224 px (no trained registers), random init, live layer scale."""
    return _live_layer_scale(
        load_backbone("dinov2", dict(configs.DINOV2, backbone_size="vits14"), random_init=True, seed=0))


@pytest.fixture(scope="session")
def dinov2_s14_reg():
    """timm vit_small_patch14_reg4_dinov2 at 224 px (T = 4 trained registers), random init,
    live layer scale."""
    return _live_layer_scale(
        load_backbone("dinov2", dict(configs.DINOV2, backbone_size="vits14_reg"), random_init=True, seed=0))


@pytest.fixture(scope="session")
def dinov3_s16():
    """timm vit_small_patch16_dinov3 at 224 px (RoPE, T = 4 trained registers), random init, live
    layer scale."""
    return _live_layer_scale(
        load_backbone("dinov3", dict(configs.DINOV3, backbone_size="vits16"), random_init=True, seed=0))


def make_images(count: int, seed: int = 0, size: int = 224) -> torch.Tensor:
    """``count`` different random images ``[count, 3, size, size]`` from a fixed generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator)


@pytest.fixture(scope="session")
def images():
    """Three different 224x224 images."""
    return make_images(3, seed=1234)


def hook_count(module: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks (with or without kwargs) over every submodule."""
    total = 0
    for sub in module.modules():
        total += len(sub._forward_hooks) + len(sub._forward_pre_hooks)
        total += len(sub._forward_pre_hooks_with_kwargs) + len(getattr(sub, "_forward_hooks_with_kwargs", {}))
    return total


def names(*, residual=(), neurons=(), attention=(), cls_attention=(), final_tokens=False) -> list[str]:
    """Hook-point names for the given layers (``common.models.hooks``)."""
    from common.models.hooks import (
        FINAL,
        attn_cls_pattern,
        attn_pattern,
        mlp_post,
        resid_post,
    )

    return ([resid_post(l) for l in residual] + [mlp_post(l) for l in neurons]
            + [attn_pattern(l) for l in attention] + [attn_cls_pattern(l) for l in cls_attention]
            + ([FINAL] if final_tokens else []))


def run(hooked, images, *, num_registers=0, intervention=None, capture=()):
    """One forward through ``hooked.run_with_cache`` with ``intervention`` as its hook functions."""
    hooks = intervention.fwd_hooks(hooked.token_layout(num_registers)) if intervention is not None else ()
    return hooked.run_with_cache(images, capture, num_registers=num_registers, fwd_hooks=hooks)
