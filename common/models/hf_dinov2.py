"""Hugging Face ``Dinov2Model`` checkpoints (e.g. RAD-DINO's ``model.safetensors``) in timm's layout.

A checkpoint filter in the manner of timm's own ``checkpoint_filter_fn``s: the keys of
``transformers``' DINOv2 (``embeddings.*``, ``encoder.layer.{i}.*``, ``layernorm.*``) renamed to
those of timm's ``VisionTransformer``, the separate query / key / value projections concatenated
into timm's fused ``qkv`` (rows: q, then k, then v), the mask token (used only in training)
dropped.  Nothing is computed: the converted model is the same network (tests/models/test_presets.py
checks it against a forward written from the Hugging Face layout itself).
"""

from __future__ import annotations

import re

import torch


PATCH_KEY = "embeddings.patch_embeddings.projection.weight"
_PREFIXES = ("", "dinov2.", "model.")

_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale1\.lambda1$", r"blocks.\1.ls1.gamma"),
    (r"^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$", r"blocks.\1.ls2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.fc1."),     # SwiGLU (ViT-g)
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
)
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def _prefix(state: dict) -> str | None:
    return next((p for p in _PREFIXES if p + PATCH_KEY in state), None)


def is_hf_dinov2(state: dict) -> bool:
    """Whether ``state`` is laid out as Hugging Face's ``Dinov2Model`` (optionally under ``dinov2.``)."""
    return _prefix(state) is not None


def to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under timm's ``VisionTransformer`` keys (a class token with its own
    position embedding, no trained registers: what ``Dinov2Model`` is)."""
    prefix = _prefix(state)
    if prefix is None:
        raise ValueError("not a Hugging Face Dinov2Model state dict")
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "embeddings.register_tokens" in state:
        raise ValueError("a Hugging Face Dinov2WithRegisters checkpoint is not supported; use its timm or Meta "
                         "(DINOv2 repository) release")
    converted: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _QKV.match(key)
        if match:
            layer, which, kind = match.groups()
            parts.setdefault((layer, kind), {})[which] = value
            continue
        if key == "embeddings.mask_token":
            continue
        for pattern, replacement in _RENAMES:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise ValueError(f"unexpected key {key!r} in a Hugging Face Dinov2Model checkpoint")
    for (layer, kind), found in parts.items():
        if set(found) != {"query", "key", "value"}:
            raise ValueError(f"layer {layer}: query, key and value {kind} are not all present")
        converted[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([found["query"], found["key"], found["value"]])
    return converted
