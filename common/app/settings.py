"""What a run is asked to do, in one place (docs/configuration.md).

* :class:`DatasetSpec`: what is particular to one dataset's entry script;
* :class:`RunOptions`: the command-line options besides the config dict;
* the config dict: the model's dict of ``configs.py`` merged with the run defaults, the demo's
  defaults, ``--set KEY=VALUE`` overrides and the dedicated flags (:func:`resolve_config`);
* :func:`parse_key_values`: the one ``KEY=VALUE`` parser (``--set``, and the study's ``--data``,
  ``--axes``, ``--weights``).

Every config value is typed and checked here, where it enters, before any model work: a typo
stops the run at once with a line that names the key, its value and the valid choices or range,
instead of an hour later.  :func:`validate` checks types, ranges and choices, and
:func:`validate_for_model` the layer indices against the configured model's depth (known
without loading weights).  The rest of the tool trusts the config it is handed.

The entry scripts import this module before argparse runs, so it stays free of torch: the lists
of valid words come from the modules that define them, imported when a config is checked
(:func:`choices`), and a usage error is answered at once.
"""

from __future__ import annotations

import ast
import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import configs
from common.errors import UserError
from common.registers.modes import EXTRA_MODES, inapplicable

if TYPE_CHECKING:
    from common.models.family import ModelIdentity


@dataclass(frozen=True)
class DatasetSpec:
    """What is particular to one dataset's entry script."""

    name: str                      # loader name: pacemaker | orthonet | aptos
    title: str                     # for humans
    qwk: bool = False              # APTOS: quadratic weighted kappa
    manufacturer: bool = False     # Pacemaker: manufacturer-level top-1


@dataclass
class RunOptions:
    """Everything a run needs besides the config dict (set from the command line)."""

    model: str
    image_path: str | None
    out: Path
    manifest: str | None = None
    weights: str | None = None
    neurons: str | None = None
    detect_path: str | None = None
    reference_probes: str | None = None
    no_cache: bool = False
    cache_dir: Path | None = None
    strict: bool = False
    demo: bool = False
    command_line: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# KEY=VALUE


@dataclass(frozen=True)
class KeyValue:
    """One ``KEY=VALUE`` item of a flag (``--set top_k=30``, ``--data aptos=DIR``)."""

    flag: str               # "--set"
    item: str               # as typed
    key: str                # before the first "=", surrounding blanks removed
    value: str | None       # after it, as typed; None without "="

    def error(self, problem: str) -> UserError:
        """One line naming the item: ``--data aptos=/x: no such folder /x; ...``."""
        return UserError(f"{self.flag} {self.item}: {problem}")


def parse_key_values(items: Sequence[str], flag: str, *, form: str | Callable[[str], str],
                     keys: Sequence[str] | None = None, noun: str = "key", unique: bool = False,
                     value: bool = True, blank: bool = False) -> list[KeyValue]:
    """Every item of ``flag`` split at its first ``=``, in the order given.

    One line naming the item and what is expected (``form``, or ``form(key)``) when the key is not
    one of ``keys`` (a ``noun``), is given twice (``unique``), the ``=VALUE`` is missing
    (``value``; a blank value too unless ``blank``) or present although ``value`` is False.
    """
    parsed: list[KeyValue] = []
    for item in items:
        key, sep, text = item.partition("=")
        pair = KeyValue(flag, item, key.strip(), text if sep else None)
        if keys is not None and pair.key not in keys:
            raise pair.error(f"unknown {noun} {pair.key!r}; valid: {', '.join(keys)}")
        if unique and any(p.key == pair.key for p in parsed):
            raise pair.error(f"{noun} {pair.key} is given twice")
        missing = not sep or (not blank and not text.strip())
        if missing if value else sep:
            raise pair.error(f"expected {form(pair.key) if callable(form) else form}")
        parsed.append(pair)
    return parsed


