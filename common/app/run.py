"""One run of docs/run.md: backbone -> data -> images -> register neurons -> features -> probes ->
metrics -> figures -> summary.

Each image is decoded once (:class:`common.data.imagebank.ImageBank`); detection, features and the
analysis statistics are cached under keys of everything that changes them, so a re-run with the
same inputs recomputes nothing and an interrupted run resumes from what was complete.  Under
torchrun, decoding, detection and extraction are split over the ranks by whole batches and
rank 0 does the rest and writes every file.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common import distributed
from common.app.options import DatasetSpec, RunOptions
from common.app.runstate import RunState
from common.app.settings import resolve_workers
from common.data.cache import Cache, cache_key, default_cache_dir, library_versions
from common.data.imagebank import ImageBank
from common.data.images import IMAGE_SUFFIXES, check_image, is_ignored
from common.data.registry import SPLITS, load_dataset, manufacturer_of, write_splits
from common.demo.fixture import PlantedModel
from common.errors import UserError
from common.evaluation.analysis import ModeSetup, analyse, analysis_paths, outlier_table
from common.evaluation.course import load_probes
from common.evaluation.metrics import MetricSpec, ensemble_predictions, evaluate_modes
from common.evaluation.probe import ProbeConfig, fit_probes
from common.evaluation.zeroshot import (
    class_embeddings,
    class_prompts,
    zero_shot_probabilities,
)
from common.io import write_csv, write_json
from common.models.backbone import load_backbone
from common.models.hooks import HookedViT
from common.registers.detection import (
    NoOutliersError,
    collect_norms,
    detect_register_neurons,
    detection_batch_size,
    suggest_threshold,
)
from common.registers.features import FeatureSet, extract_batch
from common.registers.intervention import Intervention, mode_setup
from common.registers.modes import (
    BASELINE,
    COURSE_SUFFIX,
    MODES,
    ZERO_SHOT_SUFFIX,
    predictions_file,
)
from common.registers.neurons import NeuronRanking
from common.reporting.plots import write_outputs
from common.reporting.summary import write_summary

log = logging.getLogger(__name__)

# The versions config.json records (the cache keys hold those that change features).
RECORDED_LIBRARIES = ("torch", "torchvision", "open_clip_torch", "timm", "numpy", "pandas", "scikit-learn", "scipy",
                      "Pillow", "matplotlib")
STAGES = ("load backbone", "load dataset and split", "register neurons", "extract features",
          "train probes", "score", "figures and outlier statistics", "summary")


def _stage(state: RunState, name: str) -> None:
    if state.main:
        log.info("[%d/%d] %s", STAGES.index(name) + 1, len(STAGES), name)


def fingerprints(paths: list[str]) -> list[list]:
    """``[path, size, mtime_ns]`` per file: a changed file changes every key it is part of."""
    stats = [(os.path.abspath(p), os.stat(p)) for p in paths]
    return [[path, stat.st_size, stat.st_mtime_ns] for path, stat in stats]


def _model_description(state: RunState) -> dict:
    """What identifies the model's computation in every cache key."""
    backbone, bank = state.backbone, state.bank
    return {
        "model": backbone.identity.as_dict(),
        "weights": backbone.weights_id,
        "activation": backbone.activation,
        "preprocess": [bank.preprocess_id, bank.mean.tolist(), bank.std.tolist()],
        "precision": backbone.precision,
        "device_type": backbone.device.type,
    }


# --------------------------------------------------------------------------------------------
# stages


def stage_backbone(state: RunState, device: torch.device, planted: PlantedModel | None) -> None:
    _stage(state, "load backbone")
    if planted is not None:
        state.backbone = planted.backbone
        state.planted = list(planted.planted)
    else:
        with tqdm(total=1, desc="load backbone", unit="model", disable=not state.main) as progress:
            state.backbone = load_backbone(state.options.model, state.config, device=device,
                                           weights=state.options.weights, precision=state.config["precision"])
            progress.update(1)
    backbone = state.backbone
    if state.main:
        log.info("backbone: %s on %s (activation %s, precision %s)", backbone.description, backbone.device,
                 backbone.activation, backbone.precision)


