"""The study's grid (docs/study.md): its axes, which value applies where, and each cell's run.

The grid is each given dataset x each model x the values of the axes the user names.  An axis
value applies only where it makes sense (``backbone_size`` to dinov2; ``neurons=paper`` to DINOv2
ViT-L/14 only; in a demo neither, the planted models have one size and no published neurons);
what does not apply is listed (:class:`Skipped`) with the reason, never silently dropped.

A cell's arguments are exactly what a user types after ``python test_<dataset>.py``, every path
absolute, so its command re-runs the cell alone from the repository root.  Cell names:
``<dataset>_<model>`` then ``_<axis>-<value>`` for each applicable axis in the order given, e.g.
``aptos_dinov2_backbone_size-vitl14_reg_top_k-20``.
"""

from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError

# The demo grid: one axis, the question of Parodi et al. (zeroing is out of distribution).
DEMO_AXES = {"normal_values": ("zero", "mean")}
# The demo's trimmed statistics (one probe seed, fewer resamples, one figure image): the grid of
# 12 cells then fits in a few minutes on 2 cores.
DEMO_SETS = ("probe_seeds=(0,)", "bootstrap_resamples=200", "figure_images=1", "analysis_images=16")


@dataclass(frozen=True)
class Axis:
    """One optional grid axis: its values, the run arguments of a value, and where it applies."""

    name: str
    choices: tuple[str, ...] | None          # None: any positive integer
    models: tuple[str, ...] | None           # None: every model
    explain: str                             # why it does not apply to the other models

    def parse(self, raw: str) -> str:
        value = raw.strip()
        if self.choices is None:
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"--axes {self.name}: value {raw!r} is not a positive integer")
            return str(int(value))
        if value not in self.choices:
            raise UserError(f"--axes {self.name}: unknown value {raw!r}; valid: {', '.join(self.choices)}")
        return value

    def arguments(self, value: str) -> list[str]:
        """What a user types for this value after ``test_<dataset>.py``."""
        if self.name == "neurons":
            return ["--neurons", "paper"] if value == "paper" else []
        return ["--set", f"{self.name}={value}"]


def _axes() -> dict[str, Axis]:
    from common.app.settings import choices
    from common.models.dinov2 import ARCHS

    words = choices()
    return {
        "normal_values": Axis("normal_values", tuple(words["normal_values"]), None, ""),
        "backbone_size": Axis("backbone_size", tuple(ARCHS), ("dinov2",),
                              "backbone_size names DINOv2 sizes (and their trained-register *_reg variants); "
                              "this model has one backbone, run once"),
        "neurons": Axis("neurons", ("detected", "paper"), None, ""),
        "top_k": Axis("top_k", None, None, ""),
        "feature": Axis("feature", tuple(words["feature"]), None, ""),
    }


AXES: dict[str, Axis] = _axes()
PAPER_NEURON_COUNT = 45  # the published DINOv2 ViT-L/14 set (common.registers.neurons.PAPER_NEURONS_DINOV2_VITL14)


@dataclass
class Request:
    """The parsed, checked study arguments."""

    out: Path
    datasets: dict[str, Path | None]          # dataset -> folder (None in a demo: generated)
    models: tuple[str, ...]
    axes: dict[str, tuple[str, ...]]          # axis -> values, in the order given
    zero_shot: bool = False
    weights: dict[str, Path] = field(default_factory=dict)   # "clip" / "dinov2" / "dinov2:vitl14_reg"
    sets: tuple[str, ...] = ()
    cache_dir: Path | None = None
    device: str | None = None
    demo: bool = False
    seed: int = 0
    default_sizes: dict[str, str] = field(default_factory=dict)   # model -> configured backbone_size
    command_line: list[str] = field(default_factory=list)


@dataclass
class Cell:
    """One run of the grid and what became of it."""

    name: str
    dataset: str
    model: str
    settings: dict[str, str]                  # applicable axis -> value
    argv: list[str]                           # after ``test_<dataset>.py``
    folder: str
    main: bool = True                         # a main cell: every axis at its main value (:func:`main_values`)
    status: str = "pending"                   # pending | done | resumed | failed | interrupted
    exit_code: int | None = None
    error: str = ""
    seconds: float | None = None

    @property
    def script(self) -> str:
        return f"test_{self.dataset}.py"

    def command(self) -> str:
        """The shell command that re-runs this cell alone (from the repository root)."""
        return shlex.join(["python", self.script, *self.argv])


@dataclass
class Skipped:
    """A combination of the grid that is not run, and why."""

    dataset: str
    model: str
    combination: str
    reason: str


def cell_name(dataset: str, model: str, settings: dict[str, str]) -> str:
    """``<dataset>_<model>`` then ``_<axis>-<value>`` per applicable axis (order as given)."""
    return "_".join([dataset, model, *(f"{axis}-{value}" for axis, value in settings.items())])


