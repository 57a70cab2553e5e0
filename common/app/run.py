"""One run of docs/run.md: backbone -> data -> images -> register neurons -> features -> probes ->
metrics -> figures -> summary.

Each image is decoded once (:class:`common.data.imagebank.ImageBank`); detection, features and the
analysis statistics are cached under keys of everything that changes them
(:func:`common.app.stages.cached_stage`), so a re-run with the same inputs recomputes nothing and
an interrupted run resumes from what was complete.  Under torchrun, decoding, detection and
extraction are split over the ranks by whole batches (:func:`common.app.stages.my_batches`) and
rank 0 does the rest (probes and scores: :mod:`common.app.scoring`) and writes every file
(config.json: :mod:`common.app.runstate`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common.runtime import distributed
from common.app.controls import analysis_setup, control_inputs, figure_modes, mode_run, run_modes
from common.app.localize import localization_paths, write_localization
from common.app.runstate import RunState, write_config
from common.app.scoring import score, train_probes
from common.app.settings import DatasetSpec, RunOptions, resolve_primary_metric, resolve_workers
from common.app.stages import announce, cached_stage, detection_paths, fingerprints, model_description, my_batches
from common.data.cache import Cache, default_cache_dir
from common.data.imagebank import ImageBank
from common.data.registry import SPLITS, Dataset, load_dataset, write_splits
from common.demo.fixture import PlantedModel
from common.errors import Terminated, UserError
from common.evaluation.analysis import ModeAnalysis, ModeSetup, analyse, analysis_paths, outlier_table
from common.evaluation.course import load_probes
from common.models.backbone import Backbone, load_backbone
from common.models.hooks import HookedViT
from common.registers.detection import (
    NoOutliersError,
    collect_norms,
    detect_register_neurons,
    detection_batch_size,
    suggest_threshold,
)
from common.registers.controls import ModeRun, extract_mode_batch, mode_setup
from common.registers.features import FeatureSet
from common.registers.intervention import Intervention
from common.registers.modes import MODES
from common.registers.neurons import NeuronRanking
from common.registers.trained import TrainedRegisterStats
from common.reporting.plots import write_outputs
from common.reporting.summary import write_summary

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# stages


def stage_backbone(state: RunState, device: torch.device, planted: PlantedModel | None) -> Backbone:
    announce(state, "load backbone")
    if planted is not None:
        backbone = planted.backbone
    else:
        with tqdm(total=1, desc="load backbone", unit="model", disable=not state.main) as progress:
            backbone = load_backbone(state.options.model, state.config, device=device,
                                     weights=state.options.weights, precision=state.config["precision"])
            progress.update(1)
    if state.main:
        log.info("backbone: %s on %s (activation %s, precision %s)", backbone.description, backbone.device,
                 backbone.activation, backbone.precision)
    return backbone


def stage_dataset(state: RunState) -> Dataset:
    announce(state, "load dataset and split")
    config = state.config
    dataset = load_dataset(
        state.spec.name, state.options.image_path, manifest=state.options.manifest, seed=config["seed"],
        val_fraction=config["val_fraction"], test_fraction=config["test_fraction"], strict=state.options.strict)
    if state.main:
        log.info("dataset: %s, %d images, %d classes", dataset.layout, len(dataset.table), len(dataset.class_names))
        write_splits(dataset, state.options.out / "splits.csv")
    counts = dataset.table["split"].value_counts()
    for split in SPLITS:
        if counts.get(split, 0) == 0:
            raise UserError(f"the {split} split of {dataset.root} is empty; add images or use a manifest")
    return dataset


def stage_neurons(state: RunState, preloaded: NeuronRanking | None) -> NeuronRanking:
    announce(state, "register neurons")
    if preloaded is None:
        return _detect(state)
    if state.main:
        log.info("register neurons from %s", preloaded.source)
    return preloaded


def select_neurons(state: RunState) -> dict[int, list[int]]:
    """The ranking's first ``top_k`` at or below ``highest_layer`` (``{layer: [neuron, ...]}``);
    register_neurons.json written."""
    config, ranking = state.config, state.ranking
    selected = ranking.select(config["highest_layer"], config["top_k"])
    if not selected:
        layers = sorted({int(layer) for layer, _, _ in ranking.ranked[:config["top_k"]]})
        raise UserError(f"no register neuron at or below highest_layer={config['highest_layer']}: the ranking "
                        f"({ranking.source}) has its top {config['top_k']} in layers {layers}; the method keeps only "
                        "layers at or below highest_layer, so check that the ranking belongs to this model and "
                        "dataset, or set highest_layer to the deepest layer the method may use")
    above = ranking.above_highest_layer(config["highest_layer"], config["top_k"])
    if state.main:
        total = sum(len(ids) for ids in selected.values())
        log.info("selected %d register neurons in layers %s", total, sorted(selected))
        if above:
            log.warning("%d of the top %d ranked neurons lie above highest_layer=%d (best score %.3g) and are not "
                        "selected, as the method intends (listed in register_neurons.json; the study's "
                        "highest_layer axis measures what including them changes)", len(above), config["top_k"],
                        config["highest_layer"], max(s for _, _, s in above))
        target = state.options.out / "register_neurons.json"
        source = state.options.neurons
        if source and source != "paper" and Path(source).resolve() == target.resolve():
            log.info("register_neurons.json is the --neurons file itself; left as it is")
        else:
            ranking.save(target, config["highest_layer"], config["top_k"])
    return selected


def _detect(state: RunState) -> NeuronRanking:
    config, backbone = state.config, state.backbone
    paths = detection_paths(state)
    detect_layer = config["detect_outliers_layer"]
    description = {"kind": "detection", **model_description(state), "images": fingerprints(paths),
                   "detect_layer": detect_layer, "threshold": config["register_norm_threshold"],
                   "sparsity": [0.5, 0.5]}

    def decode(arrays: dict[str, np.ndarray]) -> NeuronRanking:
        info = json.loads(arrays["meta"].item())
        if config["register_norm_threshold"] != "auto":   # where the number came from is this run's to say
            info["threshold_reason"] = setting_source(state, "register_norm_threshold")
        if state.main:
            log.info("detection: from the cache (%d of %d images counted)", info["images_counted"], info["images_used"])
        ranked = list(zip(arrays["layers"].tolist(), arrays["neurons"].tolist(), arrays["scores"].tolist()))
        return NeuronRanking(ranked=ranked, identity=backbone.identity, trained=TrainedRegisterStats.from_arrays(arrays),
                             **info)

    ranking, _ = cached_stage(state, "detection", description, lambda: _detect_uncached(state, paths),
                              encode=_ranking_arrays, decode=decode)
    return ranking


def _detect_uncached(state: RunState, paths: list[str]) -> NeuronRanking:
    """Detection over ``paths``, each rank on its share of the batches, the sums reduced over the ranks."""
    config, dist = state.config, state.dist
    hooked = HookedViT(state.backbone)
    batch = detection_batch_size(state.backbone, config["batch_size"])
    detect_layer = config["detect_outliers_layer"]
    _, mine = my_batches(state, paths, batch)

    def batches():
        return state.bank.batches(paths, batch, indices=mine)

    threshold, reason = config["register_norm_threshold"], setting_source(state, "register_norm_threshold")
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
        log.info("detection: %d of %d images had outlier tokens", result.images_counted, result.images_used)
    return result


def _ranking_arrays(result: NeuronRanking) -> dict[str, np.ndarray]:
    """A detected ranking as a cache entry (read back by :func:`_detect`)."""
    meta = {"threshold": result.threshold, "threshold_reason": result.threshold_reason,
            "detect_layer": result.detect_layer, "detect_layer_index": result.detect_layer_index,
            "images_used": result.images_used, "images_counted": result.images_counted,
            "max_norm_seen": result.max_norm_seen, "extra": result.extra}
    return {"layers": np.array([l for l, _, _ in result.ranked], np.int32),
            "neurons": np.array([n for _, n, _ in result.ranked], np.int32),
            "scores": np.array([s for _, _, s in result.ranked], np.float64),
            "meta": np.array(json.dumps(meta)), **(result.trained.arrays() if result.trained is not None else {})}


def stage_features(state: RunState) -> tuple[dict[tuple[str, str], FeatureSet], dict[str, int]]:
    """Every (mode, split)'s features (on rank 0; on the other ranks those read from the cache),
    and which came from the cache (``"mode/split": 1``).  With ``--reference_probes`` also the
    test features extracted the course project's way (``state.course_features``)."""
    announce(state, "extract features")
    features: dict[tuple[str, str], FeatureSet] = {}
    hits: dict[str, int] = {}
    for mode in state.modes:
        setup = mode_run(state, mode)
        for split in SPLITS:
            found, hits[f"{mode}/{split}"] = _features(state, state.split_paths(split), setup,
                                                     f"{mode} {split}")
            if found is not None:
                features[(mode, split)] = found
    for mode in state.course_probes:
        setup = _course_setup(state, mode)
        if setup.describe() == mode_run(state, mode).describe():      # our own test features are the course's
            state.course_features[mode] = features.get((mode, "test"))
            continue
        label = f"{mode} (course: {COURSE_REGISTERS} zero register) test"
        state.course_features[mode], hits[f"{mode} (course)/test"] = _features(
            state, state.split_paths("test"), setup, label)
    if state.main:
        print(f"feature cache: {sum(hits.values())} of {len(hits)} (mode, split) sets reused"
              + ("" if state.cache.enabled else " (cache disabled by --no_cache)"))
    return features, hits


