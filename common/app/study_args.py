"""The study's command line (docs/study.md): parsed and checked into a :class:`~common.app.grid.Request`
before anything runs (a bad argument is one line, exit 2).

The grid's models are ``--model`` names (presets, ``timm:<name>``, ``open_clip:<arch>:<tag>``).  A
study too big for one machine runs as a job array: ``--shard I/N`` runs the I-th of N disjoint
slices of the cells, ``--report_only`` writes the report from the cells found
(:mod:`common.app.shards`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from common.app.cli import MODELS
from common.app.grid import AXES, DEMO_AXES, DEMO_SETS, Request
from common.app.settings import parse_key_values, resolve_config, set_keys
from common.errors import UserError

DATASETS = ("pacemaker", "orthonet", "aptos")
DEFAULT_MODELS = ("clip", "dinov2")
MODEL_FORMS = f"a preset ({', '.join(MODELS)}), timm:<name> or open_clip:<arch>:<tag>"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), like every other bad argument of the study."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m common.study",
        description="Run the grid a paper needs (each dataset x each backbone x the axes you name), one ordinary "
                    "run folder per cell, resuming finished cells, then write one report (paper table with "
                    "Holm-adjusted p-values, per-class deltas, calibration, register-neuron overlap, scores by "
                    "layer, outlier statistics).")
    parser.add_argument("--data", nargs="+", default=[], metavar="DATASET=DIR",
                        help=f"dataset folders, e.g. aptos=/data/aptos; datasets: {', '.join(DATASETS)} "
                             "(with --demo: dataset names only, default all three)")
    parser.add_argument("--out", help="study folder: cells/, logs/, report/, study.json")
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help=f"models: {MODEL_FORMS}; default {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--axes", nargs="*", default=None, metavar="AXIS=V1,V2",
                        help="grid axes: " + "; ".join(
                            f"{a.name} ({', '.join(a.choices) if a.choices else f'integers >= {a.minimum}'})"
                            for a in AXES.values()) + " (--demo default: normal_values=zero,mean)")
    parser.add_argument("--zero_shot", action="store_true",
                        help="cells of models with a text tower (clip, biomedclip) also score class-name prompts, "
                             "no-ttr vs ttr (on in --demo)")
    parser.add_argument("--weights", nargs="+", default=[], metavar="MODEL[:SIZE]=PATH",
                        help="local checkpoints per model, e.g. clip=PATH uni=PATH dinov2:vitl14_reg=PATH "
                             "(MODEL=PATH serves the configured size only)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides for every cell (an axis key cannot also be set here)")
    parser.add_argument("--cache_dir", help="one cache for every cell (default: the tool's default)")
    parser.add_argument("--device", help="device of every cell: auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--demo", action="store_true",
                        help="a small grid on the planted fixture: synthetic data in each dataset's real layout "
                             "under OUT/data/, clip and dinov2, normal_values=zero,mean, trimmed statistics")
    parser.add_argument("--shard", metavar="I/N",
                        help="run only the I-th of N disjoint slices of the cells (1-based; a job array runs "
                             "every I with the same other arguments), then --report_only")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing: write the report from the cells found (after the shards of a job array)")
    return parser


def _parse_data(items: Sequence[str], demo: bool) -> dict[str, Path | None]:
    """``--data DATASET=DIR ...``; with ``--demo`` dataset names only (it generates its data)."""
    form = ("a dataset name only: --demo generates its data (e.g. --data aptos orthonet)" if demo
            else lambda key: f"{key}=DIR (the {key} dataset folder)")
    datasets: dict[str, Path | None] = {}
    for pair in parse_key_values(items, "--data", keys=DATASETS, noun="dataset", unique=True, value=not demo,
                                 form=form):
        folder = None if demo else Path(pair.value).expanduser()
        if folder is not None and not folder.is_dir():
            raise pair.error(f"no such folder {folder}; pass the {pair.key} dataset folder")
        datasets[pair.key] = folder
    return datasets


def _parse_axes(items: Sequence[str]) -> dict[str, tuple[str, ...]]:
    def form(name: str) -> str:
        return f"the values, e.g. {name}=" + ",".join((AXES[name].choices or ("10", "20"))[:2])

    axes: dict[str, tuple[str, ...]] = {}
    for pair in parse_key_values(items, "--axes", keys=tuple(AXES), noun="axis", unique=True, form=form):
        raw = [v for v in pair.value.split(",") if v.strip()]
        if not raw:
            raise pair.error(f"expected {form(pair.key)}")
        axes[pair.key] = tuple(dict.fromkeys(AXES[pair.key].parse(v) for v in raw))
    return axes


def _parse_weights(items: Sequence[str], models: Sequence[str]) -> dict[str, Path]:
    usage = f"MODEL=PATH or MODEL:SIZE=PATH with MODEL one of --models ({' '.join(models)})"
    sizes = AXES["backbone_size"].choices
    weights: dict[str, Path] = {}
    for pair in parse_key_values(items, "--weights", form=usage):
        # a model name may itself hold ":" (timm:<name>): the whole key first, then MODEL:SIZE
        model, size = (pair.key, "") if pair.key in models else pair.key.rpartition(":")[::2]
        if model not in models:
            raise pair.error(f"{model or pair.key} is not among --models ({' '.join(models)}); expected {usage}")
        if size and size not in sizes:
            raise pair.error(f"unknown size {size!r}; valid: {', '.join(sizes)}")
        path = Path(pair.value).expanduser()
        if not path.is_file():
            raise pair.error(f"no such file {path}")
        weights[pair.key] = path
    return weights


def _check_sets(sets: Sequence[str], models: Sequence[str], axes: dict[str, tuple[str, ...]],
                demo: bool) -> tuple[int, dict[str, str]]:
    """Every override valid for every model (as its runs will resolve it); returns the seed and
    each model's configured backbone_size."""
    for pair in set_keys(sets):
        if pair.key in axes:
            raise pair.error(f"{pair.key} is a grid axis here (--axes {pair.key}=...); set it in one place")
        if pair.key == "zero_shot":
            raise pair.error("use the study's --zero_shot flag (it applies to clip cells only)")
    seed, sizes = 0, {}
    for model in models:
        config = resolve_config(model, [*(DEMO_SETS if demo else ()), *sets], demo=demo)
        seed = int(config["seed"])
        if "backbone_size" in config:
            sizes[model] = str(config["backbone_size"])
    return seed, sizes


