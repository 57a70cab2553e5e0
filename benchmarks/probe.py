#!/usr/bin/env python
"""Wall time of the probe stage of docs/run.md (one mode): the probe against the one it replaced.

    python benchmarks/probe.py --json benchmarks/results/probe.json
    python benchmarks/probe.py --demo_size --json bench_probe.json
    python benchmarks/probe.py --load 8 --json bench_probe_load8.json

The problem: 5,000 train x 1,024 features, 45 classes, 1,000 validation and 1,000 test rows,
random but learnable (45 Gaussian classes whose means differ by ``CLASS_SPREAD`` standard
deviations per feature, each feature then scaled and shifted so standardisation matters;
the seeds' ensemble classifies 54% of the test rows right, and the chosen probes stop early,
at epoch 50-52 with their best epoch 35-37).
The probe runs with ``configs.RUN_DEFAULTS``' probe settings: lr grid 1e-3, 3e-3, 1e-2 x
weight decay 1e-4, 1e-2, 3 seeds, up to 200 epochs, patience 15.  ``--demo_size`` also times
the demo's size of problem (140 x 64 train features, 5 classes, 30 validation and test rows,
up to 1,500 epochs), where the cost per step, not the matrix products, decides.

Sides, timed with ``time.perf_counter`` (process CPU time alongside) in one process:

* ``new``: :func:`common.evaluation.probe.fit_probes` as it is (torch's AdamW, CosineAnnealingLR,
  clip_grad_norm_ and autograd; one torch thread per worker, the seeds side by side).
* ``today``: the same function of git revision ``TODAY`` (a hand-derived gradient and AdamW
  step), read with ``git show`` into a temporary module, same threads and workers.

Both sides run once untimed first (the first optimizer a process builds imports
``torch._dynamo``, about 2 s once).  One *round* then runs every side once; every other round
runs them in reverse order, so a drift of the shared machine hits both alike.  Figures are
medians over the rounds (min, max alongside); ``new_over_today`` is the per-round ratio, with
its target.  ``--load N`` starts N busy-loop processes for the whole measurement (and stops them,
by their process ids, at the end).  ``--no_early_stop`` sets patience = max_epochs (every member
runs all epochs, the worst case).  Results go to ``--json`` (top-level
``probe_seconds_45_classes``: median seconds of the ``new`` side; ``new_over_today``).  The
exit status is 1 when the ratio misses its target.  Never run by the tests (timings do not
belong there).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
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

TODAY = "2f692d3"  # the last revision with the hand-written gradient and AdamW step
TARGET = 1.5  # new / today
N_TRAIN, N_VAL, N_TEST, N_FEATURES, N_CLASSES = 5000, 1000, 1000, 1024, 45
CLASS_SPREAD = 0.1
DEMO_SIZE = {"train": 140, "val": 30, "test": 30, "features": 64, "classes": 5, "spread": 0.6, "max_epochs": 1500}
DATA_SEED = 0
MIN_REPEATS = 3
BURNER = "while True:\n    pass\n"


# --------------------------------------------------------------------------------------------
# inputs


def make_features(seed: int = DATA_SEED, rows: tuple[int, int, int] = (N_TRAIN, N_VAL, N_TEST),
                  n_features: int = N_FEATURES, n_classes: int = N_CLASSES,
                  spread: float = CLASS_SPREAD) -> dict[str, np.ndarray]:
    """Train/val/test features float32 ``[N, n_features]`` and labels int64 ``[N]``."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, n_features)) * spread
    scale = rng.uniform(0.5, 3.0, n_features)  # uneven feature scales and offsets, as backbone
    offset = rng.normal(size=n_features) * 2.0  # features have: standardisation matters
    out: dict[str, np.ndarray] = {}
    for split, count in zip(("train", "val", "test"), rows):
        y = rng.integers(0, n_classes, count)
        X = (means[y] + rng.normal(size=(count, n_features))) * scale + offset
        out[f"X_{split}"], out[f"y_{split}"] = X.astype(np.float32), y.astype(np.int64)
    return out


