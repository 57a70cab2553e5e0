"""The hook manager: read a ViT's internals, append test-time registers, intervene on neurons.

Hooks live only inside :meth:`HookedViT.hooks` (a context manager) and are removed when it
exits, also on error.  No library file or class is changed.  Hook points per family:

==================  =====================================  ====================================
what                open_clip VisionTransformer             timm VisionTransformer (DINOv2)
==================  =====================================  ====================================
register append     pre-hook on ``ln_pre`` (after pos emb)  hook on ``patch_drop`` (after
                                                            ``_pos_embed``)
layer output        hook on ``transformer.resblocks[l]``   hook on ``blocks[l]``
neuron activations  pre-hook on ``mlp.c_proj`` (after GELU) pre-hook on ``mlp.fc2`` (after act /
                                                            SwiGLU gate)
attention           pre-hook on ``attn`` (nn.MHA): q, k     hook on ``attn.qkv``: q, k from its
                    recomputed from ``in_proj``             output, through ``q_norm``/``k_norm``
final tokens        hook on ``ln_post``                     hook on ``norm``
==================  =====================================  ====================================

Reading leaves the model's output bit-for-bit unchanged: the read hooks return nothing, and
attention is recomputed on the side only when asked for (the fused kernels never materialise it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from common.backbones import Backbone, mlp_output_projection
from common.intervention import Intervention, apply_intervention


@dataclass(frozen=True)
class Capture:
    """What one forward records.  Layers are 0-based; negative layers count from the end."""

    residual: tuple[int, ...] = ()        # block outputs                  [B, N, d]
    neurons: tuple[int, ...] = ()         # MLP hidden units               [B, N, D_mlp]
    attention: tuple[int, ...] = ()       # attention probabilities        [B, H, N, N]
    cls_attention: tuple[int, ...] = ()   # CLS query row only (cheap)     [B, H, N]
    final_tokens: bool = False            # final-norm tokens              [B, N, d]


class ActivationCache(dict):
    """``{(kind, layer): tensor}`` filled by the hooks; ``kind`` is one of ``residual``,
    ``neurons``, ``attention``, ``cls_attention``, ``final_tokens`` (layer ``None``)."""

    def __getitem__(self, key):  # a clearer error than a bare KeyError tuple
        try:
            return super().__getitem__(key)
        except KeyError:
            raise KeyError(f"{key!r} was not captured; ask for it in Capture(...)") from None


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, H*dh] -> [B, H, N, dh]``."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q [B, H, Nq, dh]``, ``k [B, H, N, dh]`` -> probabilities ``[B, H, Nq, N]``."""
    scale = q.shape[-1] ** -0.5
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class HookedViT:
    """Scoped hooks over a :class:`Backbone` (in the spirit of TransformerLens's ``run_with_cache``).

    >>> hooked = HookedViT(backbone)
    >>> pooled, cache = hooked.run(images, capture=Capture(residual=(-1,)))
    >>> with hooked.hooks(num_registers=1, intervention=iv) as cache:
    ...     pooled = backbone.model(images)
    """

    def __init__(self, backbone: Backbone):
        self.backbone = backbone

    # ---------------------------------------------------------------------------------------
    def layer_index(self, layer: int) -> int:
        """0-based index of ``layer`` (negative counts from the end); checked against the depth."""
        depth = self.backbone.num_layers
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise IndexError(f"layer {layer} is outside a {depth}-layer model")
        return index

    def token_layout(self, num_registers: int) -> dict[str, slice]:
        """Token slices inside a block for ``num_registers`` test-time registers."""
        prefix = self.backbone.num_prefix_tokens
        patches_end = prefix + self.backbone.num_patches
        return {
            "cls": slice(0, 1),
            "trained_registers": slice(1, prefix),
            "patches": slice(prefix, patches_end),
            "registers": slice(patches_end, patches_end + num_registers),
        }

    # ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(
        self,
        *,
        num_registers: int = 0,
        intervention: Intervention | None = None,
        capture: Capture = Capture(),
    ) -> Iterator[ActivationCache]:
        """Install the hooks for the ``with`` body and yield the cache they fill.

        Each forward inside the body overwrites the cache entries.  All hooks are removed when
        the body ends, also when it raises.
        """
        if num_registers < 0:
            raise ValueError("num_registers must be >= 0")
        cache = ActivationCache()
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            if num_registers:
                handles.append(self._install_register_append(num_registers))
            intervened = {self.layer_index(l): list(ids) for l, ids in
                          (intervention.neurons.items() if intervention else []) if len(ids)}
            neuron_layers = {self.layer_index(l) for l in capture.neurons}
            for layer in sorted(set(intervened) | neuron_layers):
                handles.append(self._install_neuron_hook(
                    layer, cache, num_registers, intervention, intervened.get(layer),
                    record=layer in neuron_layers))
            for layer in {self.layer_index(l) for l in capture.residual}:
                handles.append(self._install_residual_hook(layer, cache))
            full = {self.layer_index(l) for l in capture.attention}
            cls_only = {self.layer_index(l) for l in capture.cls_attention}
            for layer in sorted(full | cls_only):
                handles.append(self._install_attention_hook(
                    layer, cache, full=layer in full, cls_only=layer in cls_only))
            if capture.final_tokens:
                handles.append(self._final_norm().register_forward_hook(
                    lambda module, args, output: cache.__setitem__(("final_tokens", None), output)))
            yield cache
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def run(
        self,
        images: torch.Tensor,
        *,
        num_registers: int = 0,
        intervention: Intervention | None = None,
        capture: Capture = Capture(),
    ) -> tuple[torch.Tensor, ActivationCache]:
        """One forward with hooks: ``[B, 3, H, W]`` -> (pooled feature ``[B, d_out]``, cache)."""
        with self.hooks(num_registers=num_registers, intervention=intervention, capture=capture) as cache:
            pooled = self.backbone.model(images)
        return pooled, cache

    # ---------------------------------------------------------------------------------------
    def _final_norm(self) -> nn.Module:
        model = self.backbone.model
        return model.ln_post if self.backbone.family == "clip" else model.norm

    def _install_register_append(self, num_registers: int):
        def append(tokens: torch.Tensor) -> torch.Tensor:
            batch, _, width = tokens.shape
            return torch.cat([tokens, tokens.new_zeros(batch, num_registers, width)], dim=1)

        model = self.backbone.model
        if self.backbone.family == "clip":
            return model.ln_pre.register_forward_pre_hook(
                lambda module, args: (append(args[0]),) + tuple(args[1:]))
        return model.patch_drop.register_forward_hook(lambda module, args, output: append(output))

    def _install_neuron_hook(self, layer: int, cache: ActivationCache, num_registers: int,
                             intervention: Intervention | None, neurons: list[int] | None, record: bool):
        prefix = self.backbone.num_prefix_tokens

        def hook(module, args):
            activations = args[0]
            changed = neurons is not None
            if changed:
                activations = apply_intervention(
                    activations, neurons, num_prefix_tokens=prefix, num_registers=num_registers,
                    scale=intervention.scale, normal_values=intervention.normal_values,
                    per_neuron_max=intervention.per_neuron_max)
            if record:
                cache[("neurons", layer)] = activations
            return (activations,) + tuple(args[1:]) if changed else None

        return mlp_output_projection(self.backbone, layer).register_forward_pre_hook(hook)

    def _install_residual_hook(self, layer: int, cache: ActivationCache):
        def hook(module, args, output):
            cache[("residual", layer)] = output

        return self.backbone.blocks[layer].register_forward_hook(hook)

    def _install_attention_hook(self, layer: int, cache: ActivationCache, *, full: bool, cls_only: bool):
        block = self.backbone.blocks[layer]

        def store(q: torch.Tensor, k: torch.Tensor) -> None:
            # q, k: [B, H, N, dh]
            if full:
                probabilities = _softmax_attention(q, k)
                cache[("attention", layer)] = probabilities
                if cls_only:
                    cache[("cls_attention", layer)] = probabilities[:, :, 0, :]
            else:
                cache[("cls_attention", layer)] = _softmax_attention(q[:, :, :1], k)[:, :, 0, :]

        if self.backbone.family == "clip":
            attention = block.attn  # nn.MultiheadAttention, batch_first, self-attention on ln_1(x)

            def clip_hook(module, args, kwargs):
                tokens = args[0] if args else kwargs["query"]
                width = attention.embed_dim
                weight, bias = attention.in_proj_weight, attention.in_proj_bias
                q = nn.functional.linear(tokens, weight[:width], None if bias is None else bias[:width])
                k = nn.functional.linear(tokens, weight[width:2 * width],
                                         None if bias is None else bias[width:2 * width])
                store(_split_heads(q, attention.num_heads), _split_heads(k, attention.num_heads))

            return attention.register_forward_pre_hook(clip_hook, with_kwargs=True)

        attention = block.attn  # timm Attention

        def timm_hook(module, args, output):
            batch, tokens, _ = output.shape
            qkv = output.reshape(batch, tokens, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])
            store(q, k)

        return attention.qkv.register_forward_hook(timm_hook)