def parse_args(argv: Sequence[str]) -> Request:
    """The checked request (UserError naming the argument otherwise); runs nothing."""
    args = build_parser().parse_args(list(argv))
    if not args.out:
        raise UserError("--out is required: the study folder (cells/, report/, study.json)")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the study")
    if not args.demo and not args.data:
        raise UserError("--data is required: e.g. --data pacemaker=DIR orthonet=DIR aptos=DIR (or --demo)")
    if args.demo and args.weights:
        raise UserError("--weights: --demo runs the planted models; drop --weights")
    datasets = _parse_data(args.data, args.demo) if args.data else dict.fromkeys(DATASETS)
    models = tuple(args.models) if args.models else DEFAULT_MODELS
    from common.models.presets import family_of

    for model in models:
        try:
            family_of(model)
        except UserError:
            raise UserError(f"--models {model}: unknown model; use {MODEL_FORMS}") from None
    if len(set(models)) != len(models):
        raise UserError(f"--models {' '.join(models)}: a model is given twice")
    if args.axes is None:
        axes = dict(DEMO_AXES) if args.demo else {}
    else:
        axes = _parse_axes(args.axes)
    weights = _parse_weights(args.weights, models)
    seed, sizes = _check_sets(args.set, models, axes, args.demo)
    if args.device:
        from common.models.devices import resolve_device

        resolve_device(args.device)
    from common.app.shards import parse_shard

    if args.shard is not None and args.report_only:
        raise UserError("--shard and --report_only: a shard runs cells, --report_only runs none; give one of them")
    return Request(out=out, datasets=datasets, models=models, axes=axes, zero_shot=args.zero_shot or args.demo,
                   weights=weights, sets=tuple(args.set), cache_dir=Path(args.cache_dir).expanduser()
                   if args.cache_dir else None, device=args.device, demo=args.demo, seed=seed, default_sizes=sizes,
                   command_line=["python", "-m", "common.study", *_without_job_array(argv)],
                   shard=parse_shard(args.shard) if args.shard is not None else None, report_only=args.report_only)


def _without_job_array(argv: Sequence[str]) -> list[str]:
    """The study's command without ``--shard I/N`` and ``--report_only``: the same for every shard, the
    report and an unsharded run of the grid."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--shard":
            skip = True
        elif not (word.startswith("--shard=") or word == "--report_only"):
            kept.append(word)
    return kept


