#!/usr/bin/env python
"""Golden outputs of the linear probe as it was at git revision 2f692d3 (``probe_golden.*``).

The probe was rewritten on stock torch parts after that revision; ``tests/evaluation/test_probe.py``
checks that the rewrite gives the same results as the code it replaced, within float tolerance,
on the synthetic cases defined here (the test imports :data:`CASES` and :func:`make_case` from
this file, so both sides see the same features).

Regenerate (from the repository root; the default ``--revision`` is the one the golden files
were made from, and its probe module is read with ``git show`` into a temporary file)::

    .venv/bin/python tests/evaluation/data/make_probe_golden.py
    .venv/bin/python tests/evaluation/data/make_probe_golden.py --module /path/to/probe.py

``--module`` imports a probe module from a file instead (it must have that revision's
``fit_probes``, ``_prepare``, ``_grid``, ``_fit_grid`` and ``_probe_threads``).

What is stored, per case and seed: the test probabilities of :func:`fit_probes` (float32, in
``probe_golden.npz``) and, in ``probe_golden.json``, the chosen settings (lr, weight decay,
best epoch, epochs run, converged, validation loss) and for every member of the grid its
restored validation loss, best epoch, epochs run, convergence and *decision margin*: the
smallest relative distance, over its epochs, between a validation loss and the improvement
threshold ``best * (1 - min_delta)``.  A small margin means a round-off difference could
flip an early-stopping decision; the test uses it to tell real differences from ties.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
REVISION = "2f692d3"
NPZ = HERE / "probe_golden.npz"
JSON = HERE / "probe_golden.json"

# Every case: how its features are drawn (``data``) and the ProbeConfig it runs with (``config``).
CASES: dict[str, dict] = {
    # 2 classes, noisy labels: every member stops early (the validation loss turns up).
    "binary_early_stop": {
        "data": dict(n_train=300, n_val=150, n_test=40, dim=16, classes=2, noise=0.3, seed=1),
        "config": dict(max_epochs=200, patience=15, batch_size=64, seeds=(0, 1, 2)),
    },
    # 10 classes, imbalanced training labels, 'balanced' class weights; class 11 of 12 is in
    # no split and class 10 only in validation (it gets weight 1).
    "multiclass_class_weights": {
        "data": dict(n_train=400, n_val=200, n_test=30, dim=32, classes=10, n_classes=12, noise=0.2,
                     imbalance=True, val_extra_class=True, seed=2),
        "config": dict(max_epochs=150, patience=10, batch_size=128, class_weights=True, seeds=(0, 3)),
    },
    # 45 classes (the benchmark's size of problem, smaller), class weights off.
    "many_classes": {
        "data": dict(n_train=900, n_val=300, n_test=20, dim=48, classes=45, noise=0.1, spread=1.5, seed=3),
        "config": dict(max_epochs=120, patience=10, batch_size=256, seeds=(0, 1, 2)),
    },
    # max_epochs too small: every member is still improving when the budget runs out.
    "not_converged": {
        "data": dict(n_train=200, n_val=100, n_test=30, dim=12, classes=4, noise=0.0, seed=4),
        "config": dict(lr_grid=(1e-3, 1e-2), weight_decay_grid=(0.0, 1e-2), max_epochs=8, patience=15,
                       batch_size=32, seeds=(0, 1)),
    },
    # Two features constant on train (one of them moves on val and test).
    "constant_feature": {
        "data": dict(n_train=250, n_val=120, n_test=30, dim=12, classes=3, noise=0.2, constant=(3, 7), seed=5),
        "config": dict(max_epochs=150, patience=12, batch_size=64, seeds=(0, 1, 2)),
    },
    # Fewer training rows than one batch (the default batch size 256); the slow members run to
    # max_epochs, the chosen ones stop early.
    "small_n": {
        "data": dict(n_train=40, n_val=60, n_test=25, dim=8, classes=3, noise=0.45, spread=0.8, seed=6),
        "config": dict(max_epochs=200, patience=15, seeds=(0, 1, 2, 5)),
    },
    # Gradient clipping that bites (small max norm), members stopping at different epochs.
    "clip_bites": {
        "data": dict(n_train=300, n_val=200, n_test=30, dim=20, classes=3, noise=0.1, spread=0.3, seed=7),
        "config": dict(lr_grid=(3e-3, 1e-2, 3e-2), weight_decay_grid=(0.0, 1.0), max_epochs=100, patience=8,
                       batch_size=16, grad_clip=0.1, seeds=(3, 8)),
    },
    # No gradient clipping.
    "no_clip": {
        "data": dict(n_train=160, n_val=200, n_test=30, dim=20, classes=3, noise=0.3, seed=8),
        "config": dict(lr_grid=(3e-3, 3e-2), weight_decay_grid=(1e-4, 1e-1), max_epochs=60, patience=6,
                       batch_size=32, grad_clip=None, seeds=(0, 1)),
    },
}


def make_case(name: str) -> dict:
    """The features of case ``name``: ``X_train [N, D]`` ... float32, labels int64, ``n_classes``.

    Gaussian classes (means ``spread`` apart per feature), each feature scaled and shifted so
    standardisation matters, a share ``noise`` of the training labels redrawn at random.
    """
    spec = CASES[name]["data"]
    rng = np.random.default_rng(spec["seed"])
    classes, dim = spec["classes"], spec["dim"]
    means = rng.normal(size=(classes + 1, dim)) * spec.get("spread", 1.0)
    scale = rng.uniform(0.5, 3.0, dim)
    offset = rng.normal(size=dim) * 4.0
    probs = None
    if spec.get("imbalance"):
        probs = np.linspace(1.0, 0.1, classes)
        probs /= probs.sum()
    out: dict = {"n_classes": spec.get("n_classes", classes)}
    for split in ("train", "val", "test"):
        rows = spec[f"n_{split}"]
        y = rng.choice(classes, size=rows, p=probs)
        if split == "val" and spec.get("val_extra_class"):
            y[:5] = classes  # a class the training split never shows
        X = (means[y] + rng.normal(size=(rows, dim))) * scale + offset
        if split == "train" and spec.get("noise"):
            flip = rng.random(rows) < spec["noise"]
            y[flip] = rng.integers(0, classes, int(flip.sum()))
        for column in spec.get("constant", ()):
            X[:, column] = 7.0 if split == "train" else 7.0 + rng.normal(size=rows)
        out[f"X_{split}"], out[f"y_{split}"] = X.astype(np.float32), y.astype(np.int64)
    return out


def decision_margin(val_losses: list[float], min_delta: float) -> float:
    """Smallest ``|loss - best * (1 - min_delta)| / (best * (1 - min_delta))`` over the epochs."""
    best, margin = math.inf, math.inf
    for loss in val_losses:
        if not math.isfinite(loss):
            break
        if math.isfinite(best):
            threshold = best * (1.0 - min_delta)
            margin = min(margin, abs(loss - threshold) / threshold)
            if loss < threshold:
                best = loss
        else:
            best = loss
    return margin


def choice_margin(members: list[dict]) -> float:
    """Relative gap between the lowest and the second-lowest restored validation loss of a grid."""
    losses = sorted(m["val_loss"] for m in members)
    return (losses[1] - losses[0]) / losses[0] if len(losses) > 1 else math.inf


def load_module(path: Path):
    """Import the probe module in ``path`` under a private name (its ``common.*`` imports from ROOT)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    name = f"probe_golden_source_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def module_from_revision(revision: str, workdir: Path) -> Path:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:common/evaluation/probe.py"],
                            check=True, capture_output=True, text=True).stdout
    path = workdir / f"probe_{revision}.py"
    path.write_text(source)
    return path


