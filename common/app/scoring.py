"""The probes and the scores of one run (docs/run.md): a probe per mode on the pooled features
(and its refits on resamples of the training set), the metrics of every mode against the
baseline (and the course project's saved probes, CLIP's zero-shot prompts when asked for);
writes metrics.csv and one predictions file per row.  Rank 0 only: the features are gathered there.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from common.app.runstate import RunState
from common.app.settings import resolve_primary_metric
from common.data.registry import SPLITS, manufacturer_of
from common.evaluation.compare import evaluate_modes
from common.evaluation.metrics import MetricSpec, ensemble_predictions
from common.evaluation.probe import ProbeConfig, fit_probes
from common.evaluation.refits import refit_probabilities
from common.evaluation.zeroshot import class_embeddings, class_prompts, zero_shot_probabilities
from common.io import write_csv, write_json
from common.registers.modes import BASELINE, COURSE_SUFFIX, MODES, ZERO_SHOT_SUFFIX, predictions_file


def probe_config(config: dict) -> ProbeConfig:
    return ProbeConfig(
        lr_grid=tuple(config["probe_lr_grid"]), weight_decay_grid=tuple(config["probe_weight_decay_grid"]),
        max_epochs=config["probe_max_epochs"], patience=config["probe_patience"],
        min_delta=config["probe_min_delta"],
        class_weights=config["probe_class_weights"], seeds=tuple(config["probe_seeds"]),
    )


def _metric_spec(state: RunState) -> MetricSpec:
    names = state.dataset.class_names
    return MetricSpec(n_classes=len(names), qwk=state.spec.qwk,
                      manufacturer_of_class=[manufacturer_of(n) for n in names] if state.spec.manufacturer else None)


def _labels(state: RunState, split: str) -> np.ndarray:
    table = state.dataset.table
    return table.loc[table["split"] == split, "label"].to_numpy()


def train_probes(state: RunState) -> dict[str, np.ndarray]:
    """A probe per mode on the configured feature: each mode's test probabilities ``[S, N, C]``
    (one per probe seed); the chosen hyperparameters and any probe that did not converge are
    recorded in ``state``."""
    config = state.config
    labels = {split: _labels(state, split) for split in ("train", "val")}
    probabilities: dict[str, np.ndarray] = {}
    for mode in tqdm(state.modes, desc="probe per mode", unit="mode"):
        X = {split: state.features[(mode, split)].select(config["feature"]) for split in SPLITS}
        probabilities[mode], state.probe_choices[mode] = fit_probes(
            X["train"], labels["train"], X["val"], labels["val"], X["test"], len(state.dataset.class_names),
            probe_config(config))
        stalled = [c["seed"] for c in state.probe_choices[mode] if not c.get("converged", True)]
        if stalled:
            state.not_converged.append(
                f"{mode}: probe seed(s) {stalled} reached probe_max_epochs={config['probe_max_epochs']} with the "
                "validation loss still falling (not converged; raise probe_max_epochs)")
    if config["probe_refits"] > 0:
        # the refits compare no-ttr and ttr only (extra modes are scored by the conditional tests)
        started = time.monotonic()
        refit_modes = [mode for mode in MODES if mode in state.modes]
        state.refit_probabilities = refit_probabilities(
            {mode: tuple(state.features[(mode, split)].select(config["feature"]) for split in SPLITS)
             for mode in refit_modes},
            labels["train"], labels["val"], len(state.dataset.class_names), probe_config(config),
            config["probe_refits"], config["seed"])
        state.timings["probe_refits"] = round(time.monotonic() - started, 2)
    return probabilities


def score(state: RunState, probabilities: dict[str, np.ndarray]) -> pd.DataFrame:
    """The metrics of every mode (and the extra rows), against the baseline: metrics.csv and the
    predictions files written."""
    config, class_names = state.config, state.dataset.class_names
    probabilities = dict(probabilities)
    labels = {"test": _labels(state, "test")}
    spec = _metric_spec(state)
    options = {"n_boot": config["bootstrap_resamples"], "n_perm": config["permutations"], "seed": config["seed"],
               "primary": resolve_primary_metric(config, state.spec)}
    metrics = evaluate_modes(labels["test"], probabilities, spec, baseline=BASELINE,
                             refits=state.refit_probabilities, **options)
    extra_rows = {}
    if state.options.reference_probes:
        extra_rows[COURSE_SUFFIX] = _course_probabilities(state)
    if config["zero_shot"]:
        extra_rows[ZERO_SHOT_SUFFIX] = _zero_shot(state)
    for suffix, rows in extra_rows.items():
        metrics = pd.concat([metrics, evaluate_modes(labels["test"], rows, spec, baseline=BASELINE + suffix,
                                                     **options)], ignore_index=True)
        probabilities.update(rows)
    write_csv(state.options.out / "metrics.csv", metrics)
    test_paths = state.split_paths("test")
    for mode, per_seed in probabilities.items():
        if mode.endswith(COURSE_SUFFIX):
            continue
        ensemble = ensemble_predictions(per_seed)
        predictions = pd.DataFrame({
            "path": test_paths,
            "true": [class_names[i] for i in labels["test"]],
            "predicted": [class_names[i] for i in ensemble.argmax(axis=1)],
        })
        for index, name in enumerate(class_names):
            predictions[f"p[{name}]"] = ensemble[:, index]
        write_csv(state.options.out / predictions_file(mode), predictions)
    return metrics


def _course_probabilities(state: RunState) -> dict[str, np.ndarray]:
    """The course project's saved probes on raw pooled test features extracted the course's way
    (``state.course_features``: one zero register appended in both modes), ``[1, N, C]`` each."""
    order = state.dataset.course_class_order
    return {mode + COURSE_SUFFIX: probe.predict_proba(state.course_features[mode].pooled, order)[None]
            for mode, probe in state.course_probes.items()}


def _zero_shot(state: RunState) -> dict[str, np.ndarray]:
    """CLIP zero-shot probabilities from class-name prompts on each mode's pooled test features,
    ``[1, N, C]`` each; the prompts are written to zero_shot_prompts.json."""
    prompts = class_prompts(state.spec.name, state.dataset.class_names)
    write_json(state.options.out / "zero_shot_prompts.json", dict(zip(state.dataset.class_names, prompts)))
    text = state.backbone.text
    classes = class_embeddings(text, prompts)
    return {mode + ZERO_SHOT_SUFFIX: zero_shot_probabilities(state.features[(mode, "test")].pooled, classes,
                                                             text.logit_scale)[None]
            for mode in MODES}
