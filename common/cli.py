"""Command line shared by the entry scripts: parsing, config resolution, exit codes.

Exit codes: 0 done; 2 bad input or usage (one line naming the file, value or flag and what to
do); 1 an unexpected failure (with a traceback in the log).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from common.errors import UserError
from common.options import DatasetSpec, RunOptions

log = logging.getLogger("common")


def build_parser(spec: DatasetSpec) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"test_{spec.name}.py",
        description=f"{spec.title}: do the register-like high-norm tokens of a frozen ViT help or hurt "
                    "a linear probe? Extracts features with and without test-time registers (no-ttr, ttr), "
                    "trains the same probe on both and reports them side by side.",
    )
    parser.add_argument("--model", choices=("clip", "dinov2"),
                        help="backbone family: clip (open_clip ViT-B/16 laion2b_s34b_b88k) or dinov2 (ViT-L/14)")
    parser.add_argument("--image_path", help=f"root folder of the {spec.title} dataset as downloaded")
    parser.add_argument("--manifest", help="CSV with path,label[,split] instead of the folder layout")
    parser.add_argument("--out", help="output folder (default runs/<dataset>_<model>_<timestamp>)")
    parser.add_argument("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--weights", help="local checkpoint: open_clip format for clip; timm or Meta's "
                                          "dinov2_vitl14_pretrain.pth for dinov2")
    parser.add_argument("--neurons", help="register neurons from a register_neurons.json, or 'paper' "
                                          "(published DINOv2 ViT-L/14 neurons) instead of detecting them")
    parser.add_argument("--detect_images", type=int, help="training images sampled for detection (default 100)")
    parser.add_argument("--detect_path", help="detect register neurons on the images of this folder instead")
    parser.add_argument("--batch_size", type=int, help="images per forward (default 32)")
    parser.add_argument("--num_workers", type=int, help="image decoding workers (default 2)")
    parser.add_argument("--seed", type=int, help="seed for splits, detection sample and bootstrap (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of configs.py, e.g. --set top_k=30 (repeatable)")
    parser.add_argument("--no_cache", action="store_true", help="ignore the feature cache")
    parser.add_argument("--cache_dir", help="feature cache folder (default $TTR_CACHE_DIR or ~/.cache/ttr-medical)")
    parser.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    parser.add_argument("--demo", action="store_true",
                        help="run the whole pipeline on generated data in this dataset's layout with a small "
                             "planted model (no downloads)")
    parser.add_argument("--check_data", action="store_true",
                        help="load and split the dataset, report layout, counts and skipped files; run no model")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def _setup_logging(verbose: bool) -> None:
    # Libraries log at WARNING and above; this tool's own modules at INFO (DEBUG with --verbose).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    logging.getLogger("common").setLevel(logging.DEBUG if verbose else logging.INFO)


def resolve(spec: DatasetSpec, args: argparse.Namespace, argv: list[str],
            defaults: dict | None = None) -> tuple[RunOptions, dict]:
    """RunOptions and the validated config dict from parsed arguments.

    ``defaults`` (the demo's fixture settings) replace config values before ``--set`` applies.
    """
    from common.settings import apply_overrides, base_config, validate

    config = {**base_config(args.model), **(defaults or {})}
    config = apply_overrides(config, args.set)
    for flag in ("device", "detect_images", "batch_size", "num_workers", "seed"):
        value = getattr(args, flag)
        if value is not None:
            config[flag] = value
    config = validate(config, args.model)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"{spec.name}_{args.model}_{stamp}"
    options = RunOptions(
        model=args.model, image_path=args.image_path, out=out, manifest=args.manifest,
        weights=args.weights, neurons=args.neurons, detect_path=args.detect_path,
        no_cache=args.no_cache, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        strict=args.strict, demo=args.demo, command_line=[sys.executable] + argv,
    )
    return options, config


def _check_data(spec: DatasetSpec, args: argparse.Namespace) -> int:
    from common.datasets import check_data_report, load_dataset, write_splits

    if not args.image_path and not args.manifest:
        raise UserError("--check_data needs --image_path DIR (or --manifest FILE)")
    seed = args.seed if args.seed is not None else 0
    dataset = load_dataset(spec.name, args.image_path, manifest=args.manifest, seed=seed, strict=args.strict)
    print(check_data_report(dataset))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_splits(dataset, out / "splits.csv")
        print(f"splits written to {out / 'splits.csv'}")
    return 0


def main(spec: DatasetSpec, argv: list[str] | None = None) -> int:
    """Entry point of ``test_<dataset>.py``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(spec)
    args = parser.parse_args(argv)  # usage errors exit 2 here, as argparse does
    _setup_logging(args.verbose)
    try:
        if args.check_data:
            return _check_data(spec, args)
        if args.model is None:
            parser.error("--model is required (clip or dinov2)")
        if args.demo:
            from common.demo import run_demo

            run_demo(spec, args, argv)
            return 0
        if not args.image_path and not args.manifest:
            parser.error("--image_path is required (or --manifest FILE, or --demo to try the tool)")
        options, config = resolve(spec, args, argv)
        # Weights first: a missing file is reported before anything slow is imported or loaded.
        from common.backbones import resolve_weights
        from common.devices import resolve_device

        resolve_device(config["device"])
        options.weights = resolve_weights(args.model, config, options.weights)
        from common.run import execute

        execute(spec, options, config)
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - an unexpected failure: say so, with the traceback
        log.exception("unexpected failure; please report it with the traceback above")
        return 1