def stage_dataset(state: RunState) -> None:
    _stage(state, "load dataset and split")
    config = state.config
    state.dataset = load_dataset(
        state.spec.name, state.options.image_path, manifest=state.options.manifest, seed=config["seed"],
        val_fraction=config["val_fraction"], test_fraction=config["test_fraction"], strict=state.options.strict)
    dataset = state.dataset
    if state.main:
        log.info("dataset: %s, %d images, %d classes", dataset.layout, len(dataset.table), len(dataset.class_names))
        write_splits(dataset, state.options.out / "splits.csv")
    counts = dataset.table["split"].value_counts()
    for split in SPLITS:
        if counts.get(split, 0) == 0:
            raise UserError(f"the {split} split of {dataset.root} is empty; add images or use a manifest")


def _split_paths(state: RunState, split: str) -> list[str]:
    table = state.dataset.table
    return table.loc[table["split"] == split, "path"].tolist()


def _detection_paths(state: RunState) -> list[str]:
    """A seeded random sample of ``detect_images`` training images, or of ``--detect_path``
    (chosen once per run)."""
    if state.detection_paths is None:
        state.detection_paths = _choose_detection_paths(state)
    return state.detection_paths


def _choose_detection_paths(state: RunState) -> list[str]:
    count = state.config["detect_images"]
    rng = np.random.default_rng(state.config["seed"])
    if state.options.detect_path:
        folder = Path(state.options.detect_path)
        if not folder.is_dir():
            raise UserError(f"--detect_path {folder}: not a folder; pass a folder of images")
        candidates = sorted(str(p) for p in folder.rglob("*")
                            if p.is_file() and not is_ignored(p) and p.suffix.lower() in IMAGE_SUFFIXES)
        bad = {p for p in candidates if check_image(p) is not None}
        if bad:
            log.warning("--detect_path: skipping %d unreadable image(s), e.g. %s", len(bad), ", ".join(sorted(bad)[:3]))
        candidates = [p for p in candidates if p not in bad]
        if not candidates:
            raise UserError(f"--detect_path {folder}: no readable images found; pass a folder of images")
    else:
        candidates = sorted(_split_paths(state, "train"))
    if len(candidates) > count:
        candidates = sorted(rng.choice(candidates, size=count, replace=False).tolist())
    return candidates


def _all_image_paths(state: RunState) -> list[str]:
    paths = list(state.dataset.table["path"])
    if state.options.detect_path:
        paths += _detection_paths(state)
    return paths


def _images_ready(state: RunState) -> None:
    """Schedule every image the run may need, once: decoding threads fill the bank in the order
    of the dataset while the first pass consumes them (idempotent)."""
    scheduled = state.bank.prepare(_all_image_paths(state))
    if scheduled and state.main:
        log.info("%d images: from the image cache or decoded by %d thread(s), alongside the first pass",
                 scheduled, max(state.bank.num_workers, 1))


def stage_neurons(state: RunState, preloaded: NeuronRanking | None) -> None:
    _stage(state, "register neurons")
    config = state.config
    if preloaded is not None:
        state.ranking = preloaded
        if state.main:
            log.info("register neurons from %s", preloaded.source)
    else:
        state.ranking = _detect(state)
    state.selected = state.ranking.select(config["highest_layer"], config["top_k"])
    if not state.selected:
        raise UserError(f"no register neuron at or below highest_layer={config['highest_layer']}; raise highest_layer")
    state.intervention = Intervention.from_config(state.selected, config)
    above = state.ranking.above_highest_layer(config["highest_layer"], config["top_k"])
    if state.main:
        total = sum(len(ids) for ids in state.selected.values())
        log.info("selected %d register neurons in layers %s", total, sorted(state.selected))
        if above:
            log.warning("%d of the top %d ranked neurons lie above highest_layer=%d (best score %.3g) and are "
                        "not selected; see register_neurons.json", len(above), config["top_k"],
                        config["highest_layer"], max(s for _, _, s in above))
        target = state.options.out / "register_neurons.json"
        source = state.options.neurons
        if source and source != "paper" and Path(source).resolve() == target.resolve():
            log.info("register_neurons.json is the --neurons file itself; left as it is")
        else:
            state.ranking.save(target, config["highest_layer"], config["top_k"])