def probe_config(no_early_stop: bool, max_epochs: int | None = None, module=probe_module):
    """``module.ProbeConfig`` with the run defaults (``max_epochs`` overrides the default)."""
    defaults = configs.RUN_DEFAULTS
    max_epochs = max_epochs or defaults["probe_max_epochs"]
    return module.ProbeConfig(
        lr_grid=tuple(defaults["probe_lr_grid"]),
        weight_decay_grid=tuple(defaults["probe_weight_decay_grid"]),
        max_epochs=max_epochs,
        patience=max_epochs if no_early_stop else defaults["probe_patience"],
        class_weights=defaults["probe_class_weights"],
        seeds=tuple(defaults["probe_seeds"]),
    )


def load_today(revision: str = TODAY):
    """The probe module of git ``revision``, imported from a temporary file under a private name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:common/evaluation/probe.py"],
                            check=True, capture_output=True, text=True).stdout
    name = f"probe_at_{revision}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# the sides


def run_probe(module, data: dict, config) -> tuple[np.ndarray, list[dict]]:
    n_classes = 1 + max(int(data[f"y_{split}"].max()) for split in ("train", "val", "test"))
    return module.fit_probes(data["X_train"], data["y_train"], data["X_val"], data["y_val"], data["X_test"],
                             n_classes, config)


def run_new(data: dict, config, workers: int | None = None) -> tuple[np.ndarray, list[dict]]:
    """``fit_probes`` of this tree (``workers`` forces ``PROBE_WORKERS``; kept for benchmarks/scale.py)."""
    previous = probe_module.PROBE_WORKERS
    probe_module.PROBE_WORKERS = workers if workers is not None else previous
    try:
        return run_probe(probe_module, data, config)
    finally:
        probe_module.PROBE_WORKERS = previous


def timed(function: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds by ``time.perf_counter``, process CPU seconds, result) of one call."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - start, time.process_time() - cpu, result


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
# one problem, both sides interleaved


def compare(label: str, data: dict, modules: dict, max_epochs: int | None, args: argparse.Namespace) -> dict:
    """Time the probe ``modules`` (``new``, ``today``) on ``data`` in interleaved rounds -> their report."""
    sides = {name: (lambda m=module: run_probe(m, data, probe_config(args.no_early_stop, max_epochs, m)))
             for name, module in modules.items()}
    for module in modules.values():  # untimed: imports and first-call costs
        run_probe(module, data, probe_config(False, 2, module))
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    results: dict[str, tuple[np.ndarray, list[dict]]] = {}
    ratios: list[float] = []
    for round_index in range(args.repeats):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for name in order:
            seconds, cpu_seconds, result = timed(sides[name])
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            results.setdefault(name, result)
            log(f"{label} round {round_index + 1}: {name:<6} {seconds:8.2f} s wall, {cpu_seconds:8.2f} s CPU")
        ratios.append(wall["new"][-1] / wall["today"][-1])
    (proba_new, chosen_new), (proba_today, chosen_today) = results["new"], results["today"]

    def same(keys: tuple[str, ...]) -> list[bool]:
        return [all(a[k] == b[k] for k in keys) for a, b in zip(chosen_new, chosen_today)]

    return {
        "seconds": {name: {**summarise(wall[name]), "cpu_time": summarise(cpu[name])} for name in sides},
        "new_over_today": summarise(ratios),
        "cpu_new_over_today": float(np.median(cpu["new"]) / np.median(cpu["today"])),
        "agreement_with_today": {
            "max_abs_proba_diff": float(np.abs(proba_new - proba_today).max()),
            "same_grid_point": same(("lr", "weight_decay")),
            "same_epochs": same(("best_epoch", "epochs_run", "converged")),
            "epochs_today": [(c["best_epoch"], c["epochs_run"]) for c in chosen_today],
        },
        "chosen": chosen_new,
        "test_top1": float((proba_new.mean(axis=0).argmax(axis=1) == data["y_test"]).mean()),
    }


def benchmark(args: argparse.Namespace) -> dict:
    today = load_today(args.today)
    problems = {"45_classes": (make_features(), None)}
    if args.demo_size:
        size = DEMO_SIZE
        problems["demo_size"] = (make_features(rows=(size["train"], size["val"], size["test"]),
                                               n_features=size["features"], n_classes=size["classes"],
                                               spread=size["spread"]), size["max_epochs"])
    load_start = os.getloadavg()
    burners = start_burners(args.load)
    started = time.perf_counter()
    reports = {}
    try:
        if burners:
            time.sleep(2.0)  # let the burners reach full speed before the first timing
        for label, (data, max_epochs) in problems.items():
            reports[label] = compare(label, data, {"new": probe_module, "today": today}, max_epochs, args)
        load_during = os.getloadavg()
    finally:
        stop_burners(burners)

    main = reports["45_classes"]
    config = probe_config(args.no_early_stop)
    ratio = main["new_over_today"]["median"]  # of the per-round ratios
    report: dict = {
        "probe_seconds_45_classes": main["seconds"]["new"]["median"],
        "new_over_today": ratio,
        "target": TARGET,
        "met": bool(ratio <= TARGET),
        "today_revision": args.today,
        "load_processes": args.load,
        "setup": {"train": N_TRAIN, "val": N_VAL, "test": N_TEST, "features": N_FEATURES,
                  "classes": N_CLASSES, "class_spread": CLASS_SPREAD, "seeds": list(config.seeds),
                  "lr_grid": list(config.lr_grid), "weight_decay_grid": list(config.weight_decay_grid),
                  "max_epochs": config.max_epochs, "patience": config.patience, "repeats": args.repeats,
                  "no_early_stop": args.no_early_stop, "probe_threads": probe_module.PROBE_THREADS,
                  "probe_workers": probe_module.PROBE_WORKERS, "demo_size": DEMO_SIZE if args.demo_size else None},
        "machine": {**machine_info(), "load_average_start": list(load_start),
                    "load_average_during": list(load_during)},
        "problems": reports,
        "wall_s": time.perf_counter() - started,
    }
    return report


def print_table(report: dict) -> None:
    setup, machine = report["setup"], report["machine"]
    print(f"\n== probe stage, one mode, new vs {report['today_revision']}: {setup['train']} x {setup['features']} "
          f"train features, {setup['classes']} classes, {len(setup['seeds'])} seeds, grid {len(setup['lr_grid'])} x "
          f"{len(setup['weight_decay_grid'])}, patience {setup['patience']}"
          f"{' (no early stopping)' if setup['no_early_stop'] else ''}")
    print(f"   machine: {machine['nproc']} CPUs, torch {machine['torch']}, {report['load_processes']} burner "
          f"processes, load average {machine['load_average_start'][0]:.1f} -> {machine['load_average_during'][0]:.1f}")
    for label, r in report["problems"].items():
        print(f"   {label}:  {'side':<7}{'median s':>10}{'min':>9}{'max':>9}{'cpu s median':>14}")
        for name, s in r["seconds"].items():
            print(f"   {'':<12}{name:<7}{s['median']:>10.2f}{s['min']:>9.2f}{s['max']:>9.2f}{s['cpu_time']['median']:>14.2f}")
        rounds, a = r["new_over_today"], r["agreement_with_today"]
        print(f"   {'':<12}new/today per round: median {rounds['median']:.2f} (min {rounds['min']:.2f}, max "
              f"{rounds['max']:.2f}); CPU {r['cpu_new_over_today']:.2f}; max |proba diff| "
              f"{a['max_abs_proba_diff']:.1e}; per seed same (lr, wd) {a['same_grid_point']}, "
              f"same epochs {a['same_epochs']}")
    print(f"   new_over_today = {report['new_over_today']:.2f} (target <= {report['target']}: "
          f"{'met' if report['met'] else 'NOT met'}); probe_seconds_45_classes = "
          f"{report['probe_seconds_45_classes']:.2f}; wall time {report['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=int, default=0, metavar="N", help="busy-loop processes beside the probe")
    parser.add_argument("--repeats", type=int, default=5, help=f"rounds (>= {MIN_REPEATS})")
    parser.add_argument("--today", default=TODAY, help=f"git revision of the probe to compare with ({TODAY})")
    parser.add_argument("--demo_size", action="store_true", help="also time the demo's size of problem")
    parser.add_argument("--no_early_stop", action="store_true", help="patience = max_epochs (worst case)")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args(argv)
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be >= {MIN_REPEATS}")
    if args.load < 0:
        parser.error("--load must be >= 0")
    report = benchmark(args)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    return 0 if report["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
