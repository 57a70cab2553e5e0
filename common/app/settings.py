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
    overrides: tuple[str, ...] = ()    # config keys given on the command line (--set and the dedicated flags)


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
# Keys that take an integer in [low, high] (None: no upper end), and why the ends are where they are.
INTEGER_RANGES: dict[str, tuple[int, int | None, str]] = {
    "batch_size": (1, None, ""),
    "detect_images": (1, None, ""),
    "probe_max_epochs": (1, None, ""),
    "probe_patience": (1, None, ""),
    # each tail of a 95% percentile interval needs a resample, and p < 0.05 needs 2/B < 0.05
    "bootstrap_resamples": (50, None, "fewer resamples cannot resolve a 95% interval or a p-value below 0.05"),
    # every figure image costs two figures and the attention maps of every layer in memory
    "figure_images": (0, 32, "each figure image draws a norm map and an attention map"),
    "analysis_images": (0, None, ""),
    # p = (k + 1) / (B + 1) cannot fall below 0.05 with fewer permutations
    "permutations": (20, None, "with fewer, a permutation p-value cannot fall below 0.05"),
    "probe_refits": (0, None, ""),
    "random_draws": (1, None, ""),
}
# ... and these only with a model (the run defaults alone have none of them).
INTEGER_RANGES_WITH_MODEL: dict[str, tuple[int, int | None, str]] = {
    "num_registers": (1, 64, "each register is one more token in every forward pass; the method uses 1"),
    "top_k": (1, None, ""),
}
# Keys that take true or false.
BOOLEAN_KEYS = ("zero_shot", "probe_class_weights", "force_quick_gelu")
# The largest learning rate, weight decay and intervention scale accepted: beyond them AdamW
# diverges or the weights vanish, and scale x the signed max overflows float32 activations (the
# run would end in NaN features after an hour, blaming the images).
MAX_LR, MAX_WEIGHT_DECAY, MAX_SCALE = 1.0, 1.0, 1000.0


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
    """Check types, ranges and choices (no model needed, except for the model's own names): one
    line naming the key, its value and the valid range or choices."""
    for key, valid in choices().items():
        if key in config and config[key] not in valid:
            raise UserError(f"{key}={config[key]!r}: use one of {', '.join(valid)}")
    seed = config["seed"]
    if not _is_int(seed) or not 0 <= seed < 2 ** 32:
        raise UserError(f"seed={seed!r} (--seed): use an integer from 0 to {2 ** 32 - 1}")
    for key in BOOLEAN_KEYS:
        if key in config and not isinstance(config[key], bool):
            raise UserError(f"{key}={config[key]!r}: expected true or false")
    for key in NUMBER_OR_AUTO_KEYS:
        value = config.get(key, "auto")
        if value != "auto" and not (_is_number(value) and value > 0):
            raise UserError(f"{key}={value!r}: expected a positive number or 'auto'")
    workers = config["num_workers"]
    if workers != "auto" and not (_is_int(workers) and workers >= 0):
        raise UserError(f"num_workers={workers!r}: use an integer >= 0 (0 decodes in the main process) or auto")
    _check_integers(config, INTEGER_RANGES | (INTEGER_RANGES_WITH_MODEL if model is not None else {}))
    _check_fractions(config)
    _check_probe(config)
    if not isinstance(config["extra_modes"], (list, tuple)):
        raise UserError(f"extra_modes={config['extra_modes']!r}: expected a list such as ('no-ttr-removed',)")
    unknown = [m for m in config["extra_modes"] if m not in EXTRA_MODES]
    if unknown:
        raise UserError(f"extra_modes={config['extra_modes']!r}: {unknown[0]!r} is not an extra mode; "
                        f"valid: {', '.join(EXTRA_MODES)}")
    primary = config["primary_metric"]
    if primary != "auto" and primary not in _metric_names():
        raise UserError(f"primary_metric={primary!r}: use auto (the dataset's, configs.PRIMARY_METRIC) or one of "
                        f"{', '.join(_metric_names())}")
    if model is None:
        return config
    scale = config["scale"]
    if not _is_number(scale):
        raise UserError(f"scale={scale}: expected a finite number")
    if not 0 < scale <= MAX_SCALE:
        raise UserError(f"scale={scale:g}: use a number in (0, {MAX_SCALE:g}] (the register takes scale x the signed "
                        "max of the register neurons; 1 is the method's)")
    for key in ("highest_layer", "detect_outliers_layer"):
        if not _is_int(config[key]):
            raise UserError(f"{key}={config[key]!r}: expected an integer (a layer index)")
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


def _check_integers(config: dict, ranges: dict[str, tuple[int, int | None, str]]) -> None:
    for key, (low, high, why) in ranges.items():
        value = config[key]
        if not _is_int(value):
            raise UserError(f"{key}={value!r}: expected an integer")
        if value < low:
            raise UserError(f"{key}={value}: it must be at least {low}" + (f" ({why})" if why and low > 1 else ""))
        if high is not None and value > high:
            raise UserError(f"{key}={value}: use {low}..{high} ({why})")


def _check_fractions(config: dict) -> None:
    val, test = config["val_fraction"], config["test_fraction"]
    if not (_is_number(val) and _is_number(test)) or not 0 < val < 1 or not 0 < test < 1 or val + test >= 1:
        raise UserError(f"val_fraction={val!r} and test_fraction={test!r}: each must be in (0, 1) and their sum "
                        "below 1")


def _check_probe(config: dict) -> None:
    """The probe's settings, here rather than after the features are extracted."""
    patience, epochs = config["probe_patience"], config["probe_max_epochs"]
    if patience >= epochs:
        raise UserError(f"probe_patience={patience} with probe_max_epochs={epochs}: early stopping could never fire "
                        "(every probe would be reported as not converged); use a patience below probe_max_epochs")
    delta = config["probe_min_delta"]
    if not (_is_number(delta) and 0 <= delta < 1):
        raise UserError(f"probe_min_delta={delta!r}: use a number in [0, 1) (the share of the best validation loss "
                        "an epoch must improve on it by)")
    for key, low_open, high in (("probe_lr_grid", True, MAX_LR), ("probe_weight_decay_grid", False, MAX_WEIGHT_DECAY)):
        values = config[key]
        if not isinstance(values, (list, tuple)) or not values:
            raise UserError(f"{key}={values!r}: expected a non-empty list such as (0.001, 0.01)")
        if not all(_is_number(v) and v >= 0 for v in values) or (low_open and min(values) <= 0):
            raise UserError(f"{key}={values!r}: expected positive numbers (weight decay may be 0)")
        if max(values) > high:
            raise UserError(f"{key}={values!r}: {max(values):g} is above {high:g}; use values in "
                            f"{'(0' if low_open else '[0'}, {high:g}] (AdamW diverges or the weights vanish beyond)")
    seeds = config["probe_seeds"]
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(_is_int(s) for s in seeds):
        raise UserError(f"probe_seeds={seeds!r}: expected integers, e.g. (0, 1, 2)")
    if not all(0 <= s < 2 ** 32 for s in seeds):
        raise UserError(f"probe_seeds={seeds!r}: use integers from 0 to {2 ** 32 - 1}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"probe_seeds={seeds!r}: a seed is given twice (its probe would be counted twice in the "
                        "ensemble); give distinct seeds")


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