def _detect(state: RunState) -> NeuronRanking:
    config, backbone, dist = state.config, state.backbone, state.dist
    hooked = HookedViT(backbone)
    paths = _detection_paths(state)
    batch = detection_batch_size(backbone, config["batch_size"])
    detect_layer = config["detect_outliers_layer"]
    description = {"kind": "detection", **_model_description(state), "images": fingerprints(paths),
                   "detect_layer": detect_layer, "threshold": config["register_norm_threshold"],
                   "sparsity": [0.5, 0.5]}
    key = cache_key(description)
    cached = dist.broadcast(state.cache.load("detection", key) if state.main else None)
    if cached is not None:
        info = json.loads(cached["meta"].item())
        if state.main:
            log.info("detection: from the cache (%d of %d images counted)", info["images_counted"], info["images_used"])
        ranked = list(zip(cached["layers"].tolist(), cached["neurons"].tolist(), cached["scores"].tolist()))
        return NeuronRanking(ranked=ranked, identity=backbone.identity, **info)

    _images_ready(state)
    count = (len(paths) + batch - 1) // batch
    mine = dist.my_batches(count)

    def batches():
        return state.bank.batches(paths, batch, indices=mine)

    threshold, reason = config["register_norm_threshold"], "configured"
    if threshold == "auto":
        norms = np.asarray(dist.all_gather_list(collect_norms(hooked, batches(), detect_layer).tolist()))
        threshold, reason = suggest_threshold(norms)
        if state.main:
            log.info("register_norm_threshold=auto chose %.2f: %s", threshold, reason)

    def reduce(sums, counts):
        used, counted, max_norm = counts
        total = dist.all_sum(torch.tensor([float(used), float(counted)], dtype=torch.float64))
        return dist.all_sum(sums), (int(total[0]), int(total[1]), dist.all_max(max_norm))

    mine_images = sum(len(paths[i * batch:(i + 1) * batch]) for i in mine)
    with tqdm(total=mine_images, unit="img", desc="detect register neurons", disable=not state.main) as progress:
        try:
            result = detect_register_neurons(hooked, batches(), detect_layer=detect_layer, threshold=float(threshold),
                                             progress=progress, reduce=reduce)
        except NoOutliersError as error:
            norms = np.asarray(dist.all_gather_list(collect_norms(hooked, batches(), detect_layer).tolist()))
            raise error.with_suggestion(suggest_threshold(norms)[0]) from None
    result.threshold_reason = reason
    result.extra["detection_images"] = [state.dataset.display(p) for p in paths[:1000]]
    if state.main:
        meta = {"threshold": result.threshold, "threshold_reason": reason, "detect_layer": detect_layer,
                "detect_layer_index": result.detect_layer_index, "images_used": result.images_used,
                "images_counted": result.images_counted, "max_norm_seen": result.max_norm_seen,
                "extra": result.extra}
        state.cache.save("detection", key, {
            "layers": np.array([l for l, _, _ in result.ranked], np.int32),
            "neurons": np.array([n for _, n, _ in result.ranked], np.int32),
            "scores": np.array([s for _, _, s in result.ranked], np.float64),
            "meta": np.array(json.dumps(meta))})
        log.info("detection: %d of %d images had outlier tokens", result.images_counted, result.images_used)
    return result


def _mode_setup(state: RunState, mode: str) -> ModeSetup:
    registers, intervention = mode_setup(mode, state.intervention, state.config["num_registers"])
    hooks = intervention.fwd_hooks(HookedViT(state.backbone).token_layout(registers)) if intervention else []
    return ModeSetup(registers, hooks)


def _mode_description(state: RunState, mode: str) -> dict:
    registers, intervention = mode_setup(mode, state.intervention, state.config["num_registers"])
    return {"mode": mode, "num_registers": registers,
            "intervention": intervention.describe() if intervention else None}


