"""DINOv3: timm's ``vit_{small,base,large}_patch16_dinov3`` (an ``Eva`` with RoPE and T = 4
trained registers), pooled on the final-norm CLS token as Meta's DINOv3 does (``global_pool='token'``).

Built at 224 px (14x14 patches of 16 px) with the same classification-eval preprocess as DINOv2
(resize 256 bicubic, centre crop 224, ImageNet mean/std).  There is no absolute position
embedding to resample: positions enter through the rotary embedding inside attention.

Test-time registers go where docs/intervention.md puts them, after the patches.  The rotary embedding covers
the patches only (timm rotates the tokens after the prefix), so each block's ``rope`` is
extended by one identity rotation (sin 0, cos 1) per register: like CLS and the trained
registers, a test-time register has no position.

Hook attachment:

* registers: a forward pre-hook on ``norm_pre`` (right after ``_pos_embed``), plus a pre-hook
  on every block that extends its ``rope`` argument;
* q/k: a pre-hook on ``attn`` that recomputes q and k from its input exactly as ``EvaAttention``
  does (projection, ``q_norm``/``k_norm``, rotary embedding after the prefix tokens): the fused
  kernel never materialises them.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from common.models.dinov2 import Dinov2Adapter
from common.models.family import QKStore, SmallDims, appending_pre_hook, seeded_init
from common.models.weights import WeightsHint

PRETRAINED_TAG = "lvd1689m"

ARCHS = {
    "vits16": "vit_small_patch16_dinov3",
    "vitb16": "vit_base_patch16_dinov3",
    "vitl16": "vit_large_patch16_dinov3",
}


def _identity_rotation(count: int, like: torch.Tensor) -> torch.Tensor:
    """``count`` rows of a concatenated ``[sin, cos]`` rotary table that rotate by zero."""
    half = like.shape[-1] // 2
    rows = like.new_zeros(*like.shape[:-2], count, like.shape[-1])
    rows[..., half:] = 1.0
    return rows


class Dinov3Adapter(Dinov2Adapter):
    name = "dinov3"
    title = "DINOv3"
    sizes = ARCHS
    pretrained_tag = PRETRAINED_TAG

    @classmethod
    def _create(cls, config: dict, **overrides) -> nn.Module:
        import timm

        return timm.create_model(cls.architecture(config), pretrained=False, num_classes=0, img_size=224,
                                 global_pool="token", **overrides)

    @classmethod
    def weights_hint(cls, config: dict) -> WeightsHint:
        arch = cls.architecture(config)
        size = config["backbone_size"]
        return WeightsHint(
            what=f"DINOv3 {size} weights", repo_id=f"timm/{arch}.{PRETRAINED_TAG}",
            filenames=("model.safetensors",), shown_file="model.safetensors",
            alternative=f"Meta's dinov3_{size}_pretrain_{PRETRAINED_TAG}-*.pth (DINOv3 download page, after "
                        "accepting its license)")

    @classmethod
    def cached_weights(cls, config: dict) -> str | None:
        return None

    @classmethod
    def convert(cls, state: dict, model: nn.Module, config: dict) -> dict:
        """timm's Eva filter converts Meta's DINOv3 keys (storage tokens, layer scales, qkv bias)."""
        from timm.models.eva import checkpoint_filter_fn

        return checkpoint_filter_fn(dict(state), model)

    @classmethod
    def create(cls, config: dict, seed: int, dims: SmallDims | None = None) -> nn.Module:
        if dims is None:
            return seeded_init(seed, lambda: cls._create(config))
        from timm.layers import LayerNorm
        from timm.models.eva import Eva

        # DINOv3-style: RoPE, 4 trained registers, layer scale, final-norm CLS.  Unlike DINOv3 the
        # small model also carries a learned absolute position embedding: the demo's planted circuit
        # reads it to mark the border patches where its registers may form.
        registers = 4 if dims.trained_registers is None else dims.trained_registers
        return seeded_init(seed, lambda: Eva(
            img_size=dims.image_size, patch_size=dims.patch_size, embed_dim=dims.width, depth=dims.depth,
            num_heads=dims.heads, mlp_ratio=dims.mlp_ratio, qkv_bias=False, init_values=1.0, rope_type="dinov3",
            rope_temperature=100, rope_rotate_half=True, use_rot_pos_emb=True, use_abs_pos_emb=True,
            num_reg_tokens=registers, dynamic_img_size=True, use_fc_norm=False, global_pool="token", num_classes=0,
            norm_layer=partial(LayerNorm, eps=1e-5)))

    # ---------------------------------------------------------------- hook attachment
    def attach_registers(self, num_registers, on_tokens):
        def extend_rope(module, args, kwargs):
            rope = kwargs.get("rope")
            if rope is None:
                return None
            kwargs = dict(kwargs, rope=torch.cat([rope, _identity_rotation(num_registers, rope)], dim=-2))
            return args, kwargs

        handles = [self.model.norm_pre.register_forward_pre_hook(appending_pre_hook(num_registers, on_tokens))]
        handles += [block.register_forward_pre_hook(extend_rope, with_kwargs=True) for block in self.blocks]
        return handles

    def attach_qk(self, layer: int, store: QKStore):
        from timm.layers import apply_rot_embed_cat

        attention = self.blocks[layer].attn  # timm EvaAttention

        def pre_hook(module, args, kwargs):
            tokens = args[0] if args else kwargs["x"]
            batch, count, _ = tokens.shape
            if attention.qkv is not None:
                bias = (None if attention.q_bias is None
                        else torch.cat((attention.q_bias, attention.k_bias, attention.v_bias)))
                qkv = nn.functional.linear(tokens, attention.qkv.weight, bias)
                q, k, _ = qkv.reshape(batch, count, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                q = attention.q_proj(tokens).reshape(batch, count, attention.num_heads, -1).transpose(1, 2)
                k = attention.k_proj(tokens).reshape(batch, count, attention.num_heads, -1).transpose(1, 2)
            q, k = attention.q_norm(q), attention.k_norm(k)
            rope = kwargs.get("rope")
            if rope is not None:
                prefix, half = attention.num_prefix_tokens, attention.rotate_half
                q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=half)], dim=2)
                k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=half)], dim=2)
            store(q, k)

        return attention.register_forward_pre_hook(pre_hook, with_kwargs=True)
