#!/usr/bin/env python
"""Wall time of the probe stage of docs/run.md (one mode), quiet or beside CPU burners.

    python benchmarks/probe.py --json bench_probe.json
    python benchmarks/probe.py --load 8 --old_repeats 1 --json bench_probe_load8.json

The problem: 5,000 train x 1,024 features, 45 classes, 1,000 validation and 1,000 test rows,
random but learnable (45 Gaussian classes whose means differ by ``CLASS_SPREAD`` standard
deviations per feature, each feature then scaled and shifted so standardisation matters;
the seeds' ensemble classifies 54% of the test rows right, and the chosen probes stop early,
at epoch 50-52 with their best epoch 35-37).
The probe runs with ``configs.RUN_DEFAULTS``' probe settings: lr grid 1e-3, 3e-3, 1e-2 x
weight decay 1e-4, 1e-2, 3 seeds, up to 200 epochs, patience 15.

Sides, timed with ``time.perf_counter`` (process CPU time alongside) in one process:

* ``new``: :func:`common.evaluation.probe.fit_probes` as it is (the grid batched per seed, one torch
  thread per worker); ``--workers 1,2,3`` adds the same with ``PROBE_WORKERS`` forced to each
  value (``new_w1`` ...), to see what the worker count buys.
* ``old`` (``--old``, on by default): the previous implementation's procedure, one
  :class:`~common.evaluation.probe.LinearProbe` per (lr, weight decay, seed) after the other, with
  torch's default thread count (the old code used it for 45-class problems).

One *round* runs every side once; every other round runs them in reverse order, so a drift
of the shared machine hits all sides alike.  Figures are medians over the rounds (min, max
alongside); ``old_over_new`` is the per-round ratio.  ``--load N`` starts N busy-loop
processes for the whole measurement (and stops them, by their process ids, at the end), so
the probe shares the cores with them as it would on a busy machine; the old side is slow
there (minutes), so ``--old_repeats`` may run it in fewer rounds than the new one.

``--no_early_stop`` sets patience = max_epochs: every member runs all 200 epochs, the worst
case for the cost.  Results go to ``--json`` (top-level ``probe_seconds_45_classes``: median
seconds of the ``new`` side, one mode).  Never run by the tests (timings do not belong there).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import common.evaluation.probe as probe_module  # noqa: E402
import configs  # noqa: E402
from benchmarks.timing import log, machine_info, summarise  # noqa: E402
from common.evaluation.probe import LinearProbe, ProbeConfig, fit_probes  # noqa: E402

N_TRAIN, N_VAL, N_TEST, N_FEATURES, N_CLASSES = 5000, 1000, 1000, 1024, 45
CLASS_SPREAD = 0.1
DATA_SEED = 0
MIN_REPEATS = 3
BURNER = "while True:\n    pass\n"


# --------------------------------------------------------------------------------------------
# inputs


def make_features(seed: int = DATA_SEED) -> dict[str, np.ndarray]:
    """Train/val/test features float32 ``[N, 1024]`` and labels int64 ``[N]`` (45 classes)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(N_CLASSES, N_FEATURES)) * CLASS_SPREAD
    scale = rng.uniform(0.5, 3.0, N_FEATURES)  # uneven feature scales and offsets, as backbone
    offset = rng.normal(size=N_FEATURES) * 2.0  # features have: standardisation matters
    out: dict[str, np.ndarray] = {}
    for split, rows in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        y = rng.integers(0, N_CLASSES, rows)
        X = (means[y] + rng.normal(size=(rows, N_FEATURES))) * scale + offset
        out[f"X_{split}"], out[f"y_{split}"] = X.astype(np.float32), y.astype(np.int64)
    return out


def probe_config(no_early_stop: bool) -> ProbeConfig:
    defaults = configs.RUN_DEFAULTS
    max_epochs = defaults["probe_max_epochs"]
    return ProbeConfig(
        lr_grid=tuple(defaults["probe_lr_grid"]),
        weight_decay_grid=tuple(defaults["probe_weight_decay_grid"]),
        max_epochs=max_epochs,
        patience=max_epochs if no_early_stop else defaults["probe_patience"],
        class_weights=defaults["probe_class_weights"],
        seeds=tuple(defaults["probe_seeds"]),
    )