def _weights_for(request: Request, model: str, size: str | None) -> Path | None:
    """``MODEL:SIZE=PATH`` for that size; ``MODEL=PATH`` for the configured size only (a ViT-L/14
    checkpoint cannot serve a vitl14_reg cell)."""
    configured = request.default_sizes.get(model)
    size = size or configured
    if size and f"{model}:{size}" in request.weights:
        return request.weights[f"{model}:{size}"]
    if size == configured:
        return request.weights.get(model)
    return None


def _cell_argv(request: Request, dataset: str, model: str, settings: dict[str, str], folder: Path) -> list[str]:
    from common.models.families import get_family

    argv = ["--model", model]
    if request.demo:
        argv.append("--demo")
    data = request.datasets[dataset] if not request.demo else request.out / "data" / dataset
    argv += ["--image_path", str(Path(data).resolve()), "--out", str(folder.resolve())]
    if request.cache_dir is not None:
        argv += ["--cache_dir", str(request.cache_dir.resolve())]
    if request.device:
        argv += ["--device", request.device]
    weights = _weights_for(request, model, settings.get("backbone_size"))
    if weights is not None:
        argv += ["--weights", str(weights.resolve())]
    if request.zero_shot and get_family(model).supports_zero_shot:
        argv.append("--zero_shot")
    for item in (*DEMO_SETS, *request.sets) if request.demo else request.sets:
        argv += ["--set", item]
    for axis, value in settings.items():
        argv += AXES[axis].arguments(value)
    return argv


def _combo_rule(request: Request, model: str, combo: dict[str, str]) -> tuple[dict[str, str] | None, str, str]:
    """The settings a combination runs with (None: skipped), the reason when it is skipped or
    reduced, and the axis values that cause it."""
    if combo.get("neurons") != "paper":
        return combo, "", ""
    if model != "dinov2":
        return None, (f"the published register neurons are DINOv2 ViT-L/14's (found on ImageNet); {model} "
                      "has none: its cells detect theirs"), "neurons=paper"
    if request.demo:
        return None, "the demo's planted model has no published neurons (they index DINOv2 ViT-L/14)", "neurons=paper"
    size = combo.get("backbone_size", request.default_sizes.get("dinov2"))
    if size != "vitl14":
        return None, (f"the published neurons index DINOv2 ViT-L/14 without trained registers; "
                      f"backbone_size={size} is another model"), f"neurons=paper, backbone_size={size}"
    if "top_k" in combo:
        reduced = {axis: value for axis, value in combo.items() if axis != "top_k"}
        return reduced, (f"the published set ({PAPER_NEURON_COUNT} neurons, listed by layer, not ranked) is used "
                         "whole with the configured top_k; top_k would cut it in published order, so it runs once "
                         "as {cell}"), f"neurons=paper, top_k={combo['top_k']}"
    return combo, "", ""


def main_values(request: Request, model: str) -> dict[str, str]:
    """Per axis the value of the main cells (the datasets x models the study lists; Holm runs over
    their primary metric, the other values are sensitivity analyses): the model's configured value
    when it is among the axis's values (``neurons``: detected), else the first value given."""
    from common.app.settings import resolve_config

    config = resolve_config(model, [*(DEMO_SETS if request.demo else ()), *request.sets], demo=request.demo)
    configured = {axis: str(config.get(axis, "detected" if axis == "neurons" else "")) for axis in request.axes}
    return {axis: configured[axis] if configured[axis] in values else values[0]
            for axis, values in request.axes.items()}


def plan_grid(request: Request) -> tuple[list[Cell], list[Skipped]]:
    """The cells (each dataset x each model x the applicable axis values) and what is skipped."""
    cells: list[Cell] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    mains = {model: main_values(request, model) for model in request.models} if request.axes else {}
    for dataset in request.datasets:
        for model in request.models:
            axes = {}
            for axis, values in request.axes.items():
                rule = AXES[axis]
                if axis == "backbone_size" and request.demo:
                    skipped.append(Skipped(dataset, model, f"{axis}={','.join(values)}",
                                           "the demo's planted models have one size; run once"))
                elif rule.models is not None and model not in rule.models:
                    skipped.append(Skipped(dataset, model, f"{axis}={','.join(values)}",
                                           f"applies to {', '.join(rule.models)} only: {rule.explain}"))
                else:
                    axes[axis] = values
            for values in itertools.product(*axes.values()):
                combo = dict(zip(axes, values))
                settings, reason, cause = _combo_rule(request, model, combo)
                name = cell_name(dataset, model, settings) if settings is not None else ""
                if reason:
                    entry = Skipped(dataset, model, cause, reason.format(cell=name))
                    if entry not in skipped:   # one line per cause, not per combination of the other axes
                        skipped.append(entry)
                if settings is None or name in seen:
                    continue
                seen.add(name)
                folder = request.out / "cells" / name
                main = all(mains[model].get(axis) == value for axis, value in settings.items())
                cells.append(Cell(name, dataset, model, settings,
                                  _cell_argv(request, dataset, model, settings, folder), str(folder.resolve()),
                                  main=main))
    return cells, skipped
