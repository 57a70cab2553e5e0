"""The ``clip`` family: open_clip's CLIP image towers, its own ``VisionTransformer`` (CLIP ViT-B/16)
and the timm trunk plus projection of its ``TimmModel`` (BiomedCLIP).

The image feature is what open_clip's ``encode_image(normalize=False)`` returns: the final-norm
CLS token times the projection.  The checkpoint's activation is used (GELU for
``laion2b_s34b_b88k``) unless ``force_quick_gelu`` asks for the reference repository's QuickGELU.

Config keys (docs/models.md): ``model_name`` - an open_clip architecture (``ViT-B-16``, with the
``pretrained`` tag of its weights), or ``hf-hub:<repo>`` for a model released on the hub with an
``open_clip_config.json``, whose content the config dict then holds as ``open_clip_config`` (as
published): the image tower is built from it directly (for BiomedCLIP: the timm trunk and the
linear projection), so image features need neither a download of that file nor ``transformers``.
Zero-shot needs the text tower, for BiomedCLIP PubMedBERT through ``transformers``: an optional
extra (requirements-zeroshot.txt), named in a one-line error when missing.

Hook attachment (open_clip's own ViT; the timm trunk is the timm adapter's, :mod:`common.models.timm_vit`):

* registers: a forward pre-hook on ``ln_pre`` (after the position embedding, docs/models.md);
* q/k: a pre-hook on ``attn`` (``nn.MultiheadAttention``, called by open_clip with
  ``need_weights=False``): q and k are recomputed from ``in_proj_weight`` on the side.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from common.errors import UserError
from common.models.family import (
    BlockParts, Built, FamilyAdapter, QKStore, SmallDims, TextEncoder, appending_pre_hook, seeded_init, split_heads
)
from common.models.timm_vit import HUB_PREFIX, TimmViTAdapter, load_into_new
from common.models.weights import WeightsHint, file_identity, load_state_dict

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
ZERO_SHOT_EXTRA = "pip install -r requirements-zeroshot.txt"


def _hub_repo(config: dict) -> str | None:
    name = str(config.get("model_name") or "")
    return name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else None


def _model_cfg(config: dict) -> dict[str, Any]:
    """open_clip's model config (``embed_dim``, ``vision_cfg``, ...) of the configured model."""
    import open_clip

    if _hub_repo(config) is not None:
        published = config.get("open_clip_config")
        if not isinstance(published, dict) or "model_cfg" not in published:
            raise UserError(f"model_name {config['model_name']}: the config dict needs open_clip_config, the hub "
                            "repository's open_clip_config.json as published")
        return published["model_cfg"]
    return open_clip.get_model_config(config["model_name"])


