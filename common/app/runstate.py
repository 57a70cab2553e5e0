"""What the stages of one run hand each other, and what config.json records of it (summary.md
reads it too: :mod:`common.reporting.summary`)."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from common.runtime import distributed
from common.app.settings import DatasetSpec, RunOptions
from common.data.cache import Cache, library_versions
from common.data.imagebank import ImageBank
from common.data.registry import Dataset
from common.evaluation.compare import SCHEMA_VERSION
from common.evaluation.localization import LocalizationResult
from common.io import write_json
from common.models.backbone import Backbone
from common.registers.controls import ControlInputs
from common.registers.features import FeatureSet
from common.registers.intervention import Intervention
from common.registers.neurons import NeuronRanking

# The versions config.json records (the cache keys hold those that change features).
RECORDED_LIBRARIES = ("torch", "torchvision", "open_clip_torch", "timm", "numpy", "pandas", "scikit-learn", "scipy",
                      "Pillow", "matplotlib")


@dataclass
class RunState:
    """What the stages of one run hand each other (and what config.json and summary.md report)."""

    spec: DatasetSpec
    options: RunOptions
    config: dict
    dist: distributed.Dist
    modes: tuple[str, ...]
    backbone: Backbone | None = None
    dataset: Dataset | None = None
    cache: Cache | None = None
    bank: ImageBank | None = None
    ranking: NeuronRanking | None = None
    selected: dict[int, list[int]] = field(default_factory=dict)
    intervention: Intervention | None = None
    controls: ControlInputs | None = None                 # what the control modes need (common.app.controls)
    features: dict[tuple[str, str], FeatureSet] = field(default_factory=dict)
    planted: list[tuple[int, int]] = field(default_factory=list)
    cache_hits: dict[str, int] = field(default_factory=dict)
    probe_choices: dict[str, list[dict]] = field(default_factory=dict)
    not_converged: list[str] = field(default_factory=list)
    metrics: pd.DataFrame | None = None
    outliers: pd.DataFrame | None = None
    localization: LocalizationResult | None = None        # docs/localization.md: None without object masks
    timings: dict[str, float] = field(default_factory=dict)
    course_probes: dict = field(default_factory=dict)     # mode -> common.evaluation.course.CourseProbe
    detection_paths: list[str] | None = None              # the images detection runs on
    refit_probabilities: dict[str, np.ndarray] = field(default_factory=dict)   # mode -> [R, N, C] per refit
    answer: list[str] = field(default_factory=list)       # the verdict lines the terminal ends with
    course_features: dict[str, FeatureSet] = field(default_factory=dict)   # mode -> test features, the course's way
    demo_check: list[str] = field(default_factory=list)   # a demo's summary lines: does it show what it should?

    @property
    def main(self) -> bool:
        return self.dist.is_main

    def split_paths(self, split: str) -> list[str]:
        """The image paths of ``split`` (train | val | test), in the dataset's order."""
        table = self.dataset.table
        return table.loc[table["split"] == split, "path"].tolist()


def write_config(state: RunState, status: str) -> None:
    """config.json of the run (rank 0), with ``status``: running, done, failed, interrupted (Ctrl-C)
    or terminated (SIGTERM)."""
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
        "schema_version": SCHEMA_VERSION,
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
    if state.course_features:
        data["course_probe_features"] = ("test features extracted the course project's way: one zero register token "
                                          "appended in both modes, the intervention in ttr only")
    if state.bank is not None:
        data["images_decoded"] = state.bank.decodes
    if state.timings:
        data["stage_seconds"] = state.timings
    write_json(options.out / "config.json", data)
