"""One run of SPEC §7: backbone -> data -> register neurons -> features -> probe -> metrics -> report."""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common.backbones import Backbone, load_backbone
from common.datasets import Dataset, load_dataset, manufacturer_of, write_splits
from common.detection import (
    DetectionResult, NoOutliersError, collect_norms, detect_register_neurons, detection_batch_size,
    paper_neurons, suggest_threshold, write_json_atomic,
)
from common.devices import resolve_device
from common.errors import UserError
from common.features import (
    MODES, FeatureCache, FeatureSet, cache_key, default_cache_dir, extract_features, file_fingerprints,
    image_loader, mode_settings,
)
from common.hooks import HookedViT
from common.images import IMAGE_SUFFIXES, check_image, is_ignored
from common.intervention import Intervention
from common.metrics import MetricSpec, ensemble_predictions, evaluate_mode, metrics_table, paired_tests
from common.options import DatasetSpec, RunOptions
from common.probe import ProbeConfig, fit_probes

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    spec: DatasetSpec
    options: RunOptions
    config: dict
    backbone: Backbone | None = None
    dataset: Dataset | None = None
    detection: DetectionResult | None = None
    selected: dict[int, list[int]] = field(default_factory=dict)
    features: dict[tuple[str, str], FeatureSet] = field(default_factory=dict)
    planted: list[tuple[int, int]] = field(default_factory=list)
    cache_hits: dict[str, int] = field(default_factory=dict)
    probe_choices: dict[str, list[dict]] = field(default_factory=dict)   # mode -> chosen lr/wd per seed


def _stage(name: str) -> None:
    log.info("== %s", name)


# --------------------------------------------------------------------------------------------
# stages


def stage_backbone(ctx: RunContext, planted_model=None) -> None:
    _stage("load backbone")
    if planted_model is not None:
        ctx.backbone = planted_model.backbone
        ctx.planted = list(planted_model.planted)
        return
    device = resolve_device(ctx.config["device"])
    ctx.backbone = load_backbone(ctx.options.model, ctx.config, device=device, weights=ctx.options.weights)
    log.info("backbone: %s on %s (activation %s)", ctx.backbone.description, device, ctx.backbone.activation)


def stage_dataset(ctx: RunContext) -> None:
    _stage("load dataset and split")
    ctx.dataset = load_dataset(
        ctx.spec.name, ctx.options.image_path, manifest=ctx.options.manifest, seed=ctx.config["seed"],
        val_fraction=ctx.config["val_fraction"], test_fraction=ctx.config["test_fraction"],
        strict=ctx.options.strict)
    log.info("dataset: %s (%s), %d images, %d classes", ctx.dataset.name, ctx.dataset.layout,
             len(ctx.dataset.table), len(ctx.dataset.class_names))
    write_splits(ctx.dataset, ctx.options.out / "splits.csv")
    counts = ctx.dataset.table["split"].value_counts()
    for split in ("train", "val", "test"):
        if counts.get(split, 0) == 0:
            raise UserError(f"the {split} split of {ctx.dataset.root} is empty; add images or use a manifest")


def _detection_paths(ctx: RunContext) -> list[str]:
    """A seeded random sample of ``detect_images`` training images, or of ``--detect_path``."""
    count = ctx.config["detect_images"]
    rng = np.random.default_rng(ctx.config["seed"])
    if ctx.options.detect_path:
        folder = Path(ctx.options.detect_path)
        if not folder.is_dir():
            raise UserError(f"--detect_path {folder}: not a folder; pass a folder of images")
        candidates = sorted(str(p) for p in folder.rglob("*")
                            if p.is_file() and not is_ignored(p) and p.suffix.lower() in IMAGE_SUFFIXES)
        bad = [p for p in candidates if check_image(p) is not None]
        if bad:
            log.warning("--detect_path: skipping %d unreadable image(s), e.g. %s", len(bad), ", ".join(bad[:3]))
        candidates = [p for p in candidates if p not in set(bad)]
        if not candidates:
            raise UserError(f"--detect_path {folder}: no readable images found; pass a folder of images")
    else:
        table = ctx.dataset.table
        candidates = sorted(table.loc[table["split"] == "train", "path"].tolist())
    if len(candidates) > count:
        candidates = sorted(rng.choice(candidates, size=count, replace=False).tolist())
    return candidates