def _tiny_timm_tower(model_cfg: dict, dims: SmallDims) -> nn.Module:
    """open_clip's ``TimmModel`` of ``model_cfg`` with a small trunk of the same timm architecture
    (the trunk and head as ``TimmModel`` sets them up: no classifier, the configured pooling, the
    linear projection)."""
    import open_clip.model
    import timm

    vision = dict(model_cfg["vision_cfg"])
    if vision.get("timm_proj", "linear") != "linear":
        raise UserError(f"a small model of a timm tower with projection {vision.get('timm_proj')!r} is not supported")
    with torch.device("meta"):   # the wrapper's structure only; its trunk and head are replaced below
        tower = open_clip.model._build_vision_tower(model_cfg["embed_dim"], vision)
    structure = tower.trunk
    overrides: dict[str, Any] = dict(img_size=dims.image_size, patch_size=dims.patch_size, embed_dim=dims.width,
                                     depth=dims.depth, num_heads=dims.heads, mlp_ratio=dims.mlp_ratio)
    if not isinstance(getattr(structure.blocks[0], "ls1", nn.Identity()), nn.Identity):
        overrides["init_values"] = 1.0
    trunk = timm.create_model(vision["timm_model_name"], pretrained=False, **overrides)
    pool = vision.get("timm_pool", "")
    trunk.reset_classifier(0, **({"global_pool": pool} if pool else {}))
    tower.trunk = trunk
    tower.head.proj = nn.Linear(dims.width, dims.width // 2, bias=bool(vision.get("timm_proj_bias", False)))
    tower.image_size = (dims.image_size, dims.image_size)
    return tower


class ClipAdapter(FamilyAdapter):
    name = "clip"
    title = "CLIP"
    block_parts = BlockParts(mlp_out="mlp.c_proj", attn_out="attn.out_proj")
    supports_zero_shot = True
    building_keys = ("model_name", "pretrained", "force_quick_gelu", "open_clip_config")
    # --model open_clip:<arch>:<tag>: detection settings of CLIP ViT-B/16 (the seeds): detect at the
    # last layer, keep the first half of the depth (6 of 12 layers: 0..5), top 20.
    generic_defaults: ClassVar[dict] = {"detect_outliers_layer": -1, "depth_share": 0.5, "top_k": 20}

    @classmethod
    def wrap(cls, model: nn.Module) -> FamilyAdapter:
        from open_clip.timm_model import TimmModel

        if isinstance(model, TimmModel):
            return ClipTimmTowerAdapter(model)
        if getattr(model, "attn_pool", None) is not None or getattr(model, "pool_type", "tok") != "tok":
            raise UserError("only open_clip ViTs pooled on their class token are supported (this one pools by "
                            f"{getattr(model, 'pool_type', '?')!r} or attention)")
        return cls(model)

    # ---------------------------------------------------------------- a configured model
    @classmethod
    def architecture(cls, config: dict) -> str:
        import open_clip

        name = str(config.get("model_name") or "")
        if _hub_repo(config) is not None:
            _model_cfg(config)
        elif name not in open_clip.list_models():
            raise UserError(f"model_name {name!r} is not an open_clip model; try ViT-B-16")
        return name

    @classmethod
    def _quick_gelu(cls, config: dict) -> bool:
        return bool(config.get("force_quick_gelu", False)) or bool(_model_cfg(config).get("quick_gelu", False))

    @classmethod
    def create(cls, config: dict, seed: int, dims: SmallDims | None = None) -> nn.Module:
        import open_clip.model

        model_cfg = _model_cfg(config)
        if dims is not None and model_cfg["vision_cfg"].get("timm_model_name"):
            return seeded_init(seed, lambda: _tiny_timm_tower(model_cfg, dims))
        if dims is not None:
            vision = {**model_cfg["vision_cfg"], "width": dims.width, "layers": dims.depth,
                      "head_width": dims.width // dims.heads, "patch_size": dims.patch_size,
                      "image_size": dims.image_size, "mlp_ratio": dims.mlp_ratio}
            return seeded_init(seed, lambda: open_clip.model._build_vision_tower(
                dims.width // 2, vision, quick_gelu=cls._quick_gelu(config)))
        return seeded_init(seed, lambda: open_clip.model._build_vision_tower(
            model_cfg["embed_dim"], model_cfg["vision_cfg"], quick_gelu=cls._quick_gelu(config)))

    @classmethod
    def _preprocess_kwargs(cls, config: dict) -> dict[str, Any]:
        import open_clip

        if _hub_repo(config) is not None:
            published = config["open_clip_config"].get("preprocess_cfg", {})
            names = {"mean": "mean", "std": "std", "interpolation": "interpolation", "resize_mode": "resize_mode"}
            return {dst: published[src] for src, dst in names.items() if src in published}
        tag = config.get("pretrained")
        tag_cfg = (open_clip.get_pretrained_cfg(config["model_name"], tag) or {}) if tag else {}
        return {key: tag_cfg[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in tag_cfg}

    @classmethod
    def preprocess(cls, config: dict, image_size: int | None = None) -> Callable:
        from open_clip import image_transform

        size = image_size or int(_model_cfg(config)["vision_cfg"].get("image_size", 224))
        return image_transform(size, is_train=False, **cls._preprocess_kwargs(config))

    @classmethod
    def weights_name(cls, config: dict) -> str:
        return _hub_repo(config) or str(config.get("pretrained") or "")

    @classmethod
    def weights_hint(cls, config: dict) -> WeightsHint:
        import open_clip

        repo = _hub_repo(config)
        if repo is not None:
            return WeightsHint(what=f"{repo} weights", repo_id=repo, filenames=OPEN_CLIP_FILES,
                               shown_file="open_clip_pytorch_model.bin")
        model_name, tag = cls.architecture(config), config.get("pretrained")
        if not tag:
            raise UserError("config key 'pretrained' is empty: name an open_clip tag or pass --weights PATH")
        tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
        if not tag_cfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
            raise UserError(f"pretrained {tag!r} is not an open_clip tag of {model_name}; valid tags: {tags}")
        repo_id, filename = os.path.split(tag_cfg.get("hf_hub", ""))
        filename = filename or "open_clip_pytorch_model.bin"
        # open_clip prefers the safetensors twin of its default file when the hub has one.
        names = OPEN_CLIP_FILES if filename == "open_clip_pytorch_model.bin" else (filename,)
        return WeightsHint(what=f"CLIP weights {model_name}/{tag}", repo_id=repo_id, filenames=names,
                           shown_file=filename)

    @classmethod
    def generic_config(cls, spec: str) -> dict:
        """``--model open_clip:<arch>:<tag>``."""
        arch, sep, tag = spec.partition(":")
        if not sep or not arch or not tag:
            raise UserError(f"--model open_clip:{spec}: expected open_clip:<architecture>:<pretrained tag>, e.g. "
                            "open_clip:ViT-B-32:laion2b_s34b_b79k")
        config = {"model_name": arch, "pretrained": tag, "force_quick_gelu": False}
        cls.weights_hint(config)      # names an unknown architecture or tag
        return config

    @classmethod
    def _bad_file(cls, config: dict, weights_file: str, error: Exception) -> UserError:
        tag = config.get("pretrained") or _hub_repo(config)
        hint = cls.weights_hint(config) if tag else None
        model = config["model_name"]
        wanted = f"{hint.shown_file} of {hint.repo_id}" if hint else f"an open_clip {model} checkpoint"
        return UserError(f"--weights {weights_file}: not an open_clip {model} checkpoint "
                         f"({str(error).splitlines()[0][:160]}); pass {wanted}")

    @classmethod
    def build(cls, config: dict, weights_file: str | None, seed: int) -> Built:
        if _hub_repo(config) is not None:
            return cls._build_hub(config, weights_file, seed)
        import open_clip

        model_name = cls.architecture(config)
        tag = config.get("pretrained")

        def create() -> tuple[nn.Module, Callable]:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=None if weights_file is None else str(weights_file),
                force_quick_gelu=bool(config.get("force_quick_gelu", False)), **{
                    f"image_{key}": value for key, value in cls._preprocess_kwargs(config).items()})
            return model, preprocess

        if weights_file is None:
            model, preprocess = seeded_init(seed, create)
            weights_id = f"random-init-seed-{seed}"
        else:
            load_state_dict(Path(weights_file))   # read safely first: an unreadable file is named here
            try:
                # open_clip initialises before loading: keep that draw off the caller's RNG.
                with torch.random.fork_rng(devices=[]):
                    model, preprocess = create()
            except Exception as error:  # noqa: BLE001 - a bad file fails in many ways inside open_clip
                raise cls._bad_file(config, weights_file, error) from None
            weights_id = f"{model_name}/{tag}|" + file_identity(weights_file)
        text = None
        if config.get("zero_shot"):
            # zero-shot keeps the text tower (encode_text shares nothing with the visual tower)
            text = TextEncoder(encode=model.encode_text, tokenizer=open_clip.get_tokenizer(model_name),
                               logit_scale=float(model.logit_scale.exp()), module=model)
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            model.eval()
        description = f"open_clip {model_name} " + ("random init" if weights_file is None else str(tag or weights_file))
        return Built(model=model.visual, preprocess=preprocess, weights_id=weights_id, description=description,
                     text=text)

    @classmethod
    def _build_hub(cls, config: dict, weights_file: str | None, seed: int) -> Built:
        """A hub model's image tower from its published config; the checkpoint's ``visual.*`` part."""
        repo = _hub_repo(config)
        if config.get("zero_shot"):
            _check_text_tower(config)        # before anything slow
        if weights_file is None:
            tower = cls.create(config, seed)
            weights_id = f"random-init-seed-{seed}"
        else:
            state = load_state_dict(Path(weights_file))
            visual = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
            try:
                tower = load_into_new(lambda: cls.create(config, seed), lambda template: visual,
                                      lambda: cls.create(config, seed))
            except RuntimeError as error:
                raise cls._bad_file(config, weights_file, error) from None
            weights_id = f"{repo}|" + file_identity(weights_file)
        text = _hub_text_encoder(config, weights_file) if config.get("zero_shot") else None
        description = f"open_clip {repo} image tower " + ("random init" if weights_file is None else str(weights_file))
        return Built(model=tower, preprocess=cls.preprocess(config), weights_id=weights_id,
                     description=description, text=text)

    # ---------------------------------------------------------------- a built model's parts
    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.grid_size)

    @property
    def width(self) -> int:
        return int(self.model.transformer.width)

    @property
    def input_size(self) -> int:
        return int(self.model.image_size[0])

    @property
    def final_norm(self) -> nn.Module:
        return self.model.ln_post

    @property
    def activation(self) -> str:
        return type(self.blocks[0].mlp.gelu).__name__

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        projection = self.model.proj
        return tokens if projection is None else tokens @ projection

    # ---------------------------------------------------------------- hook attachment
    def attach_registers(self, num_registers, on_tokens):
        return [self.model.ln_pre.register_forward_pre_hook(appending_pre_hook(num_registers, on_tokens))]

    def attach_qk(self, layer: int, store: QKStore):
        attention = self.blocks[layer].attn  # nn.MultiheadAttention, batch_first, self-attention on ln_1(x)

        def pre_hook(module, args, kwargs):
            tokens = args[0] if args else kwargs["query"]
            width = attention.embed_dim
            weight, bias = attention.in_proj_weight, attention.in_proj_bias
            q = nn.functional.linear(tokens, weight[:width], None if bias is None else bias[:width])
            k = nn.functional.linear(tokens, weight[width:2 * width], None if bias is None else bias[width:2 * width])
            store(split_heads(q, attention.num_heads), split_heads(k, attention.num_heads))

        return attention.register_forward_pre_hook(pre_hook, with_kwargs=True)


class ClipTimmTowerAdapter(TimmViTAdapter):
    """open_clip's ``TimmModel`` (a timm trunk and a projection head): the trunk's parts are the
    timm adapter's; the pooled feature is the head of the trunk's pooled output."""

    name = "clip"
    title = "CLIP"

    @property
    def tower(self) -> nn.Module:
        return self.model.trunk

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.tower.fc_norm(tokens))


def _check_text_tower(config: dict) -> None:
    """A UserError naming the optional extra when the text tower needs ``transformers`` and it is missing."""
    import importlib.util

    text_cfg = config["open_clip_config"]["model_cfg"].get("text_cfg", {})
    if text_cfg.get("hf_model_name") and importlib.util.find_spec("transformers") is None:
        raise UserError(f"--zero_shot with {config['model_name']} needs its text tower ({text_cfg['hf_model_name']}), "
                        f"which needs the optional package transformers: {ZERO_SHOT_EXTRA}")


def _hub_text_encoder(config: dict, weights_file: str | None) -> TextEncoder:
    """The text tower of a hub model for zero-shot, through open_clip's own factory on a folder that
    holds the published config and the checkpoint (needs ``transformers`` for a Hugging Face text
    tower, and its tokenizer from the hub or its cache)."""
    import open_clip

    _check_text_tower(config)
    if weights_file is None:
        raise UserError("--zero_shot needs the model's weights (its text tower is not built at random)")
    with tempfile.TemporaryDirectory(prefix="ttr-open-clip-") as folder:
        (Path(folder) / "open_clip_config.json").write_text(json.dumps(config["open_clip_config"]))
        name = OPEN_CLIP_FILES[0] if str(weights_file).endswith(".safetensors") else OPEN_CLIP_FILES[1]
        os.symlink(os.path.abspath(weights_file), Path(folder) / name)
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval().requires_grad_(False)
    return TextEncoder(encode=model.encode_text, tokenizer=tokenizer, logit_scale=float(model.logit_scale.exp()),
                       module=model)