def parse_value(text: str) -> Any:
    """A ``--set`` value as Python: true/false, none/null, a literal such as ``(1, 2)``, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text.strip()


# --------------------------------------------------------------------------------------------
# the config dict

# Keys that take a positive number or the word "auto".
NUMBER_OR_AUTO_KEYS = ("register_norm_threshold",)
# Keys that take a non-negative integer or the word "auto".
COUNT_OR_AUTO_KEYS = ("num_workers",)
# Keys that take an integer of at least this much.
LOWEST = {"batch_size": 1, "detect_images": 1, "probe_max_epochs": 1, "probe_patience": 1,
          "bootstrap_resamples": 1, "permutations": 1, "probe_refits": 0, "figure_images": 0, "analysis_images": 0,
          "random_draws": 1}
# ... and these only with a model (the run defaults alone have none of them).
LOWEST_WITH_MODEL = {"num_registers": 1, "top_k": 1}


def choices() -> dict[str, tuple[str, ...]]:
    """Keys that take one of a few words: the lists their own modules define (imported here, on
    use, so that importing this module does not import torch)."""
    from common.models.backbone import PRECISIONS
    from common.registers.features import FEATURES
    from common.registers.intervention import INTERVENTION_MAX, NORMAL_VALUES

    return {"normal_values": NORMAL_VALUES, "feature": FEATURES, "intervention_max": INTERVENTION_MAX,
            "precision": PRECISIONS}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """A ``--set`` value converted to the type of the key's default, or a UserError naming the key
    (the "auto" keys and ranges are checked by :func:`validate`)."""
    if key in NUMBER_OR_AUTO_KEYS or key in COUNT_OR_AUTO_KEYS:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise UserError(f"--set {key}={value!r}: expected true or false")
    if isinstance(default, int):
        if _is_int(value):
            return value
        raise UserError(f"--set {key}={value!r}: expected an integer")
    if isinstance(default, float):
        if _is_number(value):
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
    """Copy of the model's config dict (a preset's, or a ``timm:`` / ``open_clip:`` model's from its
    family's defaults) merged with the run defaults (the run defaults alone without a model)."""
    config = copy.deepcopy(configs.RUN_DEFAULTS)
    if model is None:
        return config
    from common.models.presets import resolve_model

    config.update(resolve_model(model).config)
    return config