def stage_neurons(ctx: RunContext) -> None:
    _stage("register neurons")
    config = ctx.config
    neurons_arg = ctx.options.neurons
    if neurons_arg == "paper":
        ctx.detection = paper_neurons(ctx.options.model, config.get("backbone_size"))
    elif neurons_arg:
        ctx.detection = DetectionResult.load(neurons_arg)
    else:
        ctx.detection = _detect(ctx)
    max_layer = ctx.backbone.num_layers - 1
    if not 0 <= config["highest_layer"] <= max_layer:
        raise UserError(f"highest_layer={config['highest_layer']} is outside this model's layers 0..{max_layer}")
    ctx.selected = ctx.detection.select(config["highest_layer"], config["top_k"])
    for layer, ids in ctx.selected.items():
        if layer > max_layer or max(ids) >= ctx.backbone.mlp_width:
            raise UserError(
                f"--neurons {neurons_arg}: neuron ({layer}, {max(ids)}) does not exist in this "
                f"{ctx.backbone.num_layers}-layer model with {ctx.backbone.mlp_width} MLP units")
    if not ctx.selected:
        raise UserError(f"no register neuron at or below highest_layer={config['highest_layer']}; raise highest_layer")
    total = sum(len(ids) for ids in ctx.selected.values())
    log.info("selected %d register neurons in layers %s", total, sorted(ctx.selected))
    target = ctx.options.out / "register_neurons.json"
    if neurons_arg and neurons_arg != "paper" and Path(neurons_arg).resolve() == target.resolve():
        log.info("register_neurons.json is the --neurons file itself; left as it is")
    else:
        ctx.detection.save(target, config["highest_layer"], config["top_k"])


def _detect(ctx: RunContext) -> DetectionResult:
    config, backbone = ctx.config, ctx.backbone
    hooked = HookedViT(backbone)
    paths = _detection_paths(ctx)
    batch = detection_batch_size(backbone, config["batch_size"])
    loader = lambda: image_loader(paths, backbone.preprocess, batch, config["num_workers"], backbone.device)  # noqa: E731
    threshold, reason = config["register_norm_threshold"], "configured"
    if threshold == "auto":
        norms = collect_norms(hooked, tqdm(loader(), desc="norms for auto threshold", leave=False),
                              config["detect_outliers_layer"])
        threshold, reason = suggest_threshold(norms)
        log.info("register_norm_threshold=auto chose %.2f: %s", threshold, reason)
    with tqdm(total=len(paths), desc="detect register neurons", unit="img") as progress:
        try:
            result = detect_register_neurons(
                hooked, loader(), detect_layer=config["detect_outliers_layer"], threshold=float(threshold),
                progress=progress)
        except NoOutliersError as error:
            norms = collect_norms(hooked, loader(), config["detect_outliers_layer"])
            raise error.with_suggestion(suggest_threshold(norms)[0]) from None
    result.threshold_reason = reason
    result.extra["detection_images"] = paths if len(paths) <= 1000 else paths[:1000]
    log.info("detection: %d of %d images had outlier tokens", result.images_counted, result.images_used)
    return result


def _intervention(ctx: RunContext) -> Intervention:
    return Intervention(neurons=ctx.selected, scale=float(ctx.config["scale"]),
                        normal_values=ctx.config["normal_values"])


def _feature_description(ctx: RunContext, mode: str, paths: list[str]) -> dict:
    backbone = ctx.backbone
    registers, intervention = mode_settings(mode, ctx.config["num_registers"], _intervention(ctx))
    return {
        "family": backbone.family,
        "weights": backbone.weights_id,
        "activation": backbone.activation,
        "preprocess": backbone.preprocess_id,
        "mode": mode,
        "num_registers": registers,
        "intervention": intervention.describe() if intervention else None,
        "images": file_fingerprints(paths),
    }


def stage_features(ctx: RunContext) -> None:
    _stage("extract features")
    cache = FeatureCache(ctx.options.cache_dir or default_cache_dir(), enabled=not ctx.options.no_cache)
    hooked = HookedViT(ctx.backbone)
    table = ctx.dataset.table
    ctx.cache_hits = {}
    for mode in MODES:
        registers, intervention = mode_settings(mode, ctx.config["num_registers"], _intervention(ctx))
        for split in ("train", "val", "test"):
            paths = table.loc[table["split"] == split, "path"].tolist()
            description = _feature_description(ctx, mode, paths)
            key = cache_key(description)
            features = cache.load(key)
            if features is not None and len(features.pooled) == len(paths):
                log.info("%s %s: %d images from the feature cache (extraction skipped)", mode, split, len(paths))
                ctx.cache_hits[f"{mode}/{split}"] = 1
            else:
                loader = image_loader(paths, ctx.backbone.preprocess, ctx.config["batch_size"],
                                      ctx.config["num_workers"], ctx.backbone.device)
                with tqdm(total=len(paths), desc=f"features {mode} {split}", unit="img") as progress:
                    features = extract_features(hooked, loader, num_registers=registers,
                                                intervention=intervention, progress=progress)
                cache.save(key, features, {k: v for k, v in description.items() if k != "images"})
                ctx.cache_hits[f"{mode}/{split}"] = 0
            ctx.features[(mode, split)] = features
    reused = sum(ctx.cache_hits.values())
    print(f"feature cache: {reused} of {len(ctx.cache_hits)} (mode, split) sets reused"
          + ("" if cache.enabled else " (cache disabled by --no_cache)"))


