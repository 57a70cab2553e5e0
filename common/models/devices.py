"""Device selection: ``auto`` picks cuda, then mps, then cpu; an explicit device must exist."""

from __future__ import annotations

import torch

from common.errors import UserError


def resolve_device(requested: str | None) -> torch.device:
    """Return the torch device for ``requested`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).

    An explicitly requested device that is not available is an error, never a silent fallback.
    """
    name = (requested or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device {requested!r} was requested but CUDA is not available on this machine; "
                "use --device cpu (or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"device {requested!r} was requested but only {torch.cuda.device_count()} CUDA "
                "device(s) exist; pick an index below that"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(
                f"device {requested!r} was requested but MPS is not available on this machine; "
                "use --device cpu (or auto)"
            )
    elif device.type != "cpu":
        raise UserError(f"unsupported device {requested!r}: use auto, cpu, cuda, cuda:N or mps")
    return device
