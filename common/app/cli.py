"""Command line shared by the entry scripts: parsing, config resolution, checks, exit codes.

Exit codes: 0 done; 2 bad input or usage (one line naming the file, value or flag and what to
do), also a fault of the machine on a user's path (a full disk, a path too long) and an ``--out``
another run is using; 1 an unexpected failure (its traceback, then one line); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM) (see :func:`common.errors.run_entry`).

Everything a user can get wrong is checked before any model work, in this order: flags and
config values, the output folder, the configured model's layer ranges, a ``--neurons`` file
against that model, the device, the weights file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

import configs
from common.app.settings import DatasetSpec, RunOptions
from common.errors import UserError, run_entry

log = logging.getLogger("common")

# the presets (common/models/presets.py); --model also takes timm:<name> and open_clip:<arch>:<tag>
MODELS = tuple(configs.PRESETS)
MODEL_HELP = ("a preset: clip (open_clip ViT-B/16 laion2b_s34b_b88k), dinov2 (ViT-L/14), dinov3 (ViT-L/16), "
              "biomedclip (BiomedCLIP ViT-B/16), rad-dino (RAD-DINO ViT-B/14, 518 px), uni (UNI ViT-L/16), "
              "virchow2 (Virchow2 ViT-H/14); or any timm:<name> or open_clip:<arch>:<tag>")


def build_parser(spec: DatasetSpec) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"test_{spec.name}.py",
        description=f"{spec.title}: do the register-like high-norm tokens of a frozen ViT help or hurt "
                    "a linear probe? Extracts features with and without test-time registers (no-ttr, ttr), "
                    "trains the same probe on both and reports them side by side.",
    )
    parser.add_argument("--model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--describe", action="store_true",
                        help="print the model's identity (family, architecture, layers, widths, patch, input size, "
                             "registers, where its weights come from) as JSON and exit; reads no weights")
    parser.add_argument("--image_path", help=f"root folder of the {spec.title} dataset as downloaded")
    parser.add_argument("--manifest", help="CSV with path,label[,split] instead of a dataset folder")
    parser.add_argument("--out", help="output folder (default runs/<dataset>_<model>_<timestamp>)")
    parser.add_argument("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--weights", help="local checkpoint in a format the model's hub page ships: open_clip for "
                                          "clip/biomedclip, timm or Meta's original file for dinov2/dinov3, timm "
                                          "for uni/virchow2, Hugging Face or DINOv2 layout for rad-dino")
    parser.add_argument("--neurons", help="register neurons from a register_neurons.json, the course project's "
                                          "register_neurons.pt, or 'paper' (published DINOv2 ViT-L/14 neurons) "
                                          "instead of detecting them")
    parser.add_argument("--zero_shot", action="store_true",
                        help="clip, biomedclip: also classify by class-name prompts (no training), no-ttr vs ttr")
    parser.add_argument("--controls", action="store_true",
                        help="also run the controls that apply to the model, each scored against no-ttr like ttr: "
                             "ttr on random neurons (random_draws draws), no-ttr-removed, ttr-mean, ttr-noise, "
                             "ttr-shuffle, and trained-zero/-mean/-noise/-shuffle for models with trained registers "
                             "(each also by name in --set extra_modes=...)")
    parser.add_argument("--reference_probes", help="folder with the course project's best_model_no_ttr.pth and "
                                                   "best_model_ttr.pth: also score those saved probes")
    parser.add_argument("--detect_images", type=int, help="training images sampled for detection (default 100)")
    parser.add_argument("--detect_path", help="detect register neurons on the images of this folder instead")
    parser.add_argument("--batch_size", type=int, help="images per forward (default 32)")
    parser.add_argument("--num_workers", type=int,
                        help="image decoding threads (default: the host's cores; 0 decodes in the main thread)")
    parser.add_argument("--seed", type=int, help="seed for splits, detection sample and bootstrap (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of configs.py, e.g. --set top_k=30 (repeatable)")
    parser.add_argument("--no_cache", action="store_true", help="ignore the cache (images, features, detection)")
    parser.add_argument("--cache_dir", help="cache folder (default $TTR_CACHE_DIR or ~/.cache/ttr-medical)")
    parser.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    parser.add_argument("--demo", action="store_true",
                        help="run the whole pipeline on generated data in this dataset's layout with a small "
                             "planted model (no downloads)")
    parser.add_argument("--check_data", action="store_true",
                        help="load and split the dataset, report layout, counts and skipped files; run no model")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def setup_logging(verbose: bool = False) -> None:
    # Libraries log at WARNING and above; this tool's own modules at INFO (DEBUG with --verbose);
    # under torchrun only rank 0 tells the story (the other ranks still warn).
    from common.runtime.distributed import is_main_process

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    level = logging.DEBUG if verbose else logging.INFO
    logging.getLogger("common").setLevel(level if is_main_process() else logging.WARNING)


def _safe_streams() -> None:
    """File names that are not valid UTF-8 print as escapes instead of raising mid-report."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def resolve_config(args: argparse.Namespace, demo: bool = False, **flags) -> dict:
    """The validated config dict (:func:`common.app.settings.resolve_config`): ``--set`` overrides,
    then the dedicated flags (and ``flags``), over the demo's defaults (``demo``)."""
    from common.app.settings import resolve_config as resolve

    given = {flag: getattr(args, flag, None) for flag in FLAG_KEYS}
    return resolve(args.model, args.set, {**given, **flags}, demo=demo)


