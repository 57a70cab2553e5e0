"""The probes and scores of one run (common.app.scoring) on hand-made features: the files it
writes agree with a plain recomputation from the probabilities it returned."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.app.runstate import RunState
from common.app.scoring import probe_config, score, train_probes
from common.app.settings import DatasetSpec, RunOptions, resolve_config
from common.data.registry import Dataset
from common.runtime.distributed import Dist
from common.evaluation.probe import fit_probes
from common.registers.features import FeatureSet

CLASSES = ["0 - No DR", "1 - Mild", "2 - Moderate"]


@pytest.fixture()
def state(tmp_path) -> RunState:
    """60 images of 3 classes, separable in the ttr features and barely in the no-ttr ones."""
    rng = np.random.default_rng(0)
    splits = ["train"] * 36 + ["val"] * 12 + ["test"] * 12
    labels = np.array([i % 3 for i in range(60)])
    table = pd.DataFrame({"path": [f"/data/{i:02d}.png" for i in range(60)], "label": labels,
                          "class_name": [CLASSES[k] for k in labels], "split": splits})
    centres = rng.normal(size=(3, 8))
    features = {}
    for mode, spread in (("no-ttr", 3.0), ("ttr", 0.3)):
        X = centres[labels] + spread * rng.normal(size=(60, 8))
        for split in ("train", "val", "test"):
            rows = table["split"].to_numpy() == split
            features[(mode, split)] = FeatureSet(X[rows].astype(np.float32), np.zeros((rows.sum(), 8), np.float32))
    config = resolve_config("clip", ["probe_seeds=(0, 1)", "probe_max_epochs=40", "bootstrap_resamples=50",
                                     "probe_lr_grid=(0.01,)", "probe_weight_decay_grid=(0.0001,)", "probe_refits=0",
                                     "permutations=50"])
    out = tmp_path / "out"
    out.mkdir()
    run = RunState(spec=DatasetSpec("aptos", "APTOS 2019", qwk=True), options=RunOptions("clip", None, out),
                   config=config, dist=Dist(), modes=("no-ttr", "ttr"))
    run.dataset = Dataset(name="aptos", root=tmp_path, layout="test", table=table, class_names=CLASSES)
    run.features = features
    return run


def test_files_agree_with_the_probabilities(state):
    probabilities = train_probes(state)
    assert set(probabilities) == {"no-ttr", "ttr"}
    assert all(p.shape == (2, 12, 3) for p in probabilities.values())     # [seeds, test images, classes]
    assert [c["seed"] for c in state.probe_choices["ttr"]] == [0, 1]
    metrics = score(state, probabilities)
    pd.testing.assert_frame_equal(pd.read_csv(state.options.out / "metrics.csv"), metrics, check_dtype=False)
    assert list(metrics["mode"]) == ["no-ttr", "ttr"] and "qwk" in metrics.columns
    truth = state.dataset.table.query("split == 'test'")["label"].to_numpy()
    for mode in ("no-ttr", "ttr"):
        predictions = pd.read_csv(state.options.out / f"predictions_{mode}.csv")
        mean = probabilities[mode].astype(np.float64).mean(axis=0)              # the seed ensemble
        assert list(predictions["path"]) == state.split_paths("test")
        assert list(predictions["true"]) == [CLASSES[k] for k in truth]
        assert list(predictions["predicted"]) == [CLASSES[k] for k in mean.argmax(axis=1)]
        np.testing.assert_allclose(predictions[[f"p[{c}]" for c in CLASSES]].to_numpy(), mean, rtol=1e-6)
        accuracy = float(np.mean(mean.argmax(axis=1) == truth))
        assert metrics.set_index("mode").loc[mode, "top1"] == pytest.approx(accuracy)
    assert metrics.set_index("mode").loc["ttr", "top1"] == 1.0
    # APTOS: the primary metric is quadratic weighted kappa; no refits asked for
    assert "mde_qwk" in metrics.columns and (metrics["refits"] == 0).all() and not state.refit_probabilities


def test_probe_refits_train_both_modes_on_the_same_resamples(state):
    state.config["probe_refits"] = 2
    probabilities = train_probes(state)
    refits = state.refit_probabilities
    assert set(refits) == {"no-ttr", "ttr"} and all(r.shape == (2, 12, 3) for r in refits.values())
    assert state.timings["probe_refits"] >= 0
    # refit 1 of ttr, by hand: the probe procedure on the documented training resample
    rows = np.random.default_rng([state.config["seed"], 2]).integers(0, 36, size=(2, 36))[1]
    train = state.dataset.table.query("split == 'train'")["label"].to_numpy()
    val = state.dataset.table.query("split == 'val'")["label"].to_numpy()
    X = {split: state.features[("ttr", split)].pooled for split in ("train", "val", "test")}
    proba, _ = fit_probes(X["train"][rows], train[rows], X["val"], val, X["test"], 3, probe_config(state.config))
    np.testing.assert_allclose(refits["ttr"][1], proba.astype(np.float64).mean(axis=0), rtol=1e-6)
    metrics = score(state, probabilities).set_index("mode")
    assert metrics.loc["ttr", "refits"] == 2 and np.isfinite(metrics.loc["ttr", "qwk_diff_lo_refit"])


def test_a_probe_stopped_by_max_epochs_is_noted(state):
    state.config["probe_max_epochs"] = 1
    train_probes(state)
    assert len(state.not_converged) == 2
    assert all("probe_max_epochs=1" in note and "not converged" in note for note in state.not_converged)


def test_a_control_is_scored_exactly_like_ttr(state):
    """A control whose features are ttr's gets ttr's probes and ttr's comparison with no-ttr, column
    for column, except the probe refits, which apply to ttr only; its predictions file is written."""
    for split in ("train", "val", "test"):
        state.features[("ttr-mean", split)] = state.features[("ttr", split)]
    state.modes = ("no-ttr", "ttr", "ttr-mean")
    state.config["probe_refits"] = 1
    probabilities = train_probes(state)
    np.testing.assert_array_equal(probabilities["ttr-mean"], probabilities["ttr"])
    assert set(state.refit_probabilities) == {"no-ttr", "ttr"}
    metrics = score(state, probabilities).set_index("mode")
    refit_columns = [c for c in metrics.columns if "refit" in c]
    pd.testing.assert_series_equal(metrics.loc["ttr-mean"].drop(refit_columns), metrics.loc["ttr"].drop(refit_columns),
                                   check_names=False)
    assert metrics.loc["ttr-mean", "refits"] == 0 and metrics.loc["ttr", "refits"] == 1
    assert (state.options.out / "predictions_ttr-mean.csv").is_file()
