"""A backbone ready for feature extraction, built by its family adapter (docs/models.md).

:func:`load_backbone` resolves the weights (``--weights PATH``, else the library's cache, else
the hub; one clear error naming the file to fetch when none works), lets the family build and
convert, and returns a :class:`Backbone` in eval mode with frozen parameters.  Which family a
``--model`` name stands for is :mod:`common.models.presets`'s; everything family-specific lives in
:mod:`common.models.families`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from common.models.families import FamilyAdapter, ModelIdentity, get_family
from common.models.family import TextEncoder
from common.models.presets import family_class, family_of
from common.models.weights import check_weights_file, fetch

PRECISIONS = ("auto", "fp32", "bf16")


def _from_adapter(name: str, doc: str) -> property:
    """A read-only property that the family adapter answers."""
    return property(lambda self: getattr(self.adapter, name), doc=doc)


@dataclass
class Backbone:
    """A vision transformer, its preprocess and what identifies it.

    Token order inside every block: ``[CLS, trained registers (T), patches (P)]`` (no CLS in a
    model without a class token); test-time registers, when a hook appends them, come last.
    """

    family: str                       # "clip" | "timm" | "dinov2" | "dinov3" (common.models.families)
    adapter: FamilyAdapter            # the family's view of ``model``
    preprocess: Callable[[Any], torch.Tensor]   # PIL image -> [3, H, W]
    device: torch.device
    description: str                  # e.g. "open_clip ViT-B-16 laion2b_s34b_b88k"
    weights_id: str                   # identifies the weights (for cache keys)
    identity: ModelIdentity           # family, architecture, depth, MLP width, weights name
    precision: str = "fp32"           # "fp32" | "bf16" (autocast for the forward passes)
    text: TextEncoder | None = None   # the text tower, for zero-shot classification (CLIP, when asked for)
    name: str = ""                    # the --model name (a preset, timm:<name>, open_clip:<arch>:<tag>)

    # What the family adapter answers about the built model (common.models.family.FamilyAdapter).
    model = _from_adapter("model", "The nn.Module.")
    blocks = _from_adapter("blocks", "The transformer blocks, in order.")
    num_prefix_tokens = _from_adapter("num_prefix_tokens", "CLS (if any) plus trained registers.")
    has_cls = _from_adapter("has_cls", "Whether token 0 is a class token.")
    grid_size = _from_adapter("grid_size", "(rows, cols) of the image-patch grid.")
    width = _from_adapter("width", "d: the residual-stream width.")
    mlp_width = _from_adapter("mlp_width", "D_mlp: the neurons of one block's MLP.")
    num_heads = _from_adapter("num_heads", "Attention heads per block.")
    input_size = _from_adapter("input_size", "Side of the square input image, in pixels.")
    activation = _from_adapter("activation", "Name of the MLP activation actually used.")

    @property
    def num_layers(self) -> int:
        return len(self.adapter.blocks)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    @property
    def pooled_width(self) -> int:
        """d_out: the width of the pooled feature (CLIP's projection; d elsewhere)."""
        return int(self.adapter.project(torch.zeros(1, self.width, device=self.device)).shape[-1])

    @property
    def preprocess_id(self) -> str:
        return " ".join(str(self.preprocess).split())

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward passes' precision: with ``precision`` bf16, bf16 autocast (and on CUDA TF32
        for the matmuls autocast leaves in fp32), restored on exit; fp32 changes nothing."""
        if self.precision != "bf16":
            yield
            return
        cuda = self.device.type == "cuda"
        saved = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = saved or cuda
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved

    @torch.no_grad()
    def stock_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The library's own pooled image feature, no hooks involved.  ``[B, 3, H, W] -> [B, d_out]``."""
        return self.model(images)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA (with TF32 matmuls), fp32 elsewhere (bf16 is slower on most CPUs)."""
    if precision not in PRECISIONS:   # a user's value is checked where it enters (common.app.settings)
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_weights(model: str, config: dict, weights: str | Path | None) -> str:
    """Local path of the weights a real run uses: ``--weights``, else a library cache, else a
    download; a :class:`common.errors.UserError` saying what to fetch when none works.  Cheap to call first."""
    if weights is not None:
        return str(check_weights_file(weights))
    adapter = family_class(model)
    hint = adapter.weights_hint(config)       # validates the configured names first
    return adapter.cached_weights(config) or fetch(hint)


def _frozen(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device=device, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_backbone(
    model: str,
    config: dict,
    *,
    device: torch.device | str = "cpu",
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    precision: str = "fp32",
) -> Backbone:
    """Build ``--model model`` (a preset, ``timm:<name>``, ``open_clip:<arch>:<tag>`` or a family's
    name) configured by ``config``, in eval mode on ``device``.

    ``random_init=True`` (seeded random weights) exists for tests and benchmarks; a real run
    never sets it.  torch's global RNG is left as it was.
    """
    family = family_of(model)
    adapter_class = get_family(family)
    if random_init and weights is not None:
        raise ValueError("random_init and weights are mutually exclusive")
    weights_file = None if random_init else resolve_weights(model, config, weights)
    built = adapter_class.build(config, weights_file, seed)
    device = torch.device(device)
    adapter = adapter_class.wrap(_frozen(built.model, device))
    identity = adapter.identity_of(family, adapter_class.architecture(config),
                                   "random-init" if random_init else adapter_class.weights_name(config))
    return Backbone(family=family, adapter=adapter, preprocess=built.preprocess, device=device,
                    description=built.description, weights_id=built.weights_id, identity=identity,
                    precision=resolve_precision(precision, device),
                    text=built.text.to(device) if built.text is not None else None, name=model)


def backbone_from_module(model: str, module: nn.Module, *, preprocess: Callable, description: str, weights_id: str,
                         device: str | torch.device = "cpu", precision: str = "fp32",
                         text: TextEncoder | None = None) -> Backbone:
    """Wrap an already built module of ``--model model``'s family (the demo's small planted models)
    as a :class:`Backbone`."""
    family = family_of(model)
    device = torch.device(device)
    adapter = get_family(family).wrap(_frozen(module, device))
    identity = adapter.identity_of(family, f"planted-{model}", weights_id)
    return Backbone(family=family, adapter=adapter, preprocess=preprocess, device=device,
                    description=description, weights_id=weights_id, identity=identity,
                    precision=resolve_precision(precision, device),
                    text=text.to(device) if text is not None else None, name=model)