def stage_features(state: RunState) -> None:
    _stage(state, "extract features")
    config, dist = state.config, state.dist
    hooked = HookedViT(state.backbone)
    batch = config["batch_size"]
    state.cache_hits = {}
    for mode in state.modes:
        setup = _mode_setup(state, mode)
        for split in SPLITS:
            paths = _split_paths(state, split)
            key = cache_key({"kind": "features", **_model_description(state), **_mode_description(state, mode),
                             "images": fingerprints(paths)})
            arrays = dist.broadcast(state.cache.load("features", key) if state.main else None)
            if arrays is not None and len(arrays["pooled"]) == len(paths):
                if state.main:
                    log.info("%s %s: %d images from the feature cache (extraction skipped)", mode, split, len(paths))
                state.features[(mode, split)] = FeatureSet(arrays["pooled"], arrays["patch_mean"])
                state.cache_hits[f"{mode}/{split}"] = 1
                continue
            _images_ready(state)
            count = (len(paths) + batch - 1) // batch
            mine = dist.my_batches(count)
            parts: dict[int, FeatureSet] = {}
            with tqdm(total=len(paths), desc=f"features {mode} {split}", unit="img", disable=not state.main) as bar:
                for number, images in zip(mine, state.bank.batches(paths, batch, indices=mine)):
                    parts[number] = extract_batch(hooked, images, num_registers=setup.num_registers,
                                                  fwd_hooks=setup.fwd_hooks)
                    bar.update(images.shape[0] * dist.world)
            gathered = dist.gather_batches(parts, count)
            if gathered is not None:
                features = FeatureSet.concatenate(gathered)
                state.features[(mode, split)] = features
                state.cache.save("features", key, features.arrays())
            state.cache_hits[f"{mode}/{split}"] = 0
    if state.main:
        reused = sum(state.cache_hits.values())
        print(f"feature cache: {reused} of {len(state.cache_hits)} (mode, split) sets reused"
              + ("" if state.cache.enabled else " (cache disabled by --no_cache)"))


def _probe_config(config: dict) -> ProbeConfig:
    return ProbeConfig(
        lr_grid=tuple(config["probe_lr_grid"]), weight_decay_grid=tuple(config["probe_weight_decay_grid"]),
        max_epochs=config["probe_max_epochs"], patience=config["probe_patience"],
        min_delta=config["probe_min_delta"],
        class_weights=config["probe_class_weights"], seeds=tuple(config["probe_seeds"]),
    )


def _metric_spec(state: RunState) -> MetricSpec:
    names = state.dataset.class_names
    return MetricSpec(n_classes=len(names), qwk=state.spec.qwk,
                      manufacturer_of_class=[manufacturer_of(n) for n in names] if state.spec.manufacturer else None)


def stage_probes_and_metrics(state: RunState) -> None:
    _stage(state, "train probes")
    table, config = state.dataset.table, state.config
    labels = {split: table.loc[table["split"] == split, "label"].to_numpy() for split in SPLITS}
    class_names = state.dataset.class_names
    probabilities: dict[str, np.ndarray] = {}
    for mode in tqdm(state.modes, desc="probe per mode", unit="mode"):
        X = {split: state.features[(mode, split)].select(config["feature"]) for split in SPLITS}
        probabilities[mode], state.probe_choices[mode] = fit_probes(
            X["train"], labels["train"], X["val"], labels["val"], X["test"], len(class_names), _probe_config(config))
        stalled = [c["seed"] for c in state.probe_choices[mode] if not c.get("converged", True)]
        if stalled:
            state.not_converged.append(
                f"{mode}: probe seed(s) {stalled} reached probe_max_epochs={config['probe_max_epochs']} with the "
                "validation loss still falling (not converged; raise probe_max_epochs)")
    _stage(state, "score")
    spec = _metric_spec(state)
    metrics = evaluate_modes(labels["test"], probabilities, spec, n_boot=config["bootstrap_resamples"],
                             seed=config["seed"], baseline=BASELINE)
    extra_rows = {}
    if state.options.reference_probes:
        extra_rows[COURSE_SUFFIX] = _course_probabilities(state)
    if config["zero_shot"]:
        extra_rows[ZERO_SHOT_SUFFIX] = _zero_shot(state)
    for suffix, rows in extra_rows.items():
        metrics = pd.concat([metrics, evaluate_modes(
            labels["test"], rows, spec, n_boot=config["bootstrap_resamples"], seed=config["seed"],
            baseline=BASELINE + suffix)], ignore_index=True)
        probabilities.update(rows)
    state.metrics = metrics
    write_csv(state.options.out / "metrics.csv", metrics)
    test_paths = _split_paths(state, "test")
    for mode, per_seed in probabilities.items():
        if mode.endswith(COURSE_SUFFIX):
            continue
        ensemble = ensemble_predictions(per_seed)
        predictions = pd.DataFrame({
            "path": test_paths,
            "true": [class_names[i] for i in labels["test"]],
            "predicted": [class_names[i] for i in ensemble.argmax(axis=1)],
        })
        for index, name in enumerate(class_names):
            predictions[f"p[{name}]"] = ensemble[:, index]
        write_csv(state.options.out / predictions_file(mode), predictions)


