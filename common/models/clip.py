"""CLIP: open_clip's ``VisionTransformer`` (``model.visual``) with open_clip's own preprocess.

The image feature is ``encode_image(normalize=False)``: the final-norm (``ln_post``) CLS token
times ``proj``.  The checkpoint's activation is used (GELU for ``laion2b_s34b_b88k``) unless
``force_quick_gelu`` asks for the reference repository's QuickGELU.

Hook attachment:

* registers: a forward pre-hook on ``ln_pre`` (after the position embedding, docs/models.md);
* q/k: a pre-hook on ``attn`` (``nn.MultiheadAttention``, called by open_clip with
  ``need_weights=False``): q and k are recomputed from ``in_proj_weight`` on the side.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from common.errors import UserError
from common.models.family import (
    BlockParts, Built, FamilyAdapter, ModelIdentity, PlantingGains, QKStore, TextEncoder,
    appending_pre_hook, seeded_init, split_heads
)
from common.models.weights import WeightsHint, file_identity, load_state_dict


def _check_model_name(model_name: str) -> None:
    import open_clip

    if model_name not in open_clip.list_models():
        raise UserError(f"model_name {model_name!r} is not an open_clip model; try ViT-B-16")


class ClipAdapter(FamilyAdapter):
    name = "clip"
    title = "CLIP"
    planting = PlantingGains(filter=12.0, energy=3.0, energy_write=1.0, gate=6.0)
    block_parts = BlockParts(mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", attn_out="attn.out_proj")
    supports_zero_shot = True
    # The fixture's text tower: small, but with CLIP's own tokenizer and vocabulary.
    SMALL_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}

    # ---------------------------------------------------------------- a configured model
    @classmethod
    def architecture(cls, config: dict) -> str:
        _check_model_name(config["model_name"])
        return config["model_name"]

    @classmethod
    def identity(cls, config: dict) -> ModelIdentity:
        import open_clip

        vision = open_clip.get_model_config(cls.architecture(config))["vision_cfg"]
        width = int(vision["width"])
        return ModelIdentity(cls.name, config["model_name"], int(vision["layers"]),
                             int(width * float(vision.get("mlp_ratio", 4.0))), cls.weights_name(config))

    @classmethod
    def weights_name(cls, config: dict) -> str:
        return str(config.get("pretrained") or "")

    @classmethod
    def weights_hint(cls, config: dict) -> WeightsHint:
        import open_clip

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
        names = (("open_clip_model.safetensors", filename) if filename == "open_clip_pytorch_model.bin"
                 else (filename,))
        return WeightsHint(what=f"CLIP weights {model_name}/{tag}", repo_id=repo_id, filenames=names,
                           shown_file=filename)

    @classmethod
    def _preprocess_kwargs(cls, config: dict) -> dict[str, Any]:
        import open_clip

        tag = config.get("pretrained")
        kwargs: dict[str, Any] = {}
        tag_cfg = (open_clip.get_pretrained_cfg(config["model_name"], tag) or {}) if tag else {}
        for src, dst in (("mean", "image_mean"), ("std", "image_std"),
                         ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
            if src in tag_cfg:
                kwargs[dst] = tag_cfg[src]
        return kwargs

    @classmethod
    def build(cls, config: dict, weights_file: str | None, seed: int) -> Built:
        import open_clip

        model_name = cls.architecture(config)
        tag = config.get("pretrained")

        def create() -> tuple[nn.Module, Callable]:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=None if weights_file is None else str(weights_file),
                force_quick_gelu=bool(config.get("force_quick_gelu", False)), **cls._preprocess_kwargs(config))
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
                hint = cls.weights_hint(config) if tag else None
                wanted = f"{hint.shown_file} of {hint.repo_id}" if hint else f"an open_clip {model_name} checkpoint"
                raise UserError(f"--weights {weights_file}: not an open_clip {model_name} checkpoint "
                                f"({str(error).splitlines()[0][:160]}); pass {wanted}") from None
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
    def build_small(cls, seed: int, *, image_size: int, patch_size: int, width: int, depth: int,
                    heads: int, mlp_ratio: float) -> nn.Module:
        from open_clip.transformer import VisionTransformer

        return seeded_init(seed, lambda: VisionTransformer(
            image_size=image_size, patch_size=patch_size, width=width, layers=depth, heads=heads,
            mlp_ratio=mlp_ratio, output_dim=width // 2))

    @classmethod
    def small_preprocess(cls, image_size: int) -> Callable:
        from open_clip import image_transform

        return image_transform(image_size, is_train=False)

    @classmethod
    def small_text_encoder(cls, embed_dim: int, seed: int) -> TextEncoder:
        import open_clip
        from open_clip.transformer import TextTransformer

        tower = seeded_init(seed, lambda: TextTransformer(output_dim=embed_dim, **cls.SMALL_TEXT)).eval()
        for parameter in tower.parameters():
            parameter.requires_grad_(False)
        return TextEncoder(encode=tower, tokenizer=open_clip.get_tokenizer("ViT-B-16"), logit_scale=100.0, module=tower)

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

    # ---------------------------------------------------------------- fixture planting
    def patch_embedding(self):
        return self.model.conv1.weight, None

    def position_embedding(self) -> tuple[torch.Tensor, int]:
        return self.model.positional_embedding, 1

    def cls_embedding(self) -> torch.Tensor:
        return self.model.class_embedding

    def qkv_projection(self, layer: int):
        attention = self.blocks[layer].attn
        return attention.in_proj_weight, attention.in_proj_bias
