"""Where a backbone's weights come from (docs/models.md), for every family alike.

Order: an explicit ``--weights PATH``; the library's own cache (the Hugging Face hub cache, or a
family's other cache such as torch hub's for Meta's DINOv2 files); a hub download when the hub
answers.  When none works the caller gets one :class:`UserError` saying which file to fetch and
how to pass it: the hub client retries for about a minute on a dead network, so the hub is
probed first with a short TCP connect and never waited on.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from common.errors import UserError

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class WeightsHint:
    """What to fetch for a configured model: a hub repository and its file names (first
    preferred), and optionally another source (e.g. Meta's original checkpoint)."""

    what: str                          # e.g. "CLIP weights ViT-B-16/laion2b_s34b_b88k"
    repo_id: str                       # e.g. "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"
    filenames: tuple[str, ...]         # e.g. ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    alternative: str = ""              # e.g. "Meta's https://dl.fbaipublicfiles.com/.../x.pth"
    shown_file: str = ""               # the file named in the message (defaults to the last filename)
    gated: bool = False                # the hub serves it only to logged-in users who accepted its license

    def message(self) -> str:
        shown = self.shown_file or self.filenames[-1]
        page = f"{hub_endpoint()}/{self.repo_id}"
        if self.gated:
            return (f"{self.what} are gated and not in the local cache: accept the license at {page} (logged "
                    f"in), then download {shown} from there and pass it with --weights PATH, or log in with "
                    "`hf auth login` and run again")
        return (f"{self.what} are not in the local cache and the hub cannot be reached: download "
                f"{shown} from {page}"
                + (f" or {self.alternative}" if self.alternative else "")
                + " and pass it with --weights PATH")


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the host of ``url`` opens within ``timeout`` seconds.

    DNS lookups have no timeout of their own, so the probe runs in a daemon thread that is
    abandoned when it takes too long.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def cached_hub_file(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def fetch(hint: WeightsHint) -> str:
    """A local path for ``hint``: the hub cache, else a download; a UserError when neither works."""
    cached = cached_hub_file(hint.repo_id, hint.filenames)
    if cached:
        log.info("using cached weights %s", cached)
        return cached
    if not hub_reachable(hub_endpoint()):
        raise UserError(hint.message())
    from huggingface_hub import hf_hub_download

    last_error: Exception | None = None
    for filename in hint.filenames:
        try:
            return hf_hub_download(hint.repo_id, filename)
        except Exception as error:  # noqa: BLE001 - the hub raises many types; we report one line
            last_error = error
    raise UserError(f"{hint.message()} (download failed: {str(last_error).splitlines()[0]})")


def check_weights_file(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if path.is_dir():
        raise UserError(f"--weights {weights}: is a folder; pass the path of a downloaded checkpoint file")
    if not path.is_file():
        raise UserError(f"--weights {weights}: no such file; pass the path of a downloaded checkpoint")
    return path


def file_identity(path: str | Path) -> str:
    """Path, size and mtime: changes whenever the weights file does, without hashing gigabytes."""
    stat = os.stat(path)
    return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def _reason(error: Exception) -> str:
    """Why a checkpoint could not be read, in a few words.  torch's own text for a file that a safe
    load refuses suggests loading it unsafely; a checkpoint never needs that, so it is not relayed."""
    text = " ".join(str(error).split())
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
        return "it holds Python objects or a legacy format that a safe load refuses; it was not loaded"
    return (text.split(". ")[0] or type(error).__name__)[:160]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (safetensors or torch, never unpickling code) into a flat CPU state dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - many formats fail in many ways; one line says which
        raise UserError(f"--weights {path}: cannot be read as a checkpoint ({_reason(error)}); "
                        "pass a .safetensors, .pth or .bin file") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"--weights {path}: the file holds no state dict")
    return state