def _features(state: RunState, paths: list[str], setup: ModeRun, label: str) -> tuple[FeatureSet | None, int]:
    """The features of ``paths`` in one setup, from the cache or extracted: (them, 1 if cached)."""
    description = {"kind": "features", **model_description(state), **setup.describe(), "images": fingerprints(paths)}
    found, hit = cached_stage(
        state, "features", description, lambda: _extract(state, paths, setup, f"features {label}"),
        encode=FeatureSet.arrays, decode=lambda arrays: FeatureSet(arrays["pooled"], arrays["patch_mean"]),
        usable=lambda arrays: len(arrays["pooled"]) == len(paths))
    if hit and state.main:
        log.info("%s: %d images from the feature cache (extraction skipped)", label, len(paths))
    return found, int(hit)


# The course project's code appends one zero register token in both of its modes
# (``run_model(..., num_registers=1)``): its saved probes were trained on such features.
COURSE_REGISTERS = 1


def _course_setup(state: RunState, mode: str) -> ModeRun:
    """How the course project extracted ``mode``'s features: one zero register appended, the
    intervention in ttr only (no-ttr: the register is appended, nothing is moved onto it)."""
    return replace(mode_setup(mode, state.intervention, COURSE_REGISTERS), num_registers=COURSE_REGISTERS)