def _default_out(spec: DatasetSpec, what: str) -> Path:
    return Path("runs") / f"{spec.name}_{what}_{time.strftime('%Y%m%d-%H%M%S')}"


def _check_data(spec: DatasetSpec, args: argparse.Namespace) -> int:
    from common.app.outdir import prepare_out
    from common.data.registry import check_data_report, load_dataset, write_splits
    from common.runtime.locks import FolderLock

    if not args.image_path and not args.manifest:
        raise UserError("--check_data needs --image_path DIR (or --manifest FILE)")
    config = resolve_config(args)
    out = Path(args.out) if args.out else _default_out(spec, "check_data")
    prepare_out(out, dataset=spec.name, model=args.model, check_data=True, image_path=args.image_path)
    with FolderLock(out):
        dataset = load_dataset(spec.name, args.image_path, manifest=args.manifest, seed=config["seed"],
                               val_fraction=config["val_fraction"], test_fraction=config["test_fraction"],
                               strict=args.strict)
        print(check_data_report(dataset))
        write_splits(dataset, out / "splits.csv")
    print(f"splits written to {out / 'splits.csv'}")
    return 0


def _command_line(spec: DatasetSpec, argv: list[str]) -> list[str]:
    """The command as typed, replayable: the entry script, then the arguments."""
    script = sys.argv[0] if sys.argv and Path(sys.argv[0]).name == f"test_{spec.name}.py" else f"test_{spec.name}.py"
    return [script, *argv]


FLAG_KEYS = ("device", "detect_images", "batch_size", "num_workers", "seed")


def _options(spec: DatasetSpec, args: argparse.Namespace, out: Path, demo: bool) -> RunOptions:
    from common.app.settings import set_keys

    given = [pair.key for pair in set_keys(args.set)]
    given += [key for key in FLAG_KEYS if getattr(args, key, None) is not None]
    return RunOptions(
        model=args.model, image_path=args.image_path, out=out, manifest=args.manifest,
        weights=args.weights, neurons=args.neurons, detect_path=args.detect_path,
        reference_probes=args.reference_probes, no_cache=args.no_cache,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None, strict=args.strict, demo=demo,
        command_line=_command_line(spec, args.argv), overrides=tuple(dict.fromkeys(given)),
    )


