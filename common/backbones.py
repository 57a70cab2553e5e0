"""The two backbone families, built as their libraries build them (SPEC §3).

* ``clip``: open_clip's ``VisionTransformer`` (``model.visual``) with open_clip's preprocess;
  the image feature is ``encode_image(normalize=False)``, i.e. the projected CLS token.
* ``dinov2``: timm's ``vit_*_patch14_dinov2`` (or ``*_reg4_dinov2``) built at 224 px with
  DINOv2's classification-eval preprocess; the feature is the final-norm CLS token.  The
  position embedding is resampled from the checkpoint's 37x37 grid the way Meta's code does it
  at 224 px, not by timm's load-time resampling.

Weights are resolved in this order: an explicit ``--weights PATH``; the library's own cache;
a hub download when the hub answers.  When none works the loader stops with one message saying
which file to fetch and how to pass it (it never waits on a dead network).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from common.errors import UserError

log = logging.getLogger(__name__)

FAMILIES = ("clip", "dinov2")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINOV2_IMAGE_SIZE = 224
DINOV2_RESIZE = 256
DINOV2_CHECKPOINT_GRID = 37  # 518 px / 14
# Meta's historical interpolation kludge for the models without registers.
DINOV2_INTERPOLATE_OFFSET = 0.1

DINOV2_ARCHS = {
    "vits14": "vit_small_patch14_dinov2",
    "vitb14": "vit_base_patch14_dinov2",
    "vitl14": "vit_large_patch14_dinov2",
    "vitg14": "vit_giant_patch14_dinov2",
    "vits14_reg": "vit_small_patch14_reg4_dinov2",
    "vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "vitl14_reg": "vit_large_patch14_reg4_dinov2",
    "vitg14_reg": "vit_giant_patch14_reg4_dinov2",
}
DINOV2_PRETRAINED_TAG = "lvd142m"

HUB_PROBE_TIMEOUT_S = 3.0


@dataclass
class Backbone:
    """A vision transformer ready for feature extraction.

    Token order inside every block: ``[CLS, trained registers (T), patches (P)]``; test-time
    registers, when a hook appends them, come last.
    """

    family: str                       # "clip" | "dinov2"
    model: nn.Module                  # open_clip VisionTransformer | timm VisionTransformer
    preprocess: Callable[[Any], torch.Tensor]   # PIL image -> [3, H, W]
    device: torch.device
    description: str                  # e.g. "open_clip ViT-B-16 laion2b_s34b_b88k"
    weights_id: str                   # identifies the weights (for cache keys)
    activation: str                   # MLP activation actually used
    preprocess_id: str                # identifies the preprocessing (for cache keys)
    extra: dict = field(default_factory=dict)

    @property
    def blocks(self) -> list[nn.Module]:
        if self.family == "clip":
            return list(self.model.transformer.resblocks)
        return list(self.model.blocks)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus trained registers (1 + T)."""
        if self.family == "clip":
            return 1
        return int(self.model.num_prefix_tokens)

    @property
    def num_trained_registers(self) -> int:
        return self.num_prefix_tokens - 1

    @property
    def grid_size(self) -> tuple[int, int]:
        if self.family == "clip":
            return tuple(self.model.grid_size)
        return tuple(self.model.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    @property
    def width(self) -> int:
        """Residual-stream width d."""
        if self.family == "clip":
            return int(self.model.transformer.width)
        return int(self.model.embed_dim)

    @property
    def mlp_width(self) -> int:
        """Number of MLP hidden units fed to the output projection (D_mlp)."""
        return int(mlp_output_projection(self, 0).in_features)

    @property
    def num_heads(self) -> int:
        return int(self.blocks[0].attn.num_heads)

    @property
    def input_size(self) -> int:
        if self.family == "clip":
            return int(self.model.image_size[0])
        return int(self.model.patch_embed.img_size[0])

    @torch.no_grad()
    def stock_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The library's own pooled image feature, no hooks involved.  ``[B, 3, H, W] -> [B, d_out]``."""
        return self.model(images)


def mlp_output_projection(backbone: Backbone, layer: int) -> nn.Linear:
    """The MLP output projection of block ``layer`` (its input are the neuron activations)."""
    block = backbone.blocks[layer]
    if backbone.family == "clip":
        return block.mlp.c_proj
    return block.mlp.fc2


# --------------------------------------------------------------------------------------------
# Weight resolution helpers


def _hub_reachable(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the host of ``url`` opens within ``timeout`` seconds.

    The hub client retries for about a minute on a dead network; this probe lets us say what
    to do at once instead.  DNS lookups have no timeout of their own, so the probe runs in a
    daemon thread that is abandoned when it takes too long.
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


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _cached_hub_file(repo_id: str, filenames: list[str]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _download_hub_file(repo_id: str, filenames: list[str], missing_message: str) -> str:
    """Return a local path for the first of ``filenames`` in ``repo_id``: cache, else download."""
    cached = _cached_hub_file(repo_id, filenames)
    if cached:
        log.info("using cached weights %s", cached)
        return cached
    if not _hub_reachable(_hub_endpoint()):
        raise UserError(missing_message)
    from huggingface_hub import hf_hub_download

    last_error: Exception | None = None
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename)
        except Exception as error:  # noqa: BLE001 - the hub raises many types; we report one line
            last_error = error
    raise UserError(f"{missing_message} (download failed: {str(last_error).splitlines()[0]})")


def _file_identity(path: str | Path) -> str:
    """Path, size and mtime: changes whenever the weights file does, without hashing gigabytes."""
    stat = os.stat(path)
    return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def _check_weights_file(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"--weights {weights}: no such file; pass the path of a downloaded checkpoint")
    return path


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (safetensors or torch) into a flat state dict on the CPU."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise UserError(
            f"--weights {path}: cannot be read as a checkpoint ({str(error).splitlines()[0]}); "
            "pass a .safetensors, .pth or .bin file"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"--weights {path}: the file holds no state dict")
    return state


# --------------------------------------------------------------------------------------------
# CLIP (open_clip)


def clip_weights_hint(model_name: str, tag: str) -> tuple[str, str]:
    """(hub repo id, file name) of an open_clip pretrained tag."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise UserError(
            f"pretrained {tag!r} is not an open_clip tag of {model_name}; valid tags: {tags}"
        )
    repo_id, filename = os.path.split(cfg.get("hf_hub", ""))
    return repo_id, filename or "open_clip_pytorch_model.bin"


def _clip_weights_file(config: dict) -> str:
    """Local path of the configured open_clip tag: the hub cache, else a download."""
    import open_clip

    model_name, tag = config["model_name"], config.get("pretrained")
    if model_name not in open_clip.list_models():
        raise UserError(f"model_name {model_name!r} is not an open_clip model; try ViT-B-16")
    if not tag:
        raise UserError("config key 'pretrained' is empty: name an open_clip tag or pass --weights PATH")
    repo_id, filename = clip_weights_hint(model_name, tag)
    message = (
        f"CLIP weights {model_name}/{tag} are not in the local cache and the hub cannot be "
        f"reached: download {filename} from {_hub_endpoint()}/{repo_id} and pass it with "
        "--weights PATH"
    )
    # open_clip prefers the safetensors twin of its default file when the hub has one.
    candidates = [filename]
    if filename == "open_clip_pytorch_model.bin":
        candidates.insert(0, "open_clip_model.safetensors")
    return _download_hub_file(repo_id, candidates, message)


def _build_clip(config: dict, weights_file: str | None, seed: int) -> tuple[nn.Module, Callable, str, str]:
    import open_clip

    model_name = config["model_name"]
    if model_name not in open_clip.list_models():
        raise UserError(f"model_name {model_name!r} is not an open_clip model; try ViT-B-16")
    tag = config.get("pretrained")
    quick_gelu = bool(config.get("force_quick_gelu", False))
    preprocess_kwargs: dict[str, Any] = {}
    if tag:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
        for src, dst in (("mean", "image_mean"), ("std", "image_std"),
                         ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
            if src in tag_cfg:
                preprocess_kwargs[dst] = tag_cfg[src]
    if weights_file is None:
        pretrained = None
        torch.manual_seed(seed)
        weights_id = f"random-init-seed-{seed}"
    else:
        pretrained = str(weights_file)
        weights_id = f"{model_name}/{tag}|" + _file_identity(weights_file)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, force_quick_gelu=quick_gelu, **preprocess_kwargs
        )
    except Exception as error:  # noqa: BLE001 - a bad file fails in torch.load/unpickling with many types
        if pretrained is None:
            raise
        raise UserError(
            f"--weights {pretrained}: not an open_clip {model_name} checkpoint "
            f"({str(error).splitlines()[0][:200]})"
        ) from None
    visual = model.visual
    del model  # the text tower is not needed
    activation = type(visual.transformer.resblocks[0].mlp.gelu).__name__
    return visual, preprocess, weights_id, activation


# --------------------------------------------------------------------------------------------
# DINOv2 (timm)


def dinov2_arch(backbone_size: str) -> str:
    try:
        return DINOV2_ARCHS[backbone_size]
    except KeyError:
        raise UserError(
            f"backbone_size {backbone_size!r} is unknown; valid: {', '.join(DINOV2_ARCHS)}"
        ) from None


def dinov2_preprocess() -> Callable:
    """DINOv2's classification eval transform: resize 256 (bicubic), center crop 224, ImageNet norm."""
    return transforms.Compose([
        transforms.Resize(DINOV2_RESIZE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(DINOV2_IMAGE_SIZE),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def meta_interpolate_pos_embed(
    pos_embed: torch.Tensor, grid: int, num_prefix_tokens: int, with_registers: bool
) -> torch.Tensor:
    """Resample a square position embedding as Meta's DINOv2 code does for a ``grid x grid`` input.

    ``pos_embed``: ``[1, prefix + M*M, d]`` -> ``[1, prefix + grid*grid, d]``.  Plain models use
    bicubic with scale factor ``(grid + 0.1) / M`` and no antialias; the register models use
    the target size with antialias on (interpolate offset 0).
    """
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = int(round(math.sqrt(patch.shape[1])))
    if side * side != patch.shape[1]:
        raise UserError(f"position embedding with {patch.shape[1]} patch entries is not a square grid")
    if side == grid:
        return pos_embed
    dim = patch.shape[-1]
    patch = patch.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if with_registers:
        kwargs: dict[str, Any] = {"size": (grid, grid), "antialias": True}
    else:
        factor = (grid + DINOV2_INTERPOLATE_OFFSET) / side
        kwargs = {"scale_factor": (factor, factor), "antialias": False}
    patch = F.interpolate(patch, mode="bicubic", **kwargs)
    if patch.shape[-2:] != (grid, grid):
        raise RuntimeError(f"interpolated position grid is {tuple(patch.shape[-2:])}, expected {grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


def dinov2_weights_hint(backbone_size: str) -> tuple[str, str, str]:
    """(hub repo id, hub file name, Meta's original checkpoint URL) for a DINOv2 size.

    Built from the names alone (no timm import), so a missing file is reported at once.
    """
    arch = dinov2_arch(backbone_size)
    size = backbone_size.removesuffix("_reg")
    meta_name = f"dinov2_{size}{'_reg4' if backbone_size.endswith('_reg') else ''}_pretrain.pth"
    repo_id = f"timm/{arch}.{DINOV2_PRETRAINED_TAG}"
    return repo_id, "model.safetensors", f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{size}/{meta_name}"


def convert_dinov2_state_dict(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Bring a timm or Meta-original DINOv2 checkpoint to the keys of timm's 224 px model.

    timm's converter handles Meta's key layout; it is run against a 518 px template (built on
    the meta device, so it costs nothing) so that it leaves the 37x37 position grid alone, and
    the grid is then resampled by Meta's rule.
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    with torch.device("meta"):
        template = timm.create_model(arch, pretrained=False, num_classes=0,
                                     img_size=DINOV2_CHECKPOINT_GRID * 14)
    state = checkpoint_filter_fn(dict(state), template)
    prefix = 0 if template.no_embed_class else template.num_prefix_tokens
    grid = DINOV2_IMAGE_SIZE // 14
    side = int(round(math.sqrt(state["pos_embed"].shape[1] - prefix)))
    if side == grid:
        log.warning("the checkpoint's position embedding is already %dx%d; used as is, not "
                    "resampled by Meta's rule", grid, grid)
    state["pos_embed"] = meta_interpolate_pos_embed(
        state["pos_embed"], grid, prefix, with_registers=template.reg_token is not None
    )
    return state


def _build_dinov2(config: dict, weights_file: str | None, seed: int) -> tuple[nn.Module, Callable, str, str]:
    import timm

    backbone_size = config["backbone_size"]
    arch = dinov2_arch(backbone_size)
    path = weights_file
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=DINOV2_IMAGE_SIZE)
    if path is None:
        weights_id = f"random-init-seed-{seed}"
    else:
        state = _load_state_dict(Path(path))
        try:
            state = convert_dinov2_state_dict(state, arch)
            model.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError) as error:
            raise UserError(
                f"--weights {path}: not a DINOv2 {backbone_size} checkpoint "
                f"({str(error).splitlines()[0][:200]})"
            ) from None
        weights_id = f"{arch}|" + _file_identity(path)
    activation = type(model.blocks[0].mlp.act).__name__
    if "SwiGLU" in type(model.blocks[0].mlp).__name__:
        activation = "SwiGLU(" + activation + ")"
    return model, dinov2_preprocess(), weights_id, activation


def _resolve_dinov2_file(backbone_size: str) -> str:
    repo_id, filename, meta_url = dinov2_weights_hint(backbone_size)
    meta_name = os.path.basename(meta_url) if meta_url else ""
    if meta_name:
        # Meta's file in torch hub's cache counts as "the library's own cache".
        torch_hub_file = Path(torch.hub.get_dir()) / "checkpoints" / meta_name
        if torch_hub_file.is_file():
            return str(torch_hub_file)
    message = (
        f"DINOv2 {backbone_size} weights are not in the local cache and the hub cannot be "
        f"reached: download {filename} from {_hub_endpoint()}/{repo_id}"
        + (f" or Meta's {meta_url}" if meta_url else "")
        + " and pass it with --weights PATH"
    )
    return _download_hub_file(repo_id, [filename, "pytorch_model.bin"], message)


# --------------------------------------------------------------------------------------------


def resolve_weights(family: str, config: dict, weights: str | Path | None) -> str:
    """Local path of the weights a real run uses: ``--weights``, else the library cache, else a
    download; a :class:`UserError` saying what to fetch when none works.  Cheap to call first."""
    if weights is not None:
        return str(_check_weights_file(weights))
    if family == "clip":
        return _clip_weights_file(config)
    return _resolve_dinov2_file(config["backbone_size"])


def load_backbone(
    family: str,
    config: dict,
    *,
    device: torch.device | str = "cpu",
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> Backbone:
    """Build a backbone in eval mode on ``device``.

    ``random_init=True`` (seeded random weights) exists for tests, benchmarks and the demo; a
    real run never sets it.
    """
    if family not in FAMILIES:
        raise UserError(f"unknown model {family!r}: use one of {', '.join(FAMILIES)}")
    if random_init and weights is not None:
        raise ValueError("random_init and weights are mutually exclusive")
    weights_file = None if random_init else resolve_weights(family, config, weights)
    if family == "clip":
        model, preprocess, weights_id, activation = _build_clip(config, weights_file, seed)
        description = f"open_clip {config['model_name']} " + (
            "random init" if random_init else str(weights or config.get("pretrained")))
        preprocess_id = f"open_clip:{preprocess}"
    else:
        model, preprocess, weights_id, activation = _build_dinov2(config, weights_file, seed)
        description = f"timm {dinov2_arch(config['backbone_size'])} " + (
            "random init" if random_init else str(weights or DINOV2_PRETRAINED_TAG))
        preprocess_id = f"dinov2-eval:{preprocess}"
    device = torch.device(device)
    model = model.to(device=device, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return Backbone(
        family=family,
        model=model,
        preprocess=preprocess,
        device=device,
        description=description,
        weights_id=weights_id,
        activation=activation,
        preprocess_id=" ".join(preprocess_id.split()),
    )


def backbone_from_module(family: str, model: nn.Module, *, preprocess: Callable | None = None,
                         description: str, weights_id: str, device: str | torch.device = "cpu") -> Backbone:
    """Wrap an already built module (the demo fixture's small models) as a :class:`Backbone`."""
    model = model.to(device=torch.device(device), dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if preprocess is None:
        if family == "clip":
            from open_clip import image_transform

            preprocess = image_transform(int(model.image_size[0]), is_train=False)
        else:
            preprocess = transforms.Compose([
                transforms.Resize(int(model.patch_embed.img_size[0]),
                                  interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(int(model.patch_embed.img_size[0])),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ])
    if family == "clip":
        activation = type(model.transformer.resblocks[0].mlp.gelu).__name__
    else:
        activation = type(model.blocks[0].mlp.act).__name__
    return Backbone(
        family=family, model=model, preprocess=preprocess, device=torch.device(device),
        description=description, weights_id=weights_id, activation=activation,
        preprocess_id=" ".join(str(preprocess).split()),
    )