# --------------------------------------------------------------------------------------------
# the sides


def run_new(data: dict, config: ProbeConfig, workers: int | None) -> tuple[np.ndarray, list[dict]]:
    previous = probe_module.PROBE_WORKERS
    probe_module.PROBE_WORKERS = workers if workers is not None else previous
    try:
        return fit_probes(data["X_train"], data["y_train"], data["X_val"], data["y_val"], data["X_test"],
                          N_CLASSES, config)
    finally:
        probe_module.PROBE_WORKERS = previous


def run_old(data: dict, config: ProbeConfig) -> tuple[np.ndarray, list[dict]]:
    """The previous procedure: every (lr, wd, seed) fitted alone, torch's default thread count."""
    previous = probe_module.PROBE_THREADS
    probe_module.PROBE_THREADS = None  # keep torch's setting, as the old code did at this size
    try:
        probas, chosen = [], []
        for seed in config.seeds:
            best = None
            for lr in config.lr_grid:
                for wd in config.weight_decay_grid:
                    probe = LinearProbe(N_CLASSES, lr, wd, config, seed).fit(
                        data["X_train"], data["y_train"], data["X_val"], data["y_val"])
                    if best is None or probe.best_val_loss_ < best.best_val_loss_:
                        best = probe
            probas.append(best.predict_proba(data["X_test"], split="test"))
            chosen.append({"seed": seed, "lr": best.lr, "weight_decay": best.weight_decay,
                           "val_loss": best.best_val_loss_, "best_epoch": best.best_epoch_,
                           "epochs_run": best.n_epochs_run_})
        return np.stack(probas), chosen
    finally:
        probe_module.PROBE_THREADS = previous


def timed(function: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds by ``time.perf_counter``, process CPU seconds, result) of one call."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - start, time.process_time() - cpu, result


# --------------------------------------------------------------------------------------------
# load


def start_burners(count: int) -> list[subprocess.Popen]:
    """``count`` busy-loop processes (plain Python, no torch) that run until stopped."""
    return [subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]


def stop_burners(burners: list[subprocess.Popen]) -> None:
    for process in burners:
        process.terminate()
    for process in burners:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------------------------
# statistics and output


def benchmark(args: argparse.Namespace) -> dict:
    data = make_features()
    config = probe_config(args.no_early_stop)
    sides: dict[str, Callable[[], tuple[np.ndarray, list[dict]]]] = {"new": lambda: run_new(data, config, None)}
    for workers in args.workers:
        sides[f"new_w{workers}"] = (lambda w: lambda: run_new(data, config, w))(workers)
    if args.old:
        sides["old"] = lambda: run_old(data, config)
    rounds_of = {name: (args.old_repeats if name == "old" else args.repeats) for name in sides}

    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    results: dict[str, tuple[np.ndarray, list[dict]]] = {}
    ratios: list[float] = []
    load_start = os.getloadavg()
    burners = start_burners(args.load)
    started = time.perf_counter()
    try:
        if burners:
            time.sleep(2.0)  # let the burners reach full speed before the first timing
        for round_index in range(max(rounds_of.values())):
            order = [name for name in sides if round_index < rounds_of[name]]
            if round_index % 2:
                order.reverse()
            this_round: dict[str, float] = {}
            for name in order:
                seconds, cpu_seconds, result = timed(sides[name])
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
                this_round[name] = seconds
                if name not in results:
                    results[name] = result
                log(f"round {round_index + 1}: {name:<8} {seconds:8.2f} s wall, {cpu_seconds:8.2f} s CPU")
            if "old" in this_round and "new" in this_round:
                ratios.append(this_round["old"] / this_round["new"])
        load_during = os.getloadavg()
    finally:
        stop_burners(burners)

    proba_new, chosen_new = results["new"]
    report: dict = {
        "probe_seconds_45_classes": float(np.median(wall["new"])),
        "load_processes": args.load,
        "setup": {"train": N_TRAIN, "val": N_VAL, "test": N_TEST, "features": N_FEATURES,
                  "classes": N_CLASSES, "class_spread": CLASS_SPREAD, "seeds": list(config.seeds),
                  "lr_grid": list(config.lr_grid), "weight_decay_grid": list(config.weight_decay_grid),
                  "max_epochs": config.max_epochs, "patience": config.patience,
                  "no_early_stop": args.no_early_stop, "probe_threads": probe_module.PROBE_THREADS,
                  "probe_workers": probe_module.PROBE_WORKERS},
        "machine": {**machine_info(), "load_average_start": list(load_start),
                    "load_average_during": list(load_during)},
        "seconds": {name: {**summarise(wall[name]), "cpu_time": summarise(cpu[name])} for name in sides},
        "chosen": chosen_new,
        "test_top1": float((proba_new.mean(axis=0).argmax(axis=1) == data["y_test"]).mean()),
        "wall_s": time.perf_counter() - started,
    }
    if ratios:
        report["old_over_new"] = summarise(ratios)
    if "old" in results:
        proba_old, chosen_old = results["old"]
        report["agreement_with_old"] = {
            "max_abs_proba_diff": float(np.abs(proba_old - proba_new).max()),
            "same_choice": [all(a[key] == b[key] for key in ("lr", "weight_decay", "best_epoch"))
                            for a, b in zip(chosen_old, chosen_new)],
        }
    return report