def _extract(state: RunState, paths: list[str], setup: ModeRun, desc: str) -> FeatureSet | None:
    """Features of ``paths``: each rank extracts its share of the batches, rank 0 gathers them (None elsewhere)."""
    hooked, dist, batch = HookedViT(state.backbone), state.dist, state.config["batch_size"]
    count, mine = my_batches(state, paths, batch)
    parts: dict[int, FeatureSet] = {}

    def donor(number: int):   # the last image of the previous batch (a shuffle's batch of one)
        return lambda: state.bank.normalise(state.bank.pixels([paths[number * batch - 1]]))

    with tqdm(total=len(paths), desc=desc, unit="img", disable=not state.main) as bar:
        for number, images in zip(mine, state.bank.batches(paths, batch, indices=mine)):
            parts[number] = extract_mode_batch(hooked, images, setup, number, donor(number))
            bar.update(images.shape[0] * dist.world)
    gathered = dist.gather_batches(parts, count)
    return FeatureSet.concatenate(gathered) if gathered is not None else None


def stage_analysis(state: RunState) -> tuple[list[str], pd.DataFrame | None]:
    """The outlier statistics and figures on a sample of test images (rank 0): the summary's
    sections and the outlier table (None when skipped).  Each mode's statistics are cached."""
    announce(state, "figures and outlier statistics")
    config = state.config
    test_paths = state.split_paths("test")
    count = min(len(test_paths), max(config["analysis_images"], config["figure_images"]))
    if count == 0:
        return ["## Outlier tokens and attention\n\nSkipped: no test images (or analysis_images = 0)."], None
    paths = analysis_paths(test_paths, count, config["seed"])
    extra = [p for p in localization_paths(state) if p not in paths]   # their attention maps only
    hooked = HookedViT(state.backbone)
    figure_count = min(config["figure_images"], count)
    base = {"kind": "analysis", **model_description(state), "images": fingerprints(paths),
            "detect_layer": config["detect_outliers_layer"], "figure_images": figure_count,
            "localization_images": fingerprints(extra)}
    pixels, extra_pixels = state.bank.pixels(paths), state.bank.pixels(extra)
    setups = {mode: analysis_setup(state, mode) for mode in state.modes}

    def run(modes: dict[str, ModeSetup], cached: dict[str, ModeAnalysis] | None = None):
        return analyse(hooked, pixels, state.bank.normalise, modes, labels=[state.dataset.display(p) for p in paths],
                       threshold=_run_threshold(state), detect_layer=config["detect_outliers_layer"],
                       intervened_layers=sorted(state.selected), figure_images=figure_count,
                       batch_size=config["batch_size"], title=f"{state.spec.title}: {state.backbone.description}",
                       cached=cached, extra_pixels=extra_pixels,
                       extra_labels=[state.dataset.display(p) for p in extra])

    results, reused = {}, []
    for mode, setup in setups.items():
        results[mode], hit = cached_stage(
            state, "analysis", {**base, **mode_run(state, mode).describe()},
            lambda: run({mode: setup}).modes[mode], encode=ModeAnalysis.arrays, decode=ModeAnalysis.from_arrays,
            shared=False)
        reused += [mode] if hit else []
    if reused:
        log.info("analysis statistics of %s from the cache", ", ".join(reused))
    analysis = run(setups, cached=results)     # every mode at hand: assembles, runs no pass
    # the controls' outlier shares go to controls.csv, not to the figures, outliers.csv and localization.csv
    shown = figure_modes(analysis)
    write_localization(state, shown)           # localization.csv, from the attention maps at hand
    return write_outputs(shown, state.options.out), outlier_table(analysis)


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


