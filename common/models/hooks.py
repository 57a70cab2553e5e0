"""Named hook points on a ViT, in the spirit of TransformerLens's ``HookPoint`` /
``run_with_cache`` / ``run_with_hooks``: read a model's internals, append test-time registers,
and change activations with user hook functions, all scoped to one call or ``with`` block.

Hook points (``l`` is a 0-based block index; a negative index counts from the end and is stored
under its 0-based name):

=====================================  ===================  ===============================================
name                                   shape                what
=====================================  ===================  ===============================================
``hook_registers``                     ``[B, N + R, d]``    tokens right after the position embedding, the
                                                            R test-time registers appended as zeros
``blocks.{l}.hook_resid_post``         ``[B, N, d]``        residual stream after block l
``blocks.{l}.mlp.hook_post``           ``[B, N, D_mlp]``    MLP hidden units as fed to the output projection
                                                            (after the activation; SwiGLU's gated product)
``blocks.{l}.attn.hook_pattern``       ``[B, H, N, N]``     post-softmax attention probabilities
``blocks.{l}.attn.hook_cls_pattern``   ``[B, H, N]``        the CLS query's row of it (cheap)
``hook_final``                         ``[B, N, d]``        final-norm tokens
=====================================  ===================  ===============================================

(N counts CLS, trained registers, patches and the R test-time registers; the layout is the
model's own, :class:`TokenLayout`.  A model without a class token has no CLS points.)  A hook function is
``fn(tensor, name) -> tensor | None``: returning a tensor replaces the activation (not allowed
at the attention points, which are computed on the side and read-only).  Reading leaves the
model's output bit-for-bit unchanged.  Attention is only computed when one of its points is
asked for.  Every hook is removed when the call or ``with`` block ends, also on error.  Where
each point attaches is the family adapter's business (:mod:`common.models.families`).
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from common.models.backbone import Backbone

REGISTERS = "hook_registers"
FINAL = "hook_final"

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]

_LAYER_POINTS = {
    "resid_post": "blocks.{}.hook_resid_post",
    "mlp_post": "blocks.{}.mlp.hook_post",
    "attn_pattern": "blocks.{}.attn.hook_pattern",
    "attn_cls_pattern": "blocks.{}.attn.hook_cls_pattern",
}
_NAME = re.compile(r"blocks\.(-?\d+)\.(hook_resid_post|mlp\.hook_post|attn\.hook_pattern|attn\.hook_cls_pattern)$")
_KIND_OF_SUFFIX = {template.split("}.", 1)[1]: kind for kind, template in _LAYER_POINTS.items()}


def resid_post(layer: int) -> str:
    return _LAYER_POINTS["resid_post"].format(layer)


def mlp_post(layer: int) -> str:
    return _LAYER_POINTS["mlp_post"].format(layer)


def attn_pattern(layer: int) -> str:
    return _LAYER_POINTS["attn_pattern"].format(layer)


def attn_cls_pattern(layer: int) -> str:
    return _LAYER_POINTS["attn_cls_pattern"].format(layer)


@dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token sits inside a block for R test-time registers:
    ``[CLS (if the model has one), trained registers, patches, test-time registers]``."""

    prefix: int          # CLS + trained registers (the model's num_prefix_tokens)
    patches: int         # P
    registers: int       # R
    has_cls: bool = True

    @property
    def cls(self) -> slice:
        """The class token's position (empty without one)."""
        return slice(0, int(self.has_cls))

    @property
    def trained_registers(self) -> slice:
        return slice(int(self.has_cls), self.prefix)

    @property
    def patch_slice(self) -> slice:
        return slice(self.prefix, self.prefix + self.patches)

    @property
    def register_slice(self) -> slice:
        return slice(self.prefix + self.patches, self.prefix + self.patches + self.registers)

    @property
    def total(self) -> int:
        return self.prefix + self.patches + self.registers

    def candidates(self, device: torch.device | None = None) -> torch.Tensor:
        """Bool ``[N]``: CLS and the image patches (what detection looks at, docs/detection.md)."""
        mask = torch.zeros(self.total, dtype=torch.bool, device=device)
        mask[self.cls] = True
        mask[self.patch_slice] = True
        return mask


