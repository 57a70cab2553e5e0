"""The study's grid (docs/study.md): its axes, which value applies where, and each cell's run.

The grid is each given dataset x each model x the values of the axes the user names.  An axis
value applies only where it makes sense, decided from the model's config and identity, never its
name: ``backbone_size`` to models configured by size (DINOv2, DINOv3), each value only where it is
one of that family's sizes; ``neurons=paper`` only where the cell's model is DINOv2 ViT-L/14
(the published set indexes it); ``highest_layer`` values only within the cell's model's depth;
``controls`` (off | on: ``--controls``) to every model, each run taking the controls that apply to
its model (the trained-register ones only where it has trained registers); in
a demo no ``backbone_size`` and no published neurons (the planted models have one size).  What does
not apply is listed (:class:`Skipped`) with the reason, never silently dropped.

A cell's arguments are exactly what a user types after ``python test_<dataset>.py``, every path
absolute, so its command re-runs the cell alone from the repository root.  Cell names:
``<dataset>_<model>`` (``:`` and ``/`` of ``timm:<name>`` written ``-``) then ``_<axis>-<value>``
for each applicable axis in the order given, e.g. ``aptos_dinov2_backbone_size-vitl14_reg_top_k-20``.
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
    """One optional grid axis: its values and the run arguments of a value."""

    name: str
    choices: tuple[str, ...] | None          # None: any integer >= minimum
    minimum: int = 1

    def parse(self, raw: str) -> str:
        value = raw.strip()
        if self.choices is None:
            if not value.isdigit() or int(value) < self.minimum:
                raise UserError(f"--axes {self.name}: value {raw!r} is not an integer >= {self.minimum}")
            return str(int(value))
        if value not in self.choices:
            raise UserError(f"--axes {self.name}: unknown value {raw!r}; valid: {', '.join(self.choices)}")
        return value

    def arguments(self, value: str) -> list[str]:
        """What a user types for this value after ``test_<dataset>.py``."""
        if self.name == "neurons":
            return ["--neurons", "paper"] if value == "paper" else []
        if self.name == "controls":
            return ["--controls"] if value == "on" else []
        return ["--set", f"{self.name}={value}"]


def _axes() -> dict[str, Axis]:
    from common.app.settings import choices
    from common.models.families import FAMILIES

    words = choices()
    sizes = tuple(dict.fromkeys(size for family in FAMILIES.values() for size in getattr(family, "sizes", {})))
    return {
        "normal_values": Axis("normal_values", tuple(words["normal_values"])),
        "backbone_size": Axis("backbone_size", sizes),
        "neurons": Axis("neurons", ("detected", "paper")),
        "top_k": Axis("top_k", None),
        "feature": Axis("feature", tuple(words["feature"])),
        "highest_layer": Axis("highest_layer", None, minimum=0),
        "controls": Axis("controls", ("off", "on")),
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
    weights: dict[str, Path] = field(default_factory=dict)   # "clip" / "uni" / "dinov2:vitl14_reg"
    sets: tuple[str, ...] = ()
    cache_dir: Path | None = None
    device: str | None = None
    demo: bool = False
    seed: int = 0
    default_sizes: dict[str, str] = field(default_factory=dict)   # model -> configured backbone_size
    command_line: list[str] = field(default_factory=list)     # without --shard and --report_only
    shard: tuple[int, int] | None = None                     # (I, N): run the I-th of N slices of the cells
    report_only: bool = False                                # run nothing, report the cells found
    _identities: dict = field(default_factory=dict, repr=False, compare=False)

    def identity(self, model: str, size: str | None):
        """The identity of ``model`` (at ``size``) as its cells run it (with ``--set``; the planted
        model in a demo); computed once."""
        key = (model, size)
        if key not in self._identities:
            from common.app.settings import resolve_config
            from common.models.presets import family_class

            if self.demo:
                from common.demo.demo import demo_model

                identity = demo_model(model, seed=self.seed).backbone.identity
            else:
                sets = [*self.sets, *([f"backbone_size={size}"] if size else [])]
                identity = family_class(model).identity(resolve_config(model, sets))
            self._identities[key] = identity
        return self._identities[key]


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
    from common.models.presets import model_slug

    return "_".join([dataset, model_slug(model), *(f"{axis}-{value}" for axis, value in settings.items())])


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
    from common.models.presets import family_class

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
    if request.zero_shot and family_class(model).supports_zero_shot:
        argv.append("--zero_shot")
    for item in (*DEMO_SETS, *request.sets) if request.demo else request.sets:
        argv += ["--set", item]
    for axis, value in settings.items():
        argv += AXES[axis].arguments(value)
    return argv


def _combo_rule(request: Request, model: str, combo: dict[str, str]) -> tuple[dict[str, str] | None, str, str]:
    """The settings a combination runs with (None: skipped), the reason when it is skipped or
    reduced, and the axis values that cause it."""
    size = combo.get("backbone_size", request.default_sizes.get(model))
    if "highest_layer" in combo:
        layers = request.identity(model, combo.get("backbone_size")).layers
        if int(combo["highest_layer"]) >= layers:
            where = f"{model} at backbone_size={size}" if "backbone_size" in combo else model
            sized = f", backbone_size={size}" if "backbone_size" in combo else ""
            return None, f"{where} has {layers} layers (highest_layer 0..{layers - 1})", \
                f"highest_layer={combo['highest_layer']}{sized}"
    if combo.get("neurons") != "paper":
        return combo, "", ""
    if request.demo:
        return None, "the demo's planted model has no published neurons (they index DINOv2 ViT-L/14)", "neurons=paper"
    from common.registers.neurons import PAPER_IDENTITY

    identity = request.identity(model, combo.get("backbone_size"))
    if not identity.same_model(PAPER_IDENTITY):
        cause = "neurons=paper" + (f", backbone_size={size}" if "backbone_size" in combo else "")
        return None, ("the published register neurons (found on ImageNet) index DINOv2 ViT-L/14 "
                      f"({PAPER_IDENTITY.describe()}); {model}" + (f" at backbone_size={size}" if size else "")
                      + f" is another model ({identity.describe()}): its cells detect theirs"), cause
    if "top_k" in combo:
        reduced = {axis: value for axis, value in combo.items() if axis != "top_k"}
        return reduced, (f"the published set ({PAPER_NEURON_COUNT} neurons, listed by layer, not ranked) is used "
                         "whole with the configured top_k; top_k would cut it in published order, so it runs once "
                         "as {cell}"), f"neurons=paper, top_k={combo['top_k']}"
    return combo, "", ""


def _applicable(request: Request, model: str, axis: str, values: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """The values of ``axis`` that apply to ``model``, and why the others do not ("" when all do)."""
    if axis != "backbone_size":
        return values, ""
    if request.demo:
        return (), "the demo's planted models have one size; run once"
    if model not in request.default_sizes:
        return (), f"{model} is not configured by backbone_size (DINOv2 and DINOv3 sizes); run once"
    from common.models.presets import family_class

    sizes = getattr(family_class(model), "sizes", {})
    valid = tuple(v for v in values if v in sizes)
    return valid, ("" if len(valid) == len(values) else f"not a size of {model} (its sizes: {', '.join(sizes)})")


def main_values(request: Request, model: str) -> dict[str, str]:
    """Per axis the value of the main cells (the datasets x models the study lists; Holm runs over
    their primary metric, the other values are sensitivity analyses): the model's configured value
    when it is among the axis's values (``neurons``: detected), else the first value given."""
    from common.app.settings import resolve_config

    config = resolve_config(model, [*(DEMO_SETS if request.demo else ()), *request.sets], demo=request.demo)
    configured = {axis: str(config.get(axis, "detected" if axis == "neurons" else "")) for axis in request.axes}
    if "controls" in configured:
        configured["controls"] = "on" if config.get("controls") else "off"
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
                valid, reason = _applicable(request, model, axis, values)
                if reason:
                    left_out = [v for v in values if v not in valid]
                    skipped.append(Skipped(dataset, model, f"{axis}={','.join(left_out)}", reason))
                if valid:
                    axes[axis] = valid
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
