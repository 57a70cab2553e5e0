"""What a ``--model`` name stands for (docs/models.md): a preset, or any timm / open_clip ViT by name.

Presets are data, families are code.  A preset is an entry of ``configs.PRESETS``: a config dict
(the keys its family reads, which also say where its weights come from, and the detection
settings with their reasons) and the family (:data:`common.models.families.FAMILIES`) that builds
it.  Besides the presets::

    --model timm:<name>                    e.g. timm:vit_base_patch16_224.augreg2_in21k_ft_in1k
    --model open_clip:<arch>:<tag>         e.g. open_clip:ViT-B-32:laion2b_s34b_b79k

take their model keys from the name and the rest from the family's defaults
(``generic_defaults``: the detect layer, ``top_k`` and the share of the depth ``highest_layer``
keeps, as for the seed model of that library), with ``register_norm_threshold`` ``auto``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import configs
from common.errors import UserError
from common.models.families import FAMILIES, FamilyAdapter, get_family
from common.models.family import depth_share_layer
from common.models.weights import cached_hub_file, hub_endpoint

# --model <prefix>:<spec> -> the family that takes any model of its library by name
GENERIC_PREFIXES = {"timm": "timm", "open_clip": "clip"}
GENERIC_FORMS = ("timm:<name>", "open_clip:<arch>:<tag>")


@dataclass(frozen=True)
class ModelChoice:
    """A ``--model`` name resolved: its family and its config dict (a copy, safe to change)."""

    name: str
    family: str
    config: dict

    @property
    def preset(self) -> bool:
        return self.name in configs.PRESETS


def preset_names() -> tuple[str, ...]:
    return tuple(configs.PRESETS)


def unknown_model(name: str) -> UserError:
    return UserError(f"--model {name!r}: unknown model; choose from the presets ({', '.join(preset_names())}), "
                     f"{' or '.join(GENERIC_FORMS)}")


def family_of(name: str) -> str:
    """The family of a ``--model`` name (a family's own name stands for itself: ``load_backbone("timm",
    config)``)."""
    if name in configs.PRESETS:
        return configs.PRESETS[name][0]
    prefix, sep, spec = name.partition(":")
    if sep and prefix in GENERIC_PREFIXES and spec:
        return GENERIC_PREFIXES[prefix]
    if name in FAMILIES:
        return name
    raise unknown_model(name)


def family_class(name: str) -> type[FamilyAdapter]:
    """The adapter class of a ``--model`` name's family."""
    return get_family(family_of(name))


def resolve_model(name: str) -> ModelChoice:
    """A preset's family and dict, or a ``timm:`` / ``open_clip:`` model with its family's defaults;
    a UserError naming the valid forms otherwise."""
    if name in configs.PRESETS:
        family, config = configs.PRESETS[name]
        return ModelChoice(name, family, copy.deepcopy(config))
    prefix, sep, spec = name.partition(":")
    if not (sep and prefix in GENERIC_PREFIXES and spec):
        raise unknown_model(name)
    family = get_family(GENERIC_PREFIXES[prefix])
    return ModelChoice(name, family.name, generic_config(family, family.generic_config(spec)))


def generic_config(family: type[FamilyAdapter], model_keys: dict) -> dict:
    """The config dict of a model known only by name: its model keys, the family's detection
    defaults (``highest_layer`` from its depth), the threshold chosen from the norms (``auto``)."""
    defaults = family.generic_defaults
    depth = family.identity(model_keys).layers
    return {**model_keys, "device": "auto", "detect_outliers_layer": defaults["detect_outliers_layer"],
            "register_norm_threshold": "auto", "highest_layer": depth_share_layer(depth, defaults["depth_share"]),
            "top_k": defaults["top_k"], **copy.deepcopy(configs.COMMON_DEFAULTS)}


def model_slug(name: str) -> str:
    """``name`` as a file-name part (``timm:vit_b`` -> ``timm-vit_b``)."""
    return name.replace(":", "-").replace("/", "-")


def weights_source(family: type[FamilyAdapter], config: dict) -> dict:
    """Where the configured weights would come from, without loading or downloading anything."""
    try:
        hint = family.weights_hint(config)
    except UserError as error:
        return {"hub": None, "note": str(error), "pass": "--weights PATH"}
    cached = family.cached_weights(config) or cached_hub_file(hint.repo_id, hint.filenames)
    source = {"hub": f"{hub_endpoint()}/{hint.repo_id}", "file": hint.shown_file or hint.filenames[-1],
              "gated": hint.gated, "cached": cached, "pass": "--weights PATH"}
    if hint.alternative:
        source["alternative"] = hint.alternative
    return source


def describe(name: str, config: dict) -> dict:
    """The identity of ``--model name`` with ``config`` as JSON-ready data (``--describe``): built on
    the meta device, no weights read."""
    family = family_class(name)
    identity = family.identity(config)
    shape = {key: value for key, value in identity.as_dict().items() if key != "weights"}
    return {"model": name, **shape, "weights_name": identity.weights, "feature": config.get("feature"),
            "weights": weights_source(family, config)}