class ActivationCache(dict):
    """``{hook point name: tensor}`` filled during a forward; looked up by any spelling of a
    name (``blocks.-1.hook_resid_post`` finds the last block's entry)."""

    def __init__(self, canonical: Callable[[str], str] = lambda name: name):
        super().__init__()
        self._canonical = canonical

    def __getitem__(self, name):  # a clearer error than a bare KeyError
        try:
            return super().__getitem__(self._canonical(name))
        except (KeyError, ValueError, IndexError):
            raise KeyError(f"{name!r} was not cached; ask for it in the names to cache") from None

    def __contains__(self, name) -> bool:
        try:
            return super().__contains__(self._canonical(name))
        except (ValueError, IndexError):
            return False


class HookedViT:
    """Named, scoped hook points over a :class:`Backbone`.

    >>> hooked = HookedViT(backbone)
    >>> pooled, cache = hooked.run_with_cache(images, [resid_post(-1), FINAL])
    >>> pooled = hooked.run_with_hooks(images, [(mlp_post(5), my_fn)], num_registers=1)
    >>> with hooked.hooks(fwd_hooks=ttr_hooks, cache=[FINAL], num_registers=1) as cache:
    ...     pooled = backbone.model(images)
    """

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.adapter = backbone.adapter

    # ---------------------------------------------------------------- names and layout
    def layer_index(self, layer: int) -> int:
        """0-based index of ``layer`` (negative counts from the end); checked against the depth."""
        depth = self.backbone.num_layers
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise IndexError(f"layer {layer} is outside a {depth}-layer model (valid: 0..{depth - 1} "
                             f"or -{depth}..-1)")
        return index

    def hook_names(self) -> list[str]:
        """Every hook point of this model."""
        names = [REGISTERS]
        kinds = [kind for kind in _LAYER_POINTS if kind != "attn_cls_pattern" or self.adapter.has_cls]
        for layer in range(self.backbone.num_layers):
            names += [_LAYER_POINTS[kind].format(layer) for kind in kinds]
        return names + [FINAL]

    def parse(self, name: str) -> tuple[str, int | None]:
        """``(kind, 0-based layer)`` of a hook point name; ValueError for an unknown name."""
        if name in (REGISTERS, FINAL):
            return name, None
        match = _NAME.match(name)
        if match is None:
            raise ValueError(f"unknown hook point {name!r}; valid: {REGISTERS}, {FINAL}, "
                             + ", ".join(t.format("{l}") for t in _LAYER_POINTS.values()))
        return _KIND_OF_SUFFIX[match.group(2)], self.layer_index(int(match.group(1)))

    def canonical(self, name: str) -> str:
        kind, layer = self.parse(name)
        return name if layer is None else _LAYER_POINTS[kind].format(layer)

    def token_layout(self, num_registers: int) -> TokenLayout:
        return TokenLayout(self.backbone.num_prefix_tokens, self.backbone.num_patches, num_registers,
                           has_cls=self.adapter.has_cls)

    # ---------------------------------------------------------------- the scoped hooks
    @contextlib.contextmanager
    def hooks(self, *, fwd_hooks: Sequence[tuple[str, HookFn]] = (), cache: Iterable[str] = (),
              num_registers: int = 0) -> Iterator[ActivationCache]:
        """Install the hooks for the ``with`` body and yield the cache they fill.

        ``fwd_hooks``: ``(name, fn)`` pairs, applied in order at each point; ``cache``: names whose
        (possibly changed) tensors are kept; ``num_registers``: R test-time registers appended.
        Each forward inside the body overwrites the cache entries.
        """
        if num_registers < 0:
            raise ValueError("num_registers must be >= 0")
        functions: dict[str, list[HookFn]] = defaultdict(list)
        for name, fn in fwd_hooks:
            functions[self.canonical(name)].append(fn)
        cached = {self.canonical(name) for name in cache}
        kinds = {self.parse(name)[0] for name in {*functions, *cached}}
        if not self.adapter.has_cls and "attn_cls_pattern" in kinds:
            raise ValueError("this model has no class token: it has no CLS attention (hook_cls_pattern)")
        store = ActivationCache(self.canonical)
        handles: list[torch.utils.hooks.RemovableHandle] = []

        def apply(name: str, tensor: torch.Tensor, writable: bool) -> torch.Tensor | None:
            """Run the hook functions of ``name``; returns the replacement (None if unchanged)."""
            changed = None
            for fn in functions.get(name, ()):
                result = fn(tensor if changed is None else changed, name)
                if result is not None:
                    if not writable:
                        raise ValueError(f"{name} is read-only: its hook functions must return None")
                    changed = result
            if name in cached:
                store[name] = tensor if changed is None else changed
            return changed

        points = set(functions) | cached
        try:
            if num_registers or REGISTERS in points:
                handles += self.adapter.attach_registers(
                    num_registers, lambda tokens: apply(REGISTERS, tokens, writable=True))
            by_layer: dict[int, set[str]] = defaultdict(set)
            for name in points - {REGISTERS, FINAL}:
                kind, layer = self.parse(name)
                by_layer[layer].add(kind)
            for layer, kinds in sorted(by_layer.items()):
                handles += self._attach_layer(layer, kinds, apply)
            if FINAL in points:
                handles.append(self.adapter.final_norm.register_forward_hook(
                    lambda module, args, output: apply(FINAL, output, writable=True)))
            handles += self.adapter.attach_pooling_guard(num_registers)   # last: every point sees the registers
            yield store
        finally:
            for handle in handles:
                handle.remove()

    def _attach_layer(self, layer: int, kinds: set[str], apply) -> list:
        handles = []
        if "resid_post" in kinds:
            name = resid_post(layer)
            handles.append(self.adapter.blocks[layer].register_forward_hook(
                lambda module, args, output: apply(name, output, writable=True)))
        if "mlp_post" in kinds:
            neurons = mlp_post(layer)

            def pre_hook(module, args):
                changed = apply(neurons, args[0], writable=True)
                return None if changed is None else (changed,) + tuple(args[1:])

            handles.append(self.adapter.mlp_out(layer).register_forward_pre_hook(pre_hook))
        full, cls_only = "attn_pattern" in kinds, "attn_cls_pattern" in kinds
        if full or cls_only:
            pattern, cls_pattern = attn_pattern(layer), attn_cls_pattern(layer)
            cls = self.token_layout(0).cls.start      # the class token's position (the model's layout)

            def store(q: torch.Tensor, k: torch.Tensor) -> None:
                # q, k: [B, H, N, dh]; the probabilities in fp32 whatever the autocast dtype
                q, k = q.float(), k.float()
                if full:
                    probabilities = softmax_attention(q, k)
                    apply(pattern, probabilities, writable=False)
                    if cls_only:
                        apply(cls_pattern, probabilities[:, :, cls, :], writable=False)
                else:
                    apply(cls_pattern, softmax_attention(q[:, :, cls:cls + 1], k)[:, :, 0, :], writable=False)

            handles.append(self.adapter.attach_qk(layer, store))
        return handles

    # ---------------------------------------------------------------- one forward
    @torch.no_grad()
    def run_with_cache(self, images: torch.Tensor, names: Iterable[str], *, num_registers: int = 0,
                       fwd_hooks: Sequence[tuple[str, HookFn]] = ()) -> tuple[torch.Tensor, ActivationCache]:
        """One forward ``[B, 3, H, W]`` -> (pooled feature ``[B, d_out]``, cache of ``names``)."""
        with self.hooks(fwd_hooks=fwd_hooks, cache=names, num_registers=num_registers) as cache, \
                self.backbone.autocast():
            pooled = self.backbone.model(images)
        return pooled, cache

    @torch.no_grad()
    def run_with_hooks(self, images: torch.Tensor, fwd_hooks: Sequence[tuple[str, HookFn]], *,
                       num_registers: int = 0) -> torch.Tensor:
        """One forward with ``fwd_hooks`` -> pooled feature ``[B, d_out]``."""
        return self.run_with_cache(images, (), num_registers=num_registers, fwd_hooks=fwd_hooks)[0]


def softmax_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q [B, H, Nq, dh]``, ``k [B, H, N, dh]`` -> probabilities ``[B, H, Nq, N]``."""
    scale = q.shape[-1] ** -0.5
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
