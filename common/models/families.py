"""The model families, one adapter class each (see :mod:`common.models.family`).

Families are code, presets are data: ``configs.PRESETS`` names, for each ``--model`` preset, its
config dict and one of these families (:mod:`common.models.presets`).  Adding a family: write
``common/models/<name>.py`` with a :class:`FamilyAdapter` subclass (it must implement every
abstract method, and say where a block keeps its projections in ``block_parts``) and add one line
to :data:`FAMILIES` (docs/extending.md).
"""

from __future__ import annotations

from common.errors import UserError
from common.models.clip import ClipAdapter
from common.models.dinov2 import Dinov2Adapter
from common.models.dinov3 import Dinov3Adapter
from common.models.family import FamilyAdapter, ModelIdentity
from common.models.timm_vit import TimmViTAdapter

FAMILIES: dict[str, type[FamilyAdapter]] = {
    "clip": ClipAdapter,          # open_clip: its own ViT, or a timm trunk with a projection (BiomedCLIP)
    "timm": TimmViTAdapter,       # any timm VisionTransformer (UNI, Virchow2, RAD-DINO, --model timm:<name>)
    "dinov2": Dinov2Adapter,      # timm's DINOv2 at 224 px with Meta's position-embedding rule
    "dinov3": Dinov3Adapter,      # timm's DINOv3 (an Eva with RoPE)
}


def get_family(name: str) -> type[FamilyAdapter]:
    """The adapter class of family ``name`` (UserError naming the valid ones)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}: use one of {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "FamilyAdapter", "ModelIdentity", "get_family"]
