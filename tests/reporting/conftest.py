"""A study made by hand for the study-report tests: cell folders written the way a run writes them
(``metrics.csv`` from the real ``evaluate_modes`` on the seeded probabilities that the cell's
``predictions_<mode>.csv`` files hold, ``outliers.csv``, ``register_neurons.json``,
``config.json``), a study record over them, and its report.  Far cheaper than running a demo
study; the p-values that Holm combines are then set to chosen numbers so that the adjustment can
be checked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.evaluation.compare import evaluate_modes
from common.evaluation.metrics import MetricSpec
from common.registers.modes import predictions_file
from common.registers.neurons import PAPER_IDENTITY
from common.reporting import studyreport

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["a - one", "b - two", "c - three", "d - four"]
MAKERS = ["Medtronic", "Medtronic", "Boston", "Biotronik"]
TEST_ROWS = 40
# chosen probe p-values of each cell's primary metric (aptos: qwk; orthonet, pacemaker: top1); the
# first three cells are the main cells (the Holm family), the fourth a sensitivity cell
P_PRIMARY = [0.004, 0.04, 0.03, 0.005]
MAIN = [True, True, True, False]
P_ZERO = [0.2, None, 0.01, math.nan]        # chosen zero-shot p-values (None: the cell has no zero-shot rows)
SHARE_NO_TTR = [0.2, 0.31, 0.0004, 0.25]    # patch share above threshold per cell (one below 0.05%)


def _probabilities(labels: np.ndarray, skill: float, rng: np.random.Generator, seeds: int) -> np.ndarray:
    """``[seeds, N, C]`` probabilities that favour the true class by ``skill``."""
    logits = rng.normal(size=(seeds, len(labels), len(CLASSES)))
    logits[:, np.arange(len(labels)), labels] += skill
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def _write_predictions(folder: Path, mode: str, labels: np.ndarray, proba: np.ndarray) -> None:
    """``predictions_<mode>.csv`` of the seed ensemble, as a run writes it."""
    ensemble = proba.mean(axis=0)
    frame = pd.DataFrame({"path": [f"img{i}.png" for i in range(len(labels))],
                          "true": [CLASSES[t] for t in labels],
                          "predicted": [CLASSES[k] for k in ensemble.argmax(axis=1)]})
    for k, name in enumerate(CLASSES):
        frame[f"p[{name}]"] = ensemble[:, k]
    frame.to_csv(folder / predictions_file(mode), index=False)


def make_cell(folder: Path, index: int, dataset: str, ranking: list[list], selected: dict, identity: dict,
              rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    spec = MetricSpec(len(CLASSES), qwk=dataset == "aptos",
                      manufacturer_of_class=MAKERS if dataset == "pacemaker" else None)
    labels = rng.integers(0, len(CLASSES), TEST_ROWS)
    proba = {"no-ttr": _probabilities(labels, 1.0, rng, 3), "ttr": _probabilities(labels, 1.6, rng, 3)}
    primary = "qwk" if dataset == "aptos" else "top1"
    tables = [evaluate_modes(labels, proba, spec, n_boot=100, n_perm=50, seed=index, primary=primary)]
    if P_ZERO[index] is not None:
        zero = {"no-ttr (zero-shot)": _probabilities(labels, 0.5, rng, 1),
                "ttr (zero-shot)": _probabilities(labels, 0.6, rng, 1)}
        tables.append(evaluate_modes(labels, zero, spec, n_boot=100, n_perm=50, seed=index,
                                     baseline="no-ttr (zero-shot)", primary=primary))
        proba.update(zero)
    table = pd.concat(tables, ignore_index=True)
    table.loc[table["mode"] == "ttr", f"p_{primary}"] = P_PRIMARY[index]
    if P_ZERO[index] is not None:
        table.loc[table["mode"] == "ttr (zero-shot)", "p_top1"] = P_ZERO[index]
    table.to_csv(folder / "metrics.csv", index=False)
    for mode, p in proba.items():
        _write_predictions(folder, mode, labels, p)
    pd.DataFrame({"mode": ["no-ttr", "ttr"], "patch_share_above_threshold": [SHARE_NO_TTR[index], 0.0],
                  "mean_max_patch_norm": [300.0 + index, 90.0], "register_norm": [math.nan, 310.0],
                  "cls_attention_entropy": [3.0, 4.0], "cls_attention_on_register": [math.nan, 0.3]}
                 ).to_csv(folder / "outliers.csv", index=False)
    (folder / "register_neurons.json").write_text(json.dumps({
        "source": "detected", "model": identity, "highest_layer": 19, "top_k": len(sum(selected.values(), [])),
        "selected": selected, "ranked": ranking}))
    (folder / "config.json").write_text(json.dumps({
        "status": "done", "dataset": dataset, "model": "dinov2", "demo": False, "backbone": "DINOv2 vitl14",
        "register_norm_threshold_used": 150, "stage_seconds": {"total": 12.5}, "planted": [[2, 7]],
        "config": {"seed": index, "bootstrap_resamples": 100, "permutations": 50, "primary_metric": primary}}))


@pytest.fixture(scope="session")
def fake_study(tmp_path_factory) -> dict:
    """Four DINOv2 ViT-L/14 cells made by hand (one failed CLIP cell beside them), their study
    record and its report."""
    base = tmp_path_factory.mktemp("fake_study")
    rng = np.random.default_rng(0)
    identity = PAPER_IDENTITY.as_dict()
    cells = []
    for i, dataset in enumerate(("aptos", "orthonet", "pacemaker", "aptos")):
        # every (layer, neuron) of 3 layers x 8 neurons scored; some strong ones above highest_layer = 19
        pairs = [(layer, n) for layer in (14, 17, 21) for n in range(8)] + [(13, 2400), (14, 2110)]
        scores = rng.gamma(1.0, 1.0, len(pairs)) * np.where(np.array([l for l, _ in pairs]) == 21, 30, 1)
        ranked = sorted(([l, n, float(s)] for (l, n), s in zip(pairs, scores)), key=lambda r: -r[2])
        kept = [r for r in ranked if r[0] <= 19][:6]
        selected: dict[str, list[int]] = {}
        for layer, n, _ in kept:
            selected.setdefault(str(layer), []).append(n)
        name = f"{dataset}_dinov2_{i}"
        folder = base / "cells" / name
        make_cell(folder, i, dataset, ranked, selected, identity, rng)
        cells.append({"name": name, "dataset": dataset, "model": "dinov2", "settings": {"top_k": str(i)}, "main": MAIN[i],
                      "argv": [], "folder": str(folder), "status": "done", "exit_code": 0, "error": "",
                      "seconds": 1.0, "command": f"python test_{dataset}.py ...", "script": f"test_{dataset}.py"})
    cells.append({"name": "aptos_clip", "dataset": "aptos", "model": "clip", "settings": {}, "main": True, "argv": [],
                  "folder": str(base / "cells" / "aptos_clip"), "status": "failed", "exit_code": 2,
                  "error": "error: no weights", "seconds": 0.5, "command": "python test_aptos.py ...",
                  "script": "test_aptos.py"})
    record = {"cells": cells, "skipped": [{"dataset": "aptos", "model": "clip", "combination": "neurons=paper",
                                           "reason": "no published neurons"}],
              "axes": {"top_k": ["0", "1", "2", "3"]}, "datasets": {"aptos": "x", "orthonet": "x", "pacemaker": "x"},
              "models": ["dinov2", "clip"], "demo": False, "wall_seconds": 3.0, "command_line": ["python", "-m", "x"],
              "root": str(ROOT)}
    (base / "study.json").write_text(json.dumps(record))
    report = studyreport.write_report(record, base / "report")
    return {"base": base, "out": base / "report", "report": report, "record": record, "cells": cells}