def _course_probabilities(state: RunState) -> dict[str, np.ndarray]:
    """The course project's saved probes on this run's raw pooled test features, ``[1, N, C]`` each."""
    order = state.dataset.course_class_order
    return {mode + COURSE_SUFFIX: probe.predict_proba(state.features[(mode, "test")].pooled, order)[None]
            for mode, probe in state.course_probes.items()}


def _zero_shot(state: RunState) -> dict[str, np.ndarray]:
    """CLIP zero-shot probabilities from class-name prompts on each mode's pooled test features,
    ``[1, N, C]`` each; the prompts are written to zero_shot_prompts.json."""
    prompts = class_prompts(state.spec.name, state.dataset.class_names)
    write_json(state.options.out / "zero_shot_prompts.json", dict(zip(state.dataset.class_names, prompts)))
    text = state.backbone.text
    classes = class_embeddings(text, prompts)
    return {mode + ZERO_SHOT_SUFFIX: zero_shot_probabilities(state.features[(mode, "test")].pooled, classes,
                                                             text.logit_scale)[None]
            for mode in MODES}


def stage_analysis(state: RunState) -> list[str]:
    _stage(state, "figures and outlier statistics")
    config = state.config
    test_paths = _split_paths(state, "test")
    count = min(len(test_paths), max(int(config["analysis_images"]), int(config["figure_images"])))
    if count == 0:
        return ["## Outlier tokens and attention\n\nSkipped: no test images (or analysis_images = 0)."]
    paths = analysis_paths(test_paths, count, int(config["seed"]))
    hooked = HookedViT(state.backbone)
    figure_count = min(int(config["figure_images"]), count)
    base = {"kind": "analysis", **_model_description(state), "images": fingerprints(paths),
            "detect_layer": config["detect_outliers_layer"], "figure_images": figure_count}
    keys = {mode: cache_key({**base, **_mode_description(state, mode)}) for mode in state.modes}
    cached = {}
    for mode, key in keys.items():
        arrays = state.cache.load("analysis", key)
        if arrays is not None:
            from common.evaluation.analysis import ModeAnalysis

            cached[mode] = ModeAnalysis.from_arrays(arrays)
    analysis = analyse(
        hooked, state.bank.pixels(paths), state.bank.normalise,
        {mode: _mode_setup(state, mode) for mode in state.modes},
        labels=[state.dataset.display(p) for p in paths], threshold=_run_threshold(state),
        detect_layer=config["detect_outliers_layer"], intervened_layers=sorted(state.selected),
        figure_images=figure_count, batch_size=config["batch_size"],
        title=f"{state.spec.title}: {state.backbone.description}", cached=cached)
    for mode, key in keys.items():
        if mode not in cached:
            state.cache.save("analysis", key, analysis.modes[mode].arrays())
    if cached:
        log.info("analysis statistics of %s from the cache", ", ".join(cached))
    sections = write_outputs(analysis, state.options.out)
    state.outliers = outlier_table(analysis)
    return sections


def _run_threshold(state: RunState) -> float:
    """The threshold the run used: the detection's (also an ``auto`` choice), else the configured
    number, else NaN (the analysis chooses one from its norms)."""
    for value in (state.ranking.threshold, state.config.get("register_norm_threshold")):
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(number):
            return number
    return float("nan")


# --------------------------------------------------------------------------------------------
# config.json