def golden(probe, name: str) -> tuple[np.ndarray, dict]:
    """Run ``probe.fit_probes`` on case ``name``; the per-member details from the same module's grid."""
    case = make_case(name)
    config = probe.ProbeConfig(**CASES[name]["config"])
    args = (case["X_train"], case["y_train"], case["X_val"], case["y_val"])
    proba, chosen = probe.fit_probes(*args, case["X_test"], case["n_classes"], config)
    data = probe._prepare(*args, case["n_classes"], config)
    grid = probe._grid(config)
    seeds = []
    for seed, choice in zip(config.seeds, chosen):
        with probe._probe_threads():
            fit = probe._fit_grid(data, grid, config, seed)
        members = [
            {"lr": lr, "weight_decay": wd, "val_loss": fit.best_val_loss[g], "best_epoch": fit.best_epoch[g],
             "epochs_run": fit.epochs_run[g], "converged": fit.converged[g],
             "margin": decision_margin([h["val_loss"] for h in fit.history[g]], config.min_delta)}
            for g, (lr, wd) in enumerate(grid)
        ]
        picked = min(range(len(grid)), key=lambda g: (members[g]["val_loss"], g))
        assert (members[picked]["lr"], members[picked]["weight_decay"]) == (choice["lr"], choice["weight_decay"])
        seeds.append({"chosen": choice, "members": members})
    return proba, {"config": CASES[name]["config"], "seeds": seeds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--revision", default=REVISION, help=f"git revision to read the probe from ({REVISION})")
    source.add_argument("--module", type=Path, help="a probe.py file to import instead of --revision")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for probe_golden.npz/.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.module or module_from_revision(args.revision, Path(tmp))
        probe = load_module(path)
        probabilities, details = {}, {"source": str(args.module or args.revision), "cases": {}}
        for name in CASES:
            probabilities[name], details["cases"][name] = golden(probe, name)
            seeds = details["cases"][name]["seeds"]
            print(f"{name}: " + "; ".join(
                f"seed {s['chosen']['seed']} lr={s['chosen']['lr']:g} wd={s['chosen']['weight_decay']:g} "
                f"best {s['chosen']['best_epoch']}/{s['chosen']['epochs_run']}"
                f"{'' if s['chosen']['converged'] else ' (not converged)'} "
                f"margins: decisions {min(m['margin'] for m in s['members']):.1e}, "
                f"choice {choice_margin(s['members']):.1e}" for s in seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / NPZ.name, **probabilities)
    (args.out / JSON.name).write_text(json.dumps(details, indent=1) + "\n")
    print(f"wrote {args.out / NPZ.name} and {args.out / JSON.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
