"""The resolved config of a run: model dict + run defaults + ``--set KEY=VALUE`` overrides.

Every value is checked here before any model work, so a typo stops the run at once with a line
that names the key, its value and the valid choices or range, instead of an hour later:
:func:`validate` checks types and choices, :func:`validate_for_model` the layer indices against
the configured model's depth (known without loading weights).
"""

from __future__ import annotations

import ast
import copy
import math
import os
from typing import Any

import configs
from common.errors import UserError
from common.models.backbone import PRECISIONS
from common.models.families import ModelIdentity, get_family
from common.registers.features import FEATURES
from common.registers.intervention import INTERVENTION_MAX, NORMAL_VALUES
from common.registers.modes import EXTRA_MODES

# Keys that take a positive number or the word "auto".
NUMBER_OR_AUTO_KEYS = {"register_norm_threshold"}
# Keys that take a non-negative integer or the word "auto".
COUNT_OR_AUTO_KEYS = {"num_workers"}
# Keys that take one of a few words: the lists their own modules define.
CHOICES = {
    "normal_values": NORMAL_VALUES,
    "feature": FEATURES,
    "intervention_max": INTERVENTION_MAX,
    "precision": PRECISIONS,
}


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
    if key in COUNT_OR_AUTO_KEYS:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise UserError(f"--set {key}={value!r}: expected an integer >= 0 or 'auto'")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise UserError(f"--set {key}={value!r}: expected true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"--set {key}={value!r}: expected an integer")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise UserError(f"--set {key}={value!r}: expected a finite number")
    if isinstance(default, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = (value,)
        if isinstance(value, (list, tuple)) and (value or key == "extra_modes"):
            return tuple(value)
        raise UserError(f"--set {key}={value!r}: expected a list such as (1, 2, 3)")
    if isinstance(default, str):
        return value if isinstance(value, str) else str(value)
    return value


def base_config(model: str | None) -> dict:
    """Copy of the model dict merged with the run defaults (the run defaults alone without a model)."""
    config = copy.deepcopy(configs.RUN_DEFAULTS)
    if model is None:
        return config
    if model not in configs.MODEL_CONFIGS:
        raise UserError(f"unknown model {model!r}: use one of {', '.join(configs.MODEL_CONFIGS)}")
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
            model_keys = sorted(set().union(*configs.MODEL_CONFIGS.values()) - set(config))
            hint = (f" ({key} belongs to a model's config: pass --model)" if key in model_keys else "")
            raise UserError(f"--set {key}: unknown config key{hint}; valid keys: {', '.join(sorted(config))}")
        config[key] = _coerce(key, _parse_value(raw), config[key])
    return config


def _at_least(config: dict, key: str, low: int) -> None:
    if config[key] < low:
        raise UserError(f"{key}={config[key]}: it must be at least {low}")


def validate(config: dict, model: str | None) -> dict:
    """Check values whose meaning goes beyond their type (no model needed)."""
    for key, choices in CHOICES.items():
        if key in config and config[key] not in choices:
            raise UserError(f"{key}={config[key]!r}: use one of {', '.join(choices)}")
    seed = config["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
        raise UserError(f"seed={seed!r} (--seed): use an integer from 0 to {2 ** 32 - 1}")
    workers = config["num_workers"]
    if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise UserError(f"num_workers={workers!r}: use an integer >= 0 (0 decodes in the main process) or auto")
    for key, low in (("batch_size", 1), ("detect_images", 1), ("probe_max_epochs", 1), ("probe_patience", 1),
                     ("bootstrap_resamples", 1), ("figure_images", 0), ("analysis_images", 0)):
        if key in config:
            _at_least(config, key, low)
    if not 0 < config["val_fraction"] < 1 or not 0 < config["test_fraction"] < 1 or \
            config["val_fraction"] + config["test_fraction"] >= 1:
        raise UserError(f"val_fraction={config['val_fraction']} and test_fraction={config['test_fraction']}: "
                        "each must be in (0, 1) and their sum below 1")
    unknown = [m for m in config["extra_modes"] if m not in EXTRA_MODES]
    if unknown:
        raise UserError(f"extra_modes={config['extra_modes']!r}: {unknown[0]!r} is not an extra mode; "
                        f"valid: {', '.join(EXTRA_MODES)}")
    for key in ("probe_lr_grid", "probe_weight_decay_grid"):
        values = config[key]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                   for v in values) or (key == "probe_lr_grid" and min(values) <= 0):
            raise UserError(f"{key}={values!r}: expected positive numbers (weight decay may be 0)")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in config["probe_seeds"]):
        raise UserError(f"probe_seeds={config['probe_seeds']!r}: expected integers, e.g. (0, 1, 2)")
    if model is None:
        return config
    _at_least(config, "num_registers", 1)
    _at_least(config, "top_k", 1)
    if not (math.isfinite(config["scale"])):
        raise UserError(f"scale={config['scale']}: expected a finite number")
    get_family(model).architecture(config)   # an unknown backbone_size / model_name is named here
    return config


def validate_for_model(config: dict, identity: ModelIdentity) -> None:
    """Layer indices against the configured model's depth: exit 2 naming the key, its value and
    the valid range (both ends)."""
    depth = identity.layers
    detect = config["detect_outliers_layer"]
    if not -depth <= detect <= depth - 1:
        raise UserError(f"detect_outliers_layer={detect} is outside this {depth}-layer model "
                        f"({identity.describe()}): use -{depth}..{depth - 1} (negative counts from the end)")
    highest = config["highest_layer"]
    if not 0 <= highest <= depth - 1:
        raise UserError(f"highest_layer={highest} is outside this {depth}-layer model ({identity.describe()}): "
                        f"use 0..{depth - 1}")
    most = depth * identity.mlp_width
    if config["top_k"] > most:
        raise UserError(f"top_k={config['top_k']} exceeds the {most} neurons of {identity.describe()}: "
                        f"use 1..{most}")


def resolve_workers(value: int | str, device_type: str) -> int:
    """Decoding threads: ``auto`` = the host's cores on the CPU (they share the cores with the
    model's own threads) and cores - 1 on CUDA (one core feeds the GPU)."""
    if value != "auto":
        return int(value)
    cores = os.cpu_count() or 1
    return max(0, cores - 1) if device_type == "cuda" else (cores if cores > 1 else 0)