def write_config(state: RunState, status: str) -> None:
    if not state.main:
        return
    backbone, options = state.backbone, state.options
    data: dict[str, Any] = {
        "dataset": state.spec.name,
        "model": options.model,
        "demo": options.demo,
        "status": status,
        "config": state.config,
        "modes": list(state.modes),
        "command_line": options.command_line,
        "python": sys.executable,
        "image_path": options.image_path,
        "manifest": options.manifest,
        "weights": options.weights,
        "neurons": options.neurons,
        "detect_path": options.detect_path,
        "reference_probes": options.reference_probes,
        "library_versions": {"python": platform.python_version(), **library_versions(RECORDED_LIBRARIES)},
        "processes": state.dist.world,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if backbone is not None:
        data.update({"device": str(backbone.device), "backbone": backbone.description,
                     "activation": backbone.activation, "precision": backbone.precision,
                     "weights_id": backbone.weights_id, "model_identity": backbone.identity.as_dict()})
    if state.dataset is not None:
        data.update({"layout": state.dataset.layout, "dataset_root": str(state.dataset.root),
                     "class_names": state.dataset.class_names, "skipped_files": len(state.dataset.skipped),
                     "leaks": len(state.dataset.leaks)})
    if state.ranking is not None:
        data["neurons_source"] = state.ranking.source
        data["register_norm_threshold_used"] = state.ranking.threshold
        data["threshold_reason"] = state.ranking.threshold_reason
    if state.selected:
        data["selected_neurons"] = {str(k): v for k, v in state.selected.items()}
    if options.demo:
        data["planted"] = [list(pair) for pair in state.planted]
    if state.cache_hits:
        data["feature_cache_hits"] = state.cache_hits
    if state.probe_choices:
        data["probe_hyperparameters"] = state.probe_choices
        data["probe_not_converged"] = state.not_converged
    if state.bank is not None:
        data["images_decoded"] = state.bank.decodes
    if state.timings:
        data["stage_seconds"] = state.timings
    write_json(options.out / "config.json", data)


# --------------------------------------------------------------------------------------------


def execute(spec: DatasetSpec, options: RunOptions, config: dict, *, device: torch.device | None = None,
            planted: PlantedModel | None = None, ranking: NeuronRanking | None = None) -> RunState:
    """Run every stage; ``planted`` replaces the backbone (and its data) in a demo, ``ranking`` is a
    ``--neurons`` ranking already read and checked."""
    modes = tuple(MODES) + tuple(m for m in config["extra_modes"] if m not in MODES)
    with distributed.session(device or torch.device("cpu")) as (dist, device):
        state = RunState(spec=spec, options=options, config=config, dist=dist, modes=modes)
        try:
            _run_stages(state, device, planted, ranking)
        except KeyboardInterrupt:
            write_config(state, "interrupted")
            raise
        except BaseException:
            if state.backbone is not None or state.dataset is not None:
                write_config(state, "failed")
            raise
        finally:
            if state.bank is not None:
                state.bank.close()
    if state.main:
        print(f"done: {options.out / 'summary.md'}")
    return state


def _run_stages(state: RunState, device: torch.device, planted: PlantedModel | None,
                ranking: NeuronRanking | None) -> None:
    options, config, dist = state.options, state.config, state.dist
    started = time.monotonic()
    if options.demo and options.image_path is None:
        options.image_path = _demo_data(state)
    stage_backbone(state, device, planted)
    stage_dataset(state)
    if options.reference_probes:   # checked against the classes and the feature width before any extraction
        state.course_probes = load_probes(options.reference_probes, len(state.dataset.class_names),
                                          state.backbone.pooled_width)
    write_config(state, "running")
    state.cache = Cache(options.cache_dir or default_cache_dir(), enabled=not options.no_cache)
    image_cache, private = state.cache, None
    if dist.world > 1 and not state.cache.enabled:
        # The ranks share decoded images through a cache: with --no_cache a private one in the
        # run folder, removed at the end.
        private = options.out / ".images-tmp"
        image_cache = Cache(private)
    state.bank = ImageBank(state.backbone.preprocess, cache=image_cache, device=state.backbone.device, dist=dist,
                           num_workers=resolve_workers(config["num_workers"], state.backbone.device.type),
                           display=state.dataset.display)
    try:
        stage_neurons(state, ranking)
        stage_features(state)
    finally:
        if private is not None:
            dist.barrier()
            if state.main:
                shutil.rmtree(private, ignore_errors=True)
    if state.main:
        stage_probes_and_metrics(state)
        sections = stage_analysis(state)
        _stage(state, "summary")
        write_summary(state, sections)
    state.timings["total"] = round(time.monotonic() - started, 2)
    write_config(state, "done")


def _demo_data(state: RunState) -> str:
    """The demo's synthetic data: rank 0 writes it, the others wait for it."""
    from common.demo.demo import demo_data

    if state.main:
        root = demo_data(state.spec.name, state.options.out, state.config["seed"])
    state.dist.barrier()
    if not state.main:
        root = demo_data(state.spec.name, state.options.out, state.config["seed"])  # complete: read back as is
    return str(root)
