"""What a run is asked to do (common.app.settings): the one KEY=VALUE parser, the config resolved
from configs.py, the demo's defaults, ``--set`` and the flags, and every value checked once where
it enters (one line naming the key, its value and what to do)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import configs
from common.app import settings
from common.app.settings import (
    KeyValue,
    apply_overrides,
    base_config,
    parse_key_values,
    parse_value,
    DatasetSpec,
    resolve_config,
    resolve_primary_metric,
    resolve_workers,
    validate,
    validate_for_model,
)
from common.errors import UserError
from common.models.family import ModelIdentity

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------
# KEY=VALUE


def test_items_split_at_the_first_equals_sign():
    pairs = parse_key_values([" top_k =30", "scale=a=b", "feature="], "--set", form="KEY=VALUE", blank=True)
    assert pairs == [KeyValue("--set", " top_k =30", "top_k", "30"), KeyValue("--set", "scale=a=b", "scale", "a=b"),
                     KeyValue("--set", "feature=", "feature", "")]


@pytest.mark.parametrize("items, options, expected", [
    (["top_k"], {"form": "KEY=VALUE, e.g. --set top_k=30"}, "--set top_k: expected KEY=VALUE, e.g. --set top_k=30"),
    (["top_k="], {"form": "KEY=VALUE"}, "--set top_k=: expected KEY=VALUE"),
    (["top_k=  "], {"form": "KEY=VALUE"}, "--set top_k=  : expected KEY=VALUE"),
    (["mnist=/d"], {"form": "DATASET=DIR", "keys": ("aptos", "orthonet"), "noun": "dataset"},
     "--set mnist=/d: unknown dataset 'mnist'; valid: aptos, orthonet"),
    (["aptos=/a", "aptos=/b"], {"form": "DATASET=DIR", "unique": True, "noun": "dataset"},
     "--set aptos=/b: dataset aptos is given twice"),
    (["aptos=/a"], {"form": "a dataset name only", "value": False}, "--set aptos=/a: expected a dataset name only"),
    (["aptos"], {"form": lambda key: f"{key}=DIR (the {key} folder)"}, "--set aptos: expected aptos=DIR (the aptos folder)"),
])
def test_a_bad_item_is_one_line_naming_it(items, options, expected):
    with pytest.raises(UserError) as caught:
        parse_key_values(items, "--set", **options)
    assert str(caught.value) == expected


def test_repeated_keys_and_bare_names_where_allowed():
    assert [p.value for p in parse_key_values(["a=1", "a=2"], "--set", form="KEY=VALUE")] == ["1", "2"]
    assert [(p.key, p.value) for p in parse_key_values(["aptos", "orthonet"], "--data", form="NAME", value=False)] \
        == [("aptos", None), ("orthonet", None)]


@pytest.mark.parametrize("text, value", [
    ("true", True), ("False", False), ("none", None), ("null", None), ("30", 30), ("1e-3", 1e-3),
    ("(0, 1)", (0, 1)), ("('no-ttr-removed',)", ("no-ttr-removed",)), ("cls+patch_mean", "cls+patch_mean"),
    (" mean ", "mean"), ("", ""),
])
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


# ------------------------------------------------------------------------------------------
# the config dict


def test_resolution_order_model_demo_set_flags():
    config = resolve_config("dinov2", ["top_k=7", "seed=4", "probe_seeds=3", "scale=2"], {"seed": 9, "batch_size": None},
                            demo=True)
    assert config["top_k"] == 7 and config["seed"] == 9                  # a flag beats --set; None is "not given"
    assert config["probe_seeds"] == (3,) and config["scale"] == 2.0 and isinstance(config["scale"], float)
    assert config["batch_size"] == configs.RUN_DEFAULTS["batch_size"]
    assert config["num_workers"] == 0 and config["device"] == "cpu"      # the demo's defaults
    assert config["backbone_size"] == configs.DINOV2["backbone_size"]
    assert resolve_config("dinov2")["device"] == "auto"
    # no model: the run defaults alone
    assert set(resolve_config(None)) == set(configs.RUN_DEFAULTS)


def test_base_config_is_a_copy():
    config = base_config("clip")
    config["probe_seeds"] = (9,)
    config["top_k"] = 1
    assert configs.CLIP["top_k"] != 1 and configs.RUN_DEFAULTS["probe_seeds"] != (9,)
    assert base_config("clip") == {**configs.RUN_DEFAULTS, **configs.CLIP}


def test_every_model_dict_has_the_common_keys_and_its_own_device():
    for name, model in configs.MODEL_CONFIGS.items():
        assert set(configs.COMMON_DEFAULTS) <= set(model), name
        assert model["device"] == "auto", name
    assert "device" not in configs.COMMON_DEFAULTS


def test_unknown_key_lists_the_valid_ones_and_hints_at_model_keys():
    with pytest.raises(UserError) as caught:
        apply_overrides(base_config("clip"), ["top_kk=3"])
    assert str(caught.value).startswith("--set top_kk: unknown config key; valid keys: ")
    assert "top_k" in str(caught.value)
    with pytest.raises(UserError, match=r"top_k belongs to a model's config: pass --model"):
        apply_overrides(base_config(None), ["top_k=3"])


@pytest.mark.parametrize("model, item, needle", [
    ("clip", "top_k=many", "--set top_k='many': expected an integer"),
    ("clip", "batch_size=2.5", "--set batch_size=2.5: expected an integer"),
    ("clip", "scale=nan", "--set scale='nan': expected a finite number"),
    ("clip", "zero_shot=1", "--set zero_shot=1: expected true or false"),
    ("clip", "probe_seeds=()", "expected a list such as (1, 2, 3)"),
    ("clip", "probe_seeds=abc", "probe_seeds=('abc',): expected integers"),
    ("clip", "normal_values=median", "normal_values='median': use one of zero, mean, only_outliers, same"),
    ("clip", "feature=patch", "feature='patch': use one of cls, patch_mean, cls+patch_mean"),
    ("clip", "intervention_max=image", "intervention_max='image': use one of layer, neuron"),
    ("clip", "precision=fp16", "precision='fp16': use one of auto, fp32, bf16"),
    ("clip", "register_norm_threshold=-5", "register_norm_threshold=-5: expected a positive number or 'auto'"),
    ("clip", "register_norm_threshold=big", "register_norm_threshold='big': expected a positive number or 'auto'"),
    ("clip", "num_workers=-1", "num_workers=-1: use an integer >= 0"),
    ("clip", "num_workers=two", "num_workers='two': use an integer >= 0"),
    ("clip", "seed=-1", "seed=-1 (--seed): use an integer from 0 to 4294967295"),
    ("clip", "top_k=0", "top_k=0: it must be at least 1"),
    ("clip", "num_registers=0", "num_registers=0: it must be at least 1"),
    ("clip", "figure_images=-1", "figure_images=-1: it must be at least 0"),
    ("clip", "val_fraction=1.2", "each must be in (0, 1) and their sum below 1"),
    ("clip", "extra_modes=bogus", "'bogus' is not an extra mode; valid: no-ttr-removed"),
    ("clip", "probe_lr_grid=(0, 1e-3)", "probe_lr_grid=(0, 0.001): expected positive numbers"),
    ("clip", "probe_refits=-1", "probe_refits=-1: it must be at least 0"),
    ("clip", "permutations=0", "permutations=0: it must be at least 20"),
    ("clip", "primary_metric=accuracy", "primary_metric='accuracy': use auto (the dataset's, configs.PRIMARY_METRIC) "
                                        "or one of top1, top3, f1_macro"),
    ("dinov2", "backbone_size=vitx99", "backbone_size 'vitx99' is unknown"),
    ("dinov2", "zero_shot=true", "--zero_shot needs a backbone with a text tower (clip); dinov2 has none"),
])
def test_a_bad_value_is_one_line_naming_it(model, item, needle):
    with pytest.raises(UserError) as caught:
        resolve_config(model, [item])
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_value_in_configs_py_is_caught_too(monkeypatch):
    """configs.py is edited by hand: its values go through the same checks as --set."""
    monkeypatch.setitem(configs.CLIP, "normal_values", "median")
    with pytest.raises(UserError, match="normal_values='median'"):
        resolve_config("clip")
    monkeypatch.setitem(configs.CLIP, "normal_values", "zero")
    monkeypatch.setitem(configs.RUN_DEFAULTS, "batch_size", "32")
    with pytest.raises(UserError, match="batch_size='32': expected an integer"):
        resolve_config("clip")


def test_valid_values_pass_unchanged():
    config = resolve_config("clip", ["register_norm_threshold=auto", "num_workers=auto", "normal_values=only_outliers",
                                     "extra_modes=('no-ttr-removed',)", "zero_shot=true", "precision=bf16"])
    assert config["register_norm_threshold"] == "auto" and config["num_workers"] == "auto"
    assert config["normal_values"] == "only_outliers" and config["extra_modes"] == ("no-ttr-removed",)
    assert config["zero_shot"] is True and config["precision"] == "bf16"
    assert validate(dict(config), "clip") == config


def test_layer_ranges_against_the_models_depth():
    identity = ModelIdentity("dinov2", "vit", layers=24, mlp_width=4096)
    config = resolve_config("dinov2")
    validate_for_model(config, identity)
    for key, value, needle in (("detect_outliers_layer", -25, "use -24..23"), ("detect_outliers_layer", 24, "use -24..23"),
                               ("highest_layer", -1, "use 0..23"), ("highest_layer", 24, "use 0..23"),
                               ("top_k", 24 * 4096 + 1, "use 1..98304")):
        with pytest.raises(UserError, match=needle):
            validate_for_model({**config, key: value}, identity)
    validate_for_model({**config, "detect_outliers_layer": -24, "highest_layer": 23, "top_k": 24 * 4096}, identity)


def test_resolve_workers(monkeypatch):
    monkeypatch.setattr(settings.os, "cpu_count", lambda: 8)
    assert resolve_workers("auto", "cpu") == 8 and resolve_workers("auto", "cuda") == 7
    assert resolve_workers(3, "cuda") == 3
    monkeypatch.setattr(settings.os, "cpu_count", lambda: 1)
    assert resolve_workers("auto", "cpu") == 0 and resolve_workers("auto", "cuda") == 0


def test_the_primary_metric_per_dataset_and_overridden():
    aptos = DatasetSpec("aptos", "APTOS 2019", qwk=True)
    pacemaker = DatasetSpec("pacemaker", "Pacemaker", manufacturer=True)
    orthonet = DatasetSpec("orthonet", "OrthoNet")
    manifest = DatasetSpec("manifest", "a manifest")
    auto = resolve_config("clip")
    assert auto["primary_metric"] == "auto" and configs.RUN_DEFAULTS["probe_refits"] == 20
    assert [resolve_primary_metric(auto, s) for s in (aptos, pacemaker, orthonet, manifest)] == \
        ["qwk", "top1", "top1", "top1"]
    assert resolve_primary_metric(resolve_config("clip", ["primary_metric=f1_macro"]), orthonet) == "f1_macro"
    assert resolve_primary_metric(resolve_config("clip", ["primary_metric=manufacturer_top1"]), pacemaker) == \
        "manufacturer_top1"
    for metric, spec in (("qwk", orthonet), ("manufacturer_top1", aptos)):
        with pytest.raises(UserError, match=f"primary_metric='{metric}': .* does not report it; use one of top1"):
            resolve_primary_metric(resolve_config("clip", [f"primary_metric={metric}"]), spec)


def test_the_command_line_answers_without_importing_torch():
    """The entry scripts import the CLI and these settings before argparse runs: neither may import
    torch (or numpy), so a usage error is answered at once."""
    code = ("import sys; import common.app.cli, common.app.settings; "
            "print(sorted(m for m in ('torch', 'numpy', 'pandas', 'open_clip', 'timm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("model, items, needle", [
    ("clip", ["probe_min_delta=-1"], "probe_min_delta=-1.0: use a number in [0, 1)"),
    ("clip", ["probe_patience=200"], "probe_patience=200 with probe_max_epochs=200: early stopping could never fire"),
    ("clip", ["bootstrap_resamples=49"], "bootstrap_resamples=49: it must be at least 50"),
    ("clip", ["figure_images=33"], "figure_images=33: use 0..32"),
    ("clip", ["num_registers=65"], "num_registers=65: use 1..64"),
    ("clip", ["scale=0"], "scale=0: use a number in (0, 1000]"),
    ("clip", ["scale=1e30"], "scale=1e+30: use a number in (0, 1000]"),
    ("clip", ["probe_lr_grid=(0.01, 2)"], "probe_lr_grid=(0.01, 2): 2 is above 1; use values in (0, 1]"),
    ("clip", ["probe_weight_decay_grid=(5,)"], "probe_weight_decay_grid=(5,): 5 is above 1; use values in [0, 1]"),
    ("clip", ["probe_seeds=(1, 1)"], "probe_seeds=(1, 1): a seed is given twice"),
    ("clip", ["probe_seeds=(0, -3)"], "probe_seeds=(0, -3): use integers from 0 to 4294967295"),
    (None, ["probe_min_delta=1"], "probe_min_delta=1.0: use a number in [0, 1)"),
])
def test_ranges_are_checked_where_settings_enter(model, items, needle):
    with pytest.raises(UserError) as caught:
        resolve_config(model, items)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("mapping, key, value, needle", [
    ("RUN_DEFAULTS", "probe_lr_grid", (), "probe_lr_grid=(): expected a non-empty list"),
    ("RUN_DEFAULTS", "probe_seeds", [], "probe_seeds=[]: expected integers"),
    ("RUN_DEFAULTS", "val_fraction", "0.15", "val_fraction='0.15' and test_fraction=0.15"),
    ("RUN_DEFAULTS", "probe_class_weights", "no", "probe_class_weights='no': expected true or false"),
    ("RUN_DEFAULTS", "extra_modes", "no-ttr-removed", "extra_modes='no-ttr-removed': expected a list"),
    ("CLIP", "highest_layer", 5.5, "highest_layer=5.5: expected an integer"),
    ("CLIP", "force_quick_gelu", 1, "force_quick_gelu=1: expected true or false"),
])
def test_configs_py_edited_by_hand_is_checked_too_never_a_traceback(monkeypatch, mapping, key, value, needle):
    monkeypatch.setitem(getattr(configs, mapping), key, value)
    with pytest.raises(UserError) as caught:
        resolve_config("clip")
    assert needle in str(caught.value)


def test_the_ends_of_each_range_pass():
    config = resolve_config("clip", ["probe_min_delta=0", "bootstrap_resamples=50", "figure_images=32",
                                     "num_registers=64", "scale=1000", "probe_lr_grid=(1,)",
                                     "probe_weight_decay_grid=(0, 1)", "probe_patience=199"])
    assert config["scale"] == 1000.0 and config["num_registers"] == 64 and config["probe_patience"] == 199