def _probe_config(config: dict) -> ProbeConfig:
    return ProbeConfig(
        lr_grid=tuple(config["probe_lr_grid"]), weight_decay_grid=tuple(config["probe_weight_decay_grid"]),
        max_epochs=config["probe_max_epochs"], patience=config["probe_patience"],
        class_weights=config["probe_class_weights"], seeds=tuple(config["probe_seeds"]),
    )


def stage_probe_and_metrics(ctx: RunContext) -> pd.DataFrame:
    _stage("train probes and score")
    table, config = ctx.dataset.table, ctx.config
    labels = {split: table.loc[table["split"] == split, "label"].to_numpy() for split in ("train", "val", "test")}
    test_paths = table.loc[table["split"] == "test", "path"].tolist()
    class_names = ctx.dataset.class_names
    metric_spec = MetricSpec(
        n_classes=len(class_names), qwk=ctx.spec.qwk,
        manufacturer_of_class=[manufacturer_of(name) for name in class_names] if ctx.spec.manufacturer else None)
    probe_config = _probe_config(config)
    probabilities: dict[str, np.ndarray] = {}
    results: dict[str, dict] = {}
    chosen: dict[str, list[dict]] = {}
    for mode in tqdm(MODES, desc="probe per mode"):
        X = {split: ctx.features[(mode, split)].select(config["feature"]) for split in labels}
        probabilities[mode], chosen[mode] = fit_probes(
            X["train"], labels["train"], X["val"], labels["val"], X["test"], len(class_names), probe_config)
        results[mode] = evaluate_mode(labels["test"], probabilities[mode], metric_spec,
                                      n_boot=config["bootstrap_resamples"], seed=config["seed"])
        ensemble = ensemble_predictions(probabilities[mode])
        predictions = pd.DataFrame({
            "path": test_paths,
            "true": [class_names[i] for i in labels["test"]],
            "predicted": [class_names[i] for i in ensemble.argmax(axis=1)],
        })
        for index, name in enumerate(class_names):
            predictions[f"p[{name}]"] = ensemble[:, index]
        _write_csv(predictions, ctx.options.out / f"predictions_{mode}.csv")
    tests = paired_tests(labels["test"], probabilities["no-ttr"], probabilities["ttr"], metric_spec,
                         n_boot=config["bootstrap_resamples"], seed=config["seed"])
    table_out = metrics_table(results, tests)
    _write_csv(table_out, ctx.options.out / "metrics.csv")
    ctx.probe_choices = chosen
    return table_out


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    frame.to_csv(temporary, index=False)
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------
# config.json and summary.md


