"""The resolved config of a run: model dict + run defaults + ``--set KEY=VALUE`` overrides.

Every value is checked here, so a typo stops the run at once with a line that names the key
and the valid choices, instead of an hour later.
"""

from __future__ import annotations

import ast
import copy
import math
from typing import Any

import configs
from common.errors import UserError

NUMBER_OR_AUTO_KEYS = {"register_norm_threshold"}


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text.strip()


def _coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default``, or a UserError naming the key."""
    if key in NUMBER_OR_AUTO_KEYS:
        if value == "auto":
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return value
        raise UserError(f"--set {key}={value!r}: expected a positive number or 'auto'")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise UserError(f"--set {key}={value!r}: expected true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"--set {key}={value!r}: expected an integer")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"--set {key}={value!r}: expected a number")
    if isinstance(default, tuple):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = (value,)
        if isinstance(value, (list, tuple)) and value:
            return tuple(value)
        raise UserError(f"--set {key}={value!r}: expected a list such as (1, 2, 3)")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        return str(value)
    return value


def base_config(model: str) -> dict:
    """Copy of the model dict merged with the run defaults."""
    if model not in configs.MODEL_CONFIGS:
        raise UserError(f"unknown model {model!r}: use one of {', '.join(configs.MODEL_CONFIGS)}")
    config = copy.deepcopy(configs.RUN_DEFAULTS)
    config.update(copy.deepcopy(configs.MODEL_CONFIGS[model]))
    return config


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply ``KEY=VALUE`` strings; an unknown key is an error listing the valid ones."""
    config = dict(config)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set top_k=30")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in config:
            raise UserError(
                f"--set {key}: unknown config key; valid keys: {', '.join(sorted(config))}"
            )
        config[key] = _coerce(key, _parse_value(raw), config[key])
    return config


def validate(config: dict, model: str) -> dict:
    """Check values whose meaning goes beyond their type."""
    from common.backbones import DINOV2_ARCHS
    from common.features import FEATURES
    from common.intervention import NORMAL_VALUES

    if config["normal_values"] not in NORMAL_VALUES:
        raise UserError(f"normal_values {config['normal_values']!r}: use one of {', '.join(NORMAL_VALUES)}")
    if config["feature"] not in FEATURES:
        raise UserError(f"feature {config['feature']!r}: use one of {', '.join(FEATURES)}")
    if config["num_registers"] < 1:
        raise UserError(f"num_registers={config['num_registers']}: ttr needs at least 1 register")
    if config["top_k"] < 1:
        raise UserError(f"top_k={config['top_k']}: it must be at least 1")
    if config["batch_size"] < 1:
        raise UserError(f"batch_size={config['batch_size']}: it must be at least 1")
    if config["num_workers"] < 0:
        raise UserError(f"num_workers={config['num_workers']}: it must be 0 or more")
    if config["detect_images"] < 1:
        raise UserError(f"detect_images={config['detect_images']}: it must be at least 1")
    if not 0 < config["val_fraction"] < 1 or not 0 < config["test_fraction"] < 1 or \
            config["val_fraction"] + config["test_fraction"] >= 1:
        raise UserError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
    if model == "dinov2" and config["backbone_size"] not in DINOV2_ARCHS:
        raise UserError(
            f"backbone_size {config['backbone_size']!r}: use one of {', '.join(DINOV2_ARCHS)}")
    return config