def set_keys(overrides: Sequence[str]) -> list[KeyValue]:
    """The ``--set`` items, split (one line naming an item without ``=``)."""
    return parse_key_values(overrides, "--set", form="KEY=VALUE, e.g. --set top_k=30", blank=True)


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Apply ``--set KEY=VALUE`` strings (a later one wins); an unknown key is an error listing the valid ones."""
    config = dict(config)
    for pair in set_keys(overrides):
        key = pair.key
        if key not in config:
            model_keys = sorted(set().union(*configs.MODEL_CONFIGS.values()) - set(config))
            with_model = "top_k" in config
            hint = ("" if key not in model_keys else " (a key of other models' config dicts)" if with_model
                    else f" ({key} belongs to a model's config: pass --model)")
            raise UserError(f"--set {key}: unknown config key{hint}; valid keys: {', '.join(sorted(config))}")
        config[key] = _coerce(key, parse_value(pair.value), config[key])
    return config


def resolve_config(model: str | None, overrides: Sequence[str] = (), flags: dict[str, Any] | None = None,
                   *, demo: bool = False) -> dict:
    """The checked config of a run: the model's dict (the run defaults alone without a model), the
    demo's defaults (``demo``), ``--set`` overrides, then the dedicated flags (``--seed 3`` is
    ``{"seed": 3}``; None: not given)."""
    config = base_config(model)
    if demo:
        from common.demo.demo import demo_defaults

        config.update(demo_defaults(model))
    config = apply_overrides(config, overrides)
    config.update({key: value for key, value in (flags or {}).items() if value is not None})
    return validate(config, model)


def validate(config: dict, model: str | None) -> dict:
    """Check types, ranges and choices (no model needed, except for the model's own names)."""
    for key, valid in choices().items():
        if key in config and config[key] not in valid:
            raise UserError(f"{key}={config[key]!r}: use one of {', '.join(valid)}")
    seed = config["seed"]
    if not _is_int(seed) or not 0 <= seed < 2 ** 32:
        raise UserError(f"seed={seed!r} (--seed): use an integer from 0 to {2 ** 32 - 1}")
    for key in NUMBER_OR_AUTO_KEYS:
        value = config.get(key, "auto")
        if value != "auto" and not (_is_number(value) and value > 0):
            raise UserError(f"{key}={value!r}: expected a positive number or 'auto'")
    workers = config["num_workers"]
    if workers != "auto" and not (_is_int(workers) and workers >= 0):
        raise UserError(f"num_workers={workers!r}: use an integer >= 0 (0 decodes in the main process) or auto")
    for key, low in (LOWEST | (LOWEST_WITH_MODEL if model is not None else {})).items():
        if not _is_int(config[key]):
            raise UserError(f"{key}={config[key]!r}: expected an integer")
        if config[key] < low:
            raise UserError(f"{key}={config[key]}: it must be at least {low}")
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
        if not all(_is_number(v) and v >= 0 for v in values) or (key == "probe_lr_grid" and min(values) <= 0):
            raise UserError(f"{key}={values!r}: expected positive numbers (weight decay may be 0)")
    primary = config["primary_metric"]
    if primary != "auto" and primary not in _metric_names():
        raise UserError(f"primary_metric={primary!r}: use auto (the dataset's, configs.PRIMARY_METRIC) or one of "
                        f"{', '.join(_metric_names())}")
    if not all(_is_int(s) for s in config["probe_seeds"]):
        raise UserError(f"probe_seeds={config['probe_seeds']!r}: expected integers, e.g. (0, 1, 2)")
    if model is None:
        return config
    if not _is_number(config["scale"]):
        raise UserError(f"scale={config['scale']}: expected a finite number")
    from common.models.presets import family_class

    family = family_class(model)
    family.architecture(config)   # an unknown backbone_size / model_name is named here
    if config["zero_shot"] and not family.supports_zero_shot:
        raise UserError(f"--zero_shot needs a backbone with a text tower (clip); {model} has none")
    return config


def _metric_names() -> tuple[str, ...]:
    from common.evaluation.metrics import METRIC_LABELS

    return tuple(METRIC_LABELS)


def resolve_primary_metric(config: dict, spec: DatasetSpec) -> str:
    """The primary metric of a run: ``primary_metric``, or for ``auto`` the dataset's entry of
    ``configs.PRIMARY_METRIC`` (top1 for a dataset without one); one line naming the key when the
    dataset does not report that metric (qwk is APTOS's, manufacturer_top1 Pacemaker's)."""
    primary = config["primary_metric"]
    if primary == "auto":
        primary = configs.PRIMARY_METRIC.get(spec.name, "top1")
    reported = {"qwk": spec.qwk, "manufacturer_top1": spec.manufacturer}
    if not reported.get(primary, True) or primary not in _metric_names():
        valid = [m for m in _metric_names() if reported.get(m, True)]
        raise UserError(f"primary_metric={primary!r}: {spec.title} does not report it; use one of {', '.join(valid)}")
    return primary


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
    bad = inapplicable(config["extra_modes"], identity.trained_registers)
    if bad:
        raise UserError(f"extra_modes: {bad[0]} applies to models with trained registers (DINOv2 _reg, DINOv3, "
                        f"Virchow2, a timm model with reg_tokens); {identity.describe()} has none: leave it out "
                        "(--controls turns on the controls that apply)")


def resolve_workers(value: int | str, device_type: str) -> int:
    """Decoding threads: ``auto`` = the host's cores on the CPU (they share the cores with the
    model's own threads) and cores - 1 on CUDA (one core feeds the GPU)."""
    if value != "auto":
        return value
    cores = os.cpu_count() or 1
    return max(0, cores - 1) if device_type == "cuda" else (cores if cores > 1 else 0)