def library_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "open_clip_torch", "timm", "numpy", "pandas",
                    "scikit-learn", "scipy", "Pillow", "matplotlib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def write_config(ctx: RunContext, status: str) -> None:
    backbone = ctx.backbone
    data: dict[str, Any] = {
        "dataset": ctx.spec.name,
        "model": ctx.options.model,
        "demo": ctx.options.demo,
        "status": status,
        "config": ctx.config,
        "command_line": ctx.options.command_line,
        "image_path": ctx.options.image_path,
        "manifest": ctx.options.manifest,
        "weights": ctx.options.weights,
        "neurons": ctx.options.neurons,
        "detect_path": ctx.options.detect_path,
        "library_versions": library_versions(),
        "device": str(backbone.device) if backbone else None,
        "backbone": backbone.description if backbone else None,
        "activation": backbone.activation if backbone else None,
        "weights_id": backbone.weights_id if backbone else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if ctx.dataset is not None:
        data["layout"] = ctx.dataset.layout
        data["class_names"] = ctx.dataset.class_names
        data["skipped_files"] = len(ctx.dataset.skipped)
        data["leaks"] = len(ctx.dataset.leaks)
    if ctx.detection is not None:
        data["neurons_source"] = ctx.detection.source
        data["register_norm_threshold_used"] = ctx.detection.threshold
        data["threshold_reason"] = ctx.detection.threshold_reason
    if ctx.selected:
        data["selected_neurons"] = {str(k): v for k, v in ctx.selected.items()}
    if ctx.options.demo:
        data["planted"] = [list(pair) for pair in ctx.planted]
    if ctx.cache_hits:
        data["feature_cache_hits"] = ctx.cache_hits
    if ctx.probe_choices:
        data["probe_hyperparameters"] = ctx.probe_choices
    write_json_atomic(ctx.options.out / "config.json", data)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def write_summary(ctx: RunContext, metrics: pd.DataFrame, extra_sections: list[str] | None = None) -> None:
    rows = metrics.set_index("mode")
    names = [c for c in metrics.columns
             if f"{c}_lo" in metrics.columns and not c.endswith(("_lo", "_hi", "_std"))]
    lines = [f"# {ctx.spec.title}: {ctx.options.model}, no-ttr vs ttr", ""]
    if ctx.options.demo:
        lines += ["> **Demo run on synthetic data with a planted model.** The images were generated, "
                  "the backbone is a small randomly initialised ViT with register neurons planted by "
                  f"hand at {ctx.planted}. These numbers say nothing about real medical images.", ""]
    lines += [
        f"- backbone: {ctx.backbone.description} (activation {ctx.backbone.activation}), device {ctx.backbone.device}",
        f"- dataset: {ctx.dataset.root} ({ctx.dataset.layout}); classes {len(ctx.dataset.class_names)}; "
        + ", ".join(f"{s} {int((ctx.dataset.table['split'] == s).sum())}" for s in ("train", "val", "test")),
        f"- register neurons: {ctx.detection.source}, {sum(len(v) for v in ctx.selected.values())} selected "
        f"(highest_layer {ctx.config['highest_layer']}, top_k {ctx.config['top_k']}), "
        f"threshold {ctx.detection.threshold:g}, images counted {ctx.detection.images_counted}/{ctx.detection.images_used}",
        f"- ttr: {ctx.config['num_registers']} register(s), scale {ctx.config['scale']}, "
        f"normal_values {ctx.config['normal_values']}; probe feature `{ctx.config['feature']}`, "
        f"{len(ctx.config['probe_seeds'])} probe seeds",
        "",
        "| metric | no-ttr | ttr | ttr - no-ttr |",
        "|---|---|---|---|",
    ]
    for name in names:
        cells = []
        for mode in MODES:
            row = rows.loc[mode]
            std = row.get(f"{name}_std", float("nan"))
            cells.append(f"{_fmt(row[name])} [{_fmt(row[name + '_lo'])}, {_fmt(row[name + '_hi'])}]"
                         + (f" ± {_fmt(std)}" if not np.isnan(std) else ""))
        delta = rows.loc["ttr", name] - rows.loc["no-ttr", name]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {delta:+.3f} |")
    ttr = rows.loc["ttr"]
    auc_classes = int(ttr["auc_classes"]) if "auc_classes" in ttr and not np.isnan(ttr["auc_classes"]) else None
    lines += [
        "",
        "Values are the mean over probe seeds with the 95% percentile bootstrap interval "
        f"({ctx.config['bootstrap_resamples']} resamples of the test set) and ± the spread over seeds."
        + (f" AUC averages over the {auc_classes} classes present in the test split." if auc_classes else ""),
        "",
        f"Paired tests of ttr against no-ttr on the same {int((ctx.dataset.table['split'] == 'test').sum())} "
        f"test images: exact McNemar on top-1 p = {_fmt(ttr.get('p_mcnemar_top1'), 4)}; "
        f"paired bootstrap on macro F1 p = {_fmt(ttr.get('p_bootstrap_f1_macro'), 4)}. "
        "These p-values are per run: when many datasets, backbones or settings are compared, "
        "correct for multiplicity (e.g. Holm or Benjamini-Hochberg over the runs, "
        "`python -m common.report` lists them together).",
    ]
    if ctx.dataset.leaks:
        lines += ["", f"**Warning:** {len(ctx.dataset.leaks)} file(s) with identical content appear in two splits "
                  "(see the log); the test metrics may be optimistic."]
    for section in extra_sections or []:
        lines += ["", section]
    path = ctx.options.out / "summary.md"
    temporary = path.with_name(".summary.md.tmp")
    temporary.write_text("\n".join(lines) + "\n")
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------


def execute(spec: DatasetSpec, options: RunOptions, config: dict, planted_model=None) -> RunContext:
    """Run every stage; ``planted_model`` replaces the backbone in a demo."""
    options.out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(spec=spec, options=options, config=config)
    torch.manual_seed(config["seed"])
    try:
        stage_backbone(ctx, planted_model)
        stage_dataset(ctx)
        stage_neurons(ctx)
        stage_features(ctx)
        metrics = stage_probe_and_metrics(ctx)
        extra = _analysis_sections(ctx)
        write_summary(ctx, metrics, extra)
        write_config(ctx, "done")
    except BaseException:
        if ctx.backbone is not None or ctx.dataset is not None:
            write_config(ctx, "failed")
        raise
    print(f"done: {options.out / 'summary.md'}")
    return ctx


def _analysis_sections(ctx: RunContext) -> list[str]:
    """Figures and ``outliers.csv`` (common.analysis); returns summary sections."""
    _stage("figures and outlier statistics")
    from common import analysis

    return analysis.write_analysis(ctx)