def _run(spec: DatasetSpec, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from common.app.outdir import prepare_out
    from common.app.settings import validate_for_model
    from common.models.presets import family_class, model_slug

    if args.model is None:
        parser.error(f"--model is required ({', '.join(MODELS)}, timm:<name> or open_clip:<arch>:<tag>)")
    if not args.demo and not args.image_path and not args.manifest:
        parser.error("--image_path is required (or --manifest FILE, or --demo to try the tool)")
    if args.demo and (args.weights or args.neurons == "paper"):
        raise UserError("--demo runs the planted model: --weights and --neurons paper do not apply to it")
    family = family_class(args.model)
    if args.demo:
        from common.app.settings import set_keys

        building = [pair.key for pair in set_keys(args.set) if pair.key in family.building_keys]
        if building:
            raise UserError(f"--demo runs the planted model: --set {building[0]} does not apply to it (it would only "
                            "be recorded); leave it out, or run a real model without --demo")
    config = resolve_config(args, demo=args.demo, zero_shot=args.zero_shot or None, controls=args.controls or None)
    out = Path(args.out) if args.out else _default_out(
        spec, model_slug(args.model) if not args.demo else f"demo_{model_slug(args.model)}")
    planted = None
    if args.demo:
        from common.demo.demo import demo_model

        planted = demo_model(args.model, seed=config["seed"], precision=config["precision"])
        identity = planted.backbone.identity
    else:
        identity = family.identity(config)
    validate_for_model(config, identity)
    ranking = _preload_neurons(args, config, identity)
    if args.reference_probes and not Path(args.reference_probes).is_dir():
        raise UserError(f"--reference_probes {args.reference_probes}: not a folder; pass the course project's "
                        "Trained_Models/<dataset>_<model>/ folder (best_model_no_ttr.pth, best_model_ttr.pth)")
    from common.runtime import distributed
    from common.models.devices import resolve_device

    device = resolve_device(config["device"])
    main = distributed.is_main_process()
    if main:
        prepare_out(out, dataset=spec.name, model=args.model, image_path=args.image_path)
        if not args.no_cache:
            from common.app.outdir import check_cache_dir
            from common.data.cache import default_cache_source

            check_cache_dir(*((Path(args.cache_dir), "--cache_dir") if args.cache_dir else default_cache_source()))
    options = _options(spec, args, out, demo=args.demo)
    if not args.demo:
        # Weights before anything slow: a missing file is reported at once.
        from common.models.backbone import resolve_weights

        options.weights = resolve_weights(args.model, config, options.weights)
    from common.app.run import execute
    from common.runtime.locks import FolderLock

    with FolderLock(out) if main else contextlib.nullcontext():   # one process per --out (rank 0 holds it)
        execute(spec, options, config, device=device, planted=planted, ranking=ranking)
    return 0


def _describe(args: argparse.Namespace) -> int:
    """``--describe``: the configured model's identity as JSON (``--set`` applies), no weights read."""
    import json

    from common.models.presets import describe

    if args.model is None:
        raise UserError(f"--describe needs --model ({', '.join(MODELS)}, timm:<name> or open_clip:<arch>:<tag>)")
    config = resolve_config(args)
    print(json.dumps(describe(args.model, config), indent=2))
    return 0


def _preload_neurons(args: argparse.Namespace, config: dict, identity):
    """A ``--neurons`` ranking read and checked against the configured model (before any model work)."""
    if not args.neurons:
        return None
    from common.registers.neurons import NeuronRanking, paper_neurons

    if args.neurons == "paper":
        ranking = paper_neurons(identity)
    else:
        ranking = NeuronRanking.load(args.neurons)
    ranking.check_model(identity, args.neurons)
    return ranking


def main(spec: DatasetSpec, argv: list[str] | None = None) -> int:
    """Entry point of ``test_<dataset>.py``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(spec)
    args = parser.parse_args(argv)  # usage errors exit 2 here, as argparse does
    args.argv = argv
    setup_logging(args.verbose)
    _safe_streams()

    def body() -> int:
        from tqdm.contrib.logging import logging_redirect_tqdm

        if args.image_path and args.manifest:
            raise UserError("--image_path and --manifest were both given; pass one of them (a manifest's "
                            "relative paths resolve against the CSV's own folder)")
        # log lines go through tqdm.write: printed above a progress bar, never glued onto it
        with logging_redirect_tqdm():
            if args.describe:
                return _describe(args)
            if args.check_data:
                return _check_data(spec, args)
            return _run(spec, args, parser)

    return run_entry(body, interrupted="what was complete is cached; run the same command again to resume")
