"""timm's ``VisionTransformer``: the generic family behind ``--model timm:<name>`` and the timm
presets (UNI, Virchow2, RAD-DINO), and the base of the DINOv2 and DINOv3 adapters.

Everything comes from the model itself: the token layout (``num_prefix_tokens``: a class token or
not, ``reg_tokens`` trained registers, with or without position embeddings of their own:
``no_embed_class``), LayerScale, ``dynamic_img_size``, and the MLP, whose *neurons* are the input of
``fc2`` - the activation output for timm's ``Mlp``, the gated product ``act(gate) * value`` for
``GluMlp`` / ``SwiGLUPacked`` / ``SwiGLU``.

Config keys (docs/models.md): ``model_name`` (a timm architecture, optionally with its pretrained
tag), ``pretrained`` (``hf-hub:<repo>`` for a model released on the hub outside timm's registry,
else ``""``: timm's own release of the tag), ``model_args`` (``timm.create_model`` keyword arguments,
as the hub's config.json has them; ``mlp_layer`` by its ``timm.layers`` name), ``preprocess``
(``resize``, ``crop``, ``interpolation``, ``mean``, ``std``; absent: timm's data config for the tag),
and for messages ``weights_file`` (the file to fetch) and ``gated``.

The pooled feature is the model's own pooled output.  A model published without pooling
(``global_pool=""``, e.g. Virchow2, whose forward returns every token) is built with token pooling
(average pooling without a class token), so that the feature is the final-norm CLS token.

Checkpoints: a timm state dict, anything timm's own ``checkpoint_filter_fn`` converts (Meta's
DINOv2 layout, OpenAI CLIP, big_vision, ...) and Hugging Face's ``Dinov2Model`` layout
(:mod:`common.models.hf_dinov2`).

Hook attachment:

* registers: a forward hook on ``patch_drop`` (right after ``_pos_embed``);
* pooling: a model pooled by averaging gets a forward hook on ``norm`` that leaves the test-time
  registers out of the average (the final-norm hook point still sees them);
* q/k: a forward hook on ``attn.qkv``: q and k are taken from its output through
  ``q_norm``/``k_norm`` (no recomputation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from common.errors import UserError
from common.models.family import (
    BlockParts, Built, FamilyAdapter, QKStore, SmallDims, eval_preprocess, seeded_init, with_registers
)
from common.models.weights import WeightsHint, file_identity, load_state_dict

HUB_PREFIX = "hf-hub:"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
AVERAGE_POOLS = ("avg", "avgmax", "max")


def _timm_args(config: dict) -> dict[str, Any]:
    """``model_args`` with ``mlp_layer`` names resolved to ``timm.layers`` classes."""
    import timm.layers

    args = dict(config.get("model_args") or {})
    layer = args.get("mlp_layer")
    if isinstance(layer, str):
        found = getattr(timm.layers, layer, None)
        if not callable(found):
            raise UserError(f"model_args mlp_layer={layer!r} is not a timm.layers MLP; e.g. Mlp, SwiGLUPacked, SwiGLU")
        args["mlp_layer"] = found
    return args


def pooled_by_default(model: nn.Module) -> None:
    """A model built without pooling pools its class token (its patch average without one)."""
    if getattr(model, "global_pool", None) == "" and getattr(model, "attn_pool", None) is None:
        model.reset_classifier(0, global_pool="token" if model.cls_token is not None else "avg")


def load_into_new(build: Callable[[], nn.Module], convert: Callable[[nn.Module], dict],
                  initialised: Callable[[], nn.Module]) -> nn.Module:
    """A model whose every tensor comes from a checkpoint: built on the meta device (no random
    initialisation to pay for, no RNG drawn) and filled strictly from ``convert(template)``; a model
    with tensors the checkpoint does not hold (non-persistent buffers) is ``initialised()`` first."""
    with torch.device("meta"):
        model = build()
    state = convert(model)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = initialised()
        model.load_state_dict(state, strict=True)
    return model


def glu_activation(mlp: nn.Module) -> str:
    """``Mlp`` -> its activation (``GELU``); a gated MLP -> ``GluMlp(SiLU)``, ``SwiGLU(SiLU)``."""
    act = type(mlp.act).__name__
    return f"{type(mlp).__name__}({act})" if type(mlp).__name__ in ("GluMlp", "SwiGLU") else act


class TimmViTAdapter(FamilyAdapter):
    name = "timm"
    title = "timm ViT"
    # fc2's input is the activation output, or a gated MLP's gated product: the neurons.
    block_parts = BlockParts(mlp_out="mlp.fc2", attn_out="attn.proj")
    building_keys = ("model_name", "pretrained", "model_args", "preprocess")
    # --model timm:<name>: detection settings of DINOv2 ViT-L (the seeds): detect at the second
    # last layer, keep the first 5/6 of the depth (19 of 24), top 50.
    generic_defaults: ClassVar[dict] = {"detect_outliers_layer": -2, "depth_share": 5 / 6, "top_k": 50}

    # ---------------------------------------------------------------- a configured model
    @classmethod
    def architecture(cls, config: dict) -> str:
        import timm

        name = str(config.get("model_name") or "")
        if not timm.is_model(name.split(".")[0]):
            raise UserError(f"model_name {name!r} is not a timm model; e.g. vit_base_patch16_224 "
                            "(timm.list_models('vit_*') lists them)")
        return name

    @classmethod
    def _create(cls, config: dict, **overrides) -> nn.Module:
        import timm

        model = timm.create_model(cls.architecture(config), pretrained=False, num_classes=0,
                                  **{**_timm_args(config), **overrides})
        pooled_by_default(model)
        return model

    @classmethod
    def _small_overrides(cls, config: dict, dims: SmallDims) -> dict[str, Any]:
        with torch.device("meta"):
            structure = cls._create(config)
        overrides: dict[str, Any] = dict(img_size=dims.image_size, patch_size=dims.patch_size, embed_dim=dims.width,
                                         depth=dims.depth, num_heads=dims.heads, mlp_ratio=dims.mlp_ratio)
        if not isinstance(getattr(structure.blocks[0], "ls1", nn.Identity()), nn.Identity):
            overrides["init_values"] = 1.0     # live layer scale: the planted circuit must reach the stream
        if dims.trained_registers is not None:
            overrides["reg_tokens"] = dims.trained_registers
        return overrides

    @classmethod
    def create(cls, config: dict, seed: int, dims: SmallDims | None = None) -> nn.Module:
        overrides = cls._small_overrides(config, dims) if dims is not None else {}
        return seeded_init(seed, lambda: cls._create(config, **overrides))

    @classmethod
    def preprocess(cls, config: dict, image_size: int | None = None) -> Callable:
        spec = dict(config.get("preprocess") or cls._timm_preprocess(config))
        if image_size is not None:
            spec["resize"] = spec["crop"] = image_size
        return eval_preprocess(int(spec["resize"]), int(spec["crop"]), mean=spec["mean"], std=spec["std"],
                               interpolation=spec.get("interpolation", "bicubic"))

    @classmethod
    def _timm_preprocess(cls, config: dict) -> dict[str, Any]:
        """timm's evaluation transform of the tag: resize to crop / crop_pct, centre crop."""
        import timm

        cfg = timm.models.get_pretrained_cfg(cls.architecture(config))
        crop = int((config.get("model_args") or {}).get("img_size") or cfg.input_size[-1])
        crop_pct = float(cfg.crop_pct or 1.0)
        return {"resize": int(crop / crop_pct), "crop": crop, "interpolation": cfg.interpolation or "bicubic",
                "mean": tuple(cfg.mean), "std": tuple(cfg.std)}

    @classmethod
    def weights_name(cls, config: dict) -> str:
        pretrained = str(config.get("pretrained") or "")
        if pretrained:
            return pretrained
        import timm

        name = cls.architecture(config)
        cfg = timm.models.get_pretrained_cfg(name)
        return name if "." in name or cfg is None or not cfg.tag else f"{name}.{cfg.tag}"

    @classmethod
    def weights_hint(cls, config: dict) -> WeightsHint:
        pretrained = str(config.get("pretrained") or "")
        shown = config.get("weights_file") or ""
        if pretrained.startswith(HUB_PREFIX):
            repo = pretrained[len(HUB_PREFIX):]
        elif pretrained:
            raise UserError(f"pretrained {pretrained!r}: use hf-hub:<repo>, or leave it empty for timm's own "
                            "release of model_name's tag")
        else:
            import timm

            cfg = timm.models.get_pretrained_cfg(cls.weights_name(config))
            repo = (cfg.hf_hub_id or "") if cfg is not None else ""
            if not repo:
                raise UserError(f"timm has no hub release of {cls.weights_name(config)}; pass --weights PATH "
                                "(a timm checkpoint of it)")
        names = tuple(dict.fromkeys(n for n in (shown, *HUB_FILES) if n))
        return WeightsHint(what=f"{repo} weights", repo_id=repo, filenames=names,
                           shown_file=shown or "model.safetensors", gated=bool(config.get("gated")))

    @classmethod
    def convert(cls, state: dict[str, torch.Tensor], model: nn.Module, config: dict) -> dict[str, torch.Tensor]:
        """A checkpoint in any layout this family reads -> ``model``'s own keys."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        from common.models.hf_dinov2 import is_hf_dinov2, to_timm

        if is_hf_dinov2(state):
            state = to_timm(state)
        return checkpoint_filter_fn(dict(state), model)

    @classmethod
    def build(cls, config: dict, weights_file: str | None, seed: int) -> Built:
        arch = cls.architecture(config)
        if weights_file is None:
            model = cls.create(config, seed)
            weights_id = f"random-init-seed-{seed}"
        else:
            state = load_state_dict(Path(weights_file))
            try:
                model = load_into_new(lambda: cls._create(config),
                                      lambda template: cls.convert(state, template, config),
                                      lambda: cls.create(config, seed))
            except (RuntimeError, KeyError, ValueError, IndexError, AssertionError) as error:
                hint = cls.weights_hint(config)
                raise UserError(f"--weights {weights_file}: not a checkpoint of {arch} "
                                f"({str(error).splitlines()[0][:160]}); pass {hint.shown_file} of {hint.repo_id}"
                                + (f" or {hint.alternative}" if hint.alternative else "")) from None
            weights_id = f"{arch}|" + file_identity(weights_file)
        description = f"timm {arch} " + ("random init" if weights_file is None else str(weights_file))
        return Built(model=model, preprocess=cls.preprocess(config), weights_id=weights_id, description=description)

    @classmethod
    def generic_config(cls, spec: str) -> dict:
        """``--model timm:<name>``: timm's own release of ``name`` (a tag picks another)."""
        config = {"model_name": spec, "pretrained": "", "model_args": {}}
        cls.architecture(config)
        return config

    # ---------------------------------------------------------------- a built model's parts
    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.tower.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.tower.num_prefix_tokens)

    @property
    def has_cls(self) -> bool:
        return self.tower.cls_token is not None

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.tower.patch_embed.grid_size)

    @property
    def width(self) -> int:
        return int(self.tower.embed_dim)

    @property
    def input_size(self) -> int:
        return int(self.tower.patch_embed.img_size[0])

    @property
    def patch_size(self) -> int:
        return int(self.tower.patch_embed.patch_size[0])

    @property
    def final_norm(self) -> nn.Module:
        return self.tower.norm

    @property
    def activation(self) -> str:
        return glu_activation(self.blocks[0].mlp)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        # fc_norm is the norm after average pooling (an Identity for class-token models)
        return self.tower.fc_norm(tokens)

    # ---------------------------------------------------------------- hook attachment
    def attach_registers(self, num_registers, on_tokens):
        return [self.tower.patch_drop.register_forward_hook(
            lambda module, args, output: with_registers(output, num_registers, on_tokens))]

    def attach_pooling_guard(self, num_registers: int):
        tower = self.tower
        if num_registers == 0 or getattr(tower, "attn_pool", None) is not None \
                or tower.global_pool not in AVERAGE_POOLS:
            return []
        return [tower.norm.register_forward_hook(lambda module, args, output: output[:, :-num_registers])]

    def attach_qk(self, layer: int, store: QKStore):
        attention = self.blocks[layer].attn  # timm Attention

        def hook(module, args, output):
            batch, tokens, _ = output.shape
            qkv = output.reshape(batch, tokens, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
            store(attention.q_norm(qkv[0]), attention.k_norm(qkv[1]))

        return attention.qkv.register_forward_hook(hook)