def execute(spec: DatasetSpec, options: RunOptions, config: dict, *, device: torch.device | None = None,
            planted: PlantedModel | None = None, ranking: NeuronRanking | None = None) -> RunState:
    """Run every stage; ``planted`` replaces the backbone (and its data) in a demo, ``ranking`` is a
    ``--neurons`` ranking already read and checked."""
    config["primary_metric"] = resolve_primary_metric(config, spec)   # config.json records the one used
    modes = tuple(MODES) + tuple(m for m in config["extra_modes"] if m not in MODES)
    with distributed.session(device or torch.device("cpu")) as (dist, device):
        state = RunState(spec=spec, options=options, config=config, dist=dist, modes=modes)
        try:
            _run_stages(state, device, planted, ranking)
        except Terminated:
            _record_stop(state, "terminated")
            raise
        except KeyboardInterrupt:
            _record_stop(state, "interrupted")
            raise
        except BaseException:
            if state.backbone is not None or state.dataset is not None:
                _record_stop(state, "failed")
            raise
        finally:
            if state.bank is not None:
                state.bank.close()
    if state.main:
        print(f"done: {options.out / 'summary.md'}")
        for line in state.answer:   # the verdict on the primary metric: the run's last words
            print(f"answer{' (demo: synthetic data, planted model)' if options.demo else ''}: {line}")
    return state


def _record_stop(state: RunState, status: str) -> None:
    """config.json saying why the run stopped; a failure to write it (the disk that stopped the run
    is full) must not replace the error the user needs to see."""
    try:
        write_config(state, status)
    except OSError as error:
        log.debug("config.json could not record status %s: %s", status, error)


def _run_stages(state: RunState, device: torch.device, planted: PlantedModel | None,
                ranking: NeuronRanking | None) -> None:
    options, config, dist = state.options, state.config, state.dist
    started = time.monotonic()
    if options.demo and options.image_path is None:
        options.image_path = _demo_data(state)
    state.backbone = stage_backbone(state, device, planted)
    state.modes = run_modes(state)
    state.planted = list(planted.planted) if planted is not None else []
    state.dataset = stage_dataset(state)
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
        state.ranking = stage_neurons(state, ranking)
        state.selected = select_neurons(state)
        state.intervention = Intervention.from_config(state.selected, config)
        state.controls = control_inputs(state, lambda: detection_paths(state))
        state.features, state.cache_hits = stage_features(state)
    finally:
        if private is not None:
            dist.barrier()
            if state.main:
                shutil.rmtree(private, ignore_errors=True)
    if state.main:
        announce(state, "train probes")
        probabilities = train_probes(state)
        announce(state, "score")
        state.metrics = score(state, probabilities)
        sections, state.outliers = stage_analysis(state)
        if options.demo:
            state.demo_check = _demo_check(state)
        announce(state, "summary")
        state.answer = write_summary(state, sections)
    state.timings["total"] = round(time.monotonic() - started, 2)
    write_config(state, "done")


def setting_source(state: RunState, key: str) -> str:
    """Where a config value came from, as the summary names it: the command line, the demo's
    settings, or configs.py."""
    if key in state.options.overrides:
        return "set on the command line"
    return "demo setting" if state.options.demo else "configured"


def _demo_check(state: RunState) -> list[str]:
    """The demo summary's lines on what a correct demo shows and whether this run shows it."""
    from common.demo.demo import demo_check

    outliers = state.outliers.set_index("mode") if state.outliers is not None else None
    tokens = HookedViT(state.backbone).token_layout(state.config["num_registers"]).total
    return demo_check(state.planted, state.ranking.ranked, outliers, _run_threshold(state), tokens)


def _demo_data(state: RunState) -> str:
    """The demo's synthetic data: rank 0 writes it, the others wait for it."""
    from common.demo.demo import demo_data

    if state.main:
        root = demo_data(state.spec.name, state.options.out, state.config["seed"])
    state.dist.barrier()
    if not state.main:
        root = demo_data(state.spec.name, state.options.out, state.config["seed"])  # complete: read back as is
    return str(root)