def print_table(report: dict) -> None:
    setup, machine = report["setup"], report["machine"]
    print(f"\n== probe stage, one mode: {setup['train']} x {setup['features']} train features, "
          f"{setup['classes']} classes, {len(setup['seeds'])} seeds, grid {len(setup['lr_grid'])} x "
          f"{len(setup['weight_decay_grid'])}, patience {setup['patience']}"
          f"{' (no early stopping)' if setup['no_early_stop'] else ''}")
    print(f"   machine: {machine['nproc']} CPUs, torch {machine['torch']} ({machine['torch_threads']} threads), "
          f"{report['load_processes']} burner processes, load average {machine['load_average_start'][0]:.1f} "
          f"-> {machine['load_average_during'][0]:.1f}")
    print(f"   {'side':<10}{'median s':>10}{'min':>9}{'max':>9}  {'n':>2}{'cpu s median':>14}")
    for name, r in report["seconds"].items():
        print(f"   {name:<10}{r['median']:>10.2f}{r['min']:>9.2f}{r['max']:>9.2f}  {len(r['values']):>2}"
              f"{r['cpu_time']['median']:>14.2f}")
    if "old_over_new" in report:
        r = report["old_over_new"]
        print(f"   old/new (per round): median {r['median']:.2f} (min {r['min']:.2f}, max {r['max']:.2f})")
    if "agreement_with_old" in report:
        a = report["agreement_with_old"]
        print(f"   new vs old: max |proba diff| {a['max_abs_proba_diff']:.2e}, same (lr, wd, best epoch) "
              f"per seed {a['same_choice']}")
    print("   chosen: " + "; ".join(
        f"seed {c['seed']} lr={c['lr']:g} wd={c['weight_decay']:g} best {c['best_epoch']}/{c['epochs_run']}"
        f"{'' if c['converged'] else ' NOT converged'}" for c in report["chosen"]))
    print(f"   test top-1 of the ensemble {report['test_top1']:.3f}; wall time {report['wall_s']:.0f} s")
    print(f"   probe_seconds_45_classes = {report['probe_seconds_45_classes']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=int, default=0, metavar="N", help="busy-loop processes beside the probe")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help=f"rounds (>= {MIN_REPEATS})")
    parser.add_argument("--old_repeats", type=int, help="rounds that also run the old side (default: --repeats)")
    parser.add_argument("--no_old", dest="old", action="store_false", help="skip the old side")
    parser.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",") if v], default=[],
                        help="also time the new side with PROBE_WORKERS forced to each of these, e.g. 1,2,3")
    parser.add_argument("--no_early_stop", action="store_true", help="patience = max_epochs (worst case)")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args(argv)
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be >= {MIN_REPEATS}")
    if args.load < 0:
        parser.error("--load must be >= 0")
    args.old_repeats = args.repeats if args.old_repeats is None else args.old_repeats
    if args.old and args.old_repeats < 1:
        parser.error("--old_repeats must be >= 1 (or use --no_old)")
    report = benchmark(args)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
