"""The backbone families, one adapter class each (see :mod:`common.models.family`).

Adding a family: write ``common/models/<name>.py`` with a :class:`FamilyAdapter` subclass (it
must implement every abstract method, and say where a block keeps its projections in
``block_parts``), add one line to :data:`FAMILIES`, and its config dict to ``configs.py``
(docs/extending.md).
"""

from __future__ import annotations

from common.errors import UserError
from common.models.clip import ClipAdapter
from common.models.dinov2 import Dinov2Adapter
from common.models.dinov3 import Dinov3Adapter
from common.models.family import FamilyAdapter, ModelIdentity

FAMILIES: dict[str, type[FamilyAdapter]] = {
    "clip": ClipAdapter,
    "dinov2": Dinov2Adapter,
    "dinov3": Dinov3Adapter,
}


def get_family(name: str) -> type[FamilyAdapter]:
    """The adapter class of family ``name`` (UserError naming the valid ones)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}: use one of {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "FamilyAdapter", "ModelIdentity", "get_family"]
