"""What the stages of one run hand each other (and what config.json and summary.md report)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from common import distributed
from common.app.options import DatasetSpec, RunOptions
from common.data.cache import Cache
from common.data.imagebank import ImageBank
from common.data.registry import Dataset
from common.models.backbone import Backbone
from common.registers.features import FeatureSet
from common.registers.intervention import Intervention
from common.registers.neurons import NeuronRanking


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
    features: dict[tuple[str, str], FeatureSet] = field(default_factory=dict)
    planted: list[tuple[int, int]] = field(default_factory=list)
    cache_hits: dict[str, int] = field(default_factory=dict)
    probe_choices: dict[str, list[dict]] = field(default_factory=dict)
    not_converged: list[str] = field(default_factory=list)
    metrics: pd.DataFrame | None = None
    outliers: pd.DataFrame | None = None
    timings: dict[str, float] = field(default_factory=dict)
    course_probes: dict = field(default_factory=dict)     # mode -> common.evaluation.course.CourseProbe
    detection_paths: list[str] | None = None              # the images detection runs on

    @property
    def main(self) -> bool:
        return self.dist.is_main
