"""The linear probe: learning, early stopping with the best epoch restored, determinism,
hyper-parameter selection and input validation (SPEC §7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss
from sklearn.utils.class_weight import compute_class_weight

from common.errors import UserError
from common.probe import LinearProbe, ProbeConfig, fit_probe, fit_probes

FAST = ProbeConfig(lr_grid=(1e-2,), weight_decay_grid=(1e-4,), max_epochs=40, patience=8, batch_size=64, seeds=(0,))


def separable(n: int, d: int = 8, c: int = 3, seed: int = 0, margin: float = 2.0):
    """Points labelled by a linear rule, keeping only those with a clear margin."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(d, c))
    X = rng.normal(size=(4 * n, d)) * 3.0 + 5.0  # off-centre and scaled: standardisation matters
    scores = (X - 5.0) @ W
    top2 = np.sort(scores, axis=1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) > margin
    X, y = X[keep][:n], scores[keep].argmax(axis=1)[:n]
    assert len(y) == n and len(np.unique(y)) == c
    return X.astype(np.float32), y


def overfitting_data(seed: int = 0):
    """Tiny train set with many features and noisy labels: val loss falls, then rises."""
    rng = np.random.default_rng(seed)
    d, c = 100, 3
    W = rng.normal(size=(d, c))
    X_tr = rng.normal(size=(30, d)).astype(np.float32)
    y_tr = (X_tr @ W).argmax(axis=1)
    flip = rng.random(30) < 0.4
    y_tr[flip] = rng.integers(0, c, flip.sum())
    X_va = rng.normal(size=(300, d)).astype(np.float32)
    y_va = (X_va @ W).argmax(axis=1)
    return X_tr, y_tr, X_va, y_va


def test_learns_a_linearly_separable_problem():
    X, y = separable(600)
    probe = LinearProbe(3, 1e-2, 1e-4, FAST, seed=0).fit(X[:300], y[:300], X[300:400], y[300:400])
    proba = probe.predict_proba(X[400:])
    assert proba.shape == (200, 3) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (proba.argmax(axis=1) == y[400:]).mean() > 0.95


def test_standardisation_uses_train_statistics_and_floors_constant_features():
    X, y = separable(300)
    X = np.c_[X, np.full(len(X), 7.0, dtype=np.float32)]  # a constant feature on train
    probe = LinearProbe(3, 1e-2, 1e-4, FAST, seed=0).fit(X[:200], y[:200], X[200:], y[200:])
    np.testing.assert_allclose(probe.mean_, X[:200].astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probe.std_[:-1], X[:200, :-1].astype(np.float64).std(axis=0), rtol=1e-5)
    assert probe.std_[-1] == 1.0  # constant feature: centred, not divided by ~0
    X_shift = X[200:].copy()
    X_shift[:, -1] = 1000.0  # the constant feature moves at test time
    assert np.all(np.isfinite(probe.predict_proba(X_shift)))


def test_best_epoch_is_restored():
    X_tr, y_tr, X_va, y_va = overfitting_data()
    cfg = ProbeConfig(max_epochs=150, patience=10, batch_size=16, seeds=(0,))
    probe = LinearProbe(3, 3e-2, 0.0, cfg, seed=0).fit(X_tr, y_tr, X_va, y_va)
    val_losses = [h["val_loss"] for h in probe.history_]
    assert [h["epoch"] for h in probe.history_] == list(range(1, len(val_losses) + 1))
    assert probe.n_epochs_run_ == len(val_losses) < cfg.max_epochs  # early stopping fired
    assert probe.best_epoch_ < len(val_losses)
    assert probe.best_epoch_ == int(np.argmin(val_losses)) + 1
    assert probe.best_val_loss_ == min(val_losses)
    assert val_losses[-1] > min(val_losses)  # validation loss did rise after the best epoch
    # the returned model is the best epoch's: its val loss, computed independently, is the minimum
    proba = probe.predict_proba(X_va).astype(np.float64)
    restored = log_loss(y_va, proba / proba.sum(axis=1, keepdims=True), labels=[0, 1, 2])
    assert restored == pytest.approx(min(val_losses), rel=1e-4)
    assert restored < val_losses[-1] - 1e-3


def test_same_seed_is_bit_identical_and_other_seed_differs():
    X, y = separable(300)
    fit = lambda seed: LinearProbe(3, 1e-2, 1e-4, FAST, seed).fit(X[:150], y[:150], X[150:200], y[150:200])
    a, b, c = fit(0).predict_proba(X[200:]), fit(0).predict_proba(X[200:]), fit(1).predict_proba(X[200:])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_probe_leaves_the_global_rng_alone():
    X, y = separable(200)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    LinearProbe(3, 1e-2, 1e-4, FAST, seed=5).fit(X[:100], y[:100], X[100:], y[100:])
    assert torch.equal(torch.rand(3), expected)


def test_class_absent_from_train_still_gets_a_column():
    X, y = separable(300)
    probe = LinearProbe(5, 1e-2, 1e-4, FAST, seed=0).fit(X[:150], y[:150], X[150:200], y[150:200])
    proba = probe.predict_proba(X[200:])
    assert proba.shape == (100, 5)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    # val may hold a class the train split lacks
    y_val = y[150:200].copy()
    y_val[0] = 4
    LinearProbe(5, 1e-2, 1e-4, FAST, seed=0).fit(X[:150], y[:150], X[150:200], y_val)


def test_balanced_class_weights_match_sklearn():
    X, y = separable(300)
    y_tr = y[:200].copy()
    y_tr[:120] = 0  # imbalanced
    cfg = ProbeConfig(lr_grid=(1e-2,), weight_decay_grid=(1e-4,), max_epochs=5, class_weights=True, seeds=(0,))
    probe = LinearProbe(4, 1e-2, 1e-4, cfg, seed=0).fit(X[:200], y_tr, X[200:], y[200:])
    present = np.unique(y_tr)
    expected = compute_class_weight("balanced", classes=present, y=y_tr)
    np.testing.assert_allclose(probe.class_weight_[present], expected, rtol=1e-6)
    assert probe.class_weight_[3] == 1.0  # class 3 absent from train: neutral weight
    off = LinearProbe(4, 1e-2, 1e-4, FAST, seed=0).fit(X[:200], y_tr, X[200:], y[200:])
    assert off.class_weight_ is None


def test_fit_probe_picks_the_grid_point_with_lowest_val_loss():
    X_tr, y_tr, X_va, y_va = overfitting_data(seed=1)
    cfg = ProbeConfig(lr_grid=(1e-3, 3e-2), weight_decay_grid=(0.0, 1.0), max_epochs=40, patience=5,
                      batch_size=16, seeds=(0,))
    probe, chosen = fit_probe(X_tr, y_tr, X_va, y_va, 3, cfg, seed=0)
    losses = {}
    for lr in cfg.lr_grid:
        for wd in cfg.weight_decay_grid:
            losses[(lr, wd)] = LinearProbe(3, lr, wd, cfg, seed=0).fit(X_tr, y_tr, X_va, y_va).best_val_loss_
    best = min(losses, key=losses.get)
    assert (chosen["lr"], chosen["weight_decay"]) == best
    assert chosen["val_loss"] == losses[best] == probe.best_val_loss_
    assert chosen["best_epoch"] == probe.best_epoch_
    assert len(set(losses.values())) > 1  # the grid actually matters here
    refit = LinearProbe(3, *best, cfg, seed=0).fit(X_tr, y_tr, X_va, y_va)
    assert np.array_equal(refit.predict_proba(X_va), probe.predict_proba(X_va))


def test_fit_probes_one_probe_per_seed():
    X, y = separable(300)
    cfg = ProbeConfig(lr_grid=(1e-2,), weight_decay_grid=(1e-4, 1e-2), max_epochs=10, seeds=(0, 7))
    proba, chosen = fit_probes(X[:150], y[:150], X[150:200], y[150:200], X[200:], 3, cfg)
    assert proba.shape == (2, 100, 3)
    assert [c["seed"] for c in chosen] == [0, 7]
    assert all({"lr", "weight_decay", "val_loss", "best_epoch"} <= set(c) for c in chosen)
    probe, _ = fit_probe(X[:150], y[:150], X[150:200], y[150:200], 3, cfg, seed=7)
    assert np.array_equal(proba[1], probe.predict_proba(X[200:]))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(X_tr=np.where(np.arange(d["X_tr"].size).reshape(d["X_tr"].shape) == 5, np.nan, d["X_tr"])), "train features contain NaN"),
        (lambda d: d.update(X_va=np.full_like(d["X_va"], np.inf)), "val features contain NaN or inf"),
        (lambda d: d.update(y_tr=d["y_tr"][:-1]), "train has 100 feature rows but 99 labels"),
        (lambda d: d.update(y_va=np.where(np.arange(len(d["y_va"])) == 0, 3, d["y_va"])), "val label 3 is outside"),
        (lambda d: d.update(y_tr=np.where(np.arange(len(d["y_tr"])) == 0, -1, d["y_tr"])), "train label -1 is outside"),
        (lambda d: d.update(y_tr=np.zeros_like(d["y_tr"])), "at least 2 classes"),
        (lambda d: d.update(X_va=d["X_va"][:0], y_va=d["y_va"][:0]), "val split is empty"),
        (lambda d: d.update(X_tr=d["X_tr"][:, 0]), "expected a 2-D array"),
        (lambda d: d.update(X_va=d["X_va"][:, :3]), "val features have 3 columns"),
        (lambda d: d.update(y_tr=d["y_tr"] + 0.5), "not whole numbers"),
    ],
)
def test_bad_inputs_raise_user_error(mutate, match):
    X, y = separable(200)
    d = {"X_tr": X[:100], "y_tr": y[:100], "X_va": X[100:], "y_va": y[100:]}
    mutate(d)
    with pytest.raises(UserError, match=match):
        LinearProbe(3, 1e-2, 1e-4, FAST, seed=0).fit(d["X_tr"], d["y_tr"], d["X_va"], d["y_va"])


def test_bad_test_features_and_settings_raise_user_error():
    X, y = separable(200)
    probe = LinearProbe(3, 1e-2, 1e-4, FAST, seed=0).fit(X[:100], y[:100], X[100:150], y[100:150])
    bad = X[150:].copy()
    bad[0, 0] = np.nan
    with pytest.raises(UserError, match="test features contain NaN"):
        probe.predict_proba(bad, split="test")
    with pytest.raises(UserError, match="test features contain NaN"):
        fit_probes(X[:100], y[:100], X[100:150], y[100:150], bad, 3, FAST)
    with pytest.raises(UserError, match="n_classes"):
        LinearProbe(1, 1e-2, 1e-4, FAST, seed=0)
    with pytest.raises(UserError, match="lr"):
        LinearProbe(3, -1.0, 1e-4, FAST, seed=0)
    with pytest.raises(UserError, match="patience"):
        ProbeConfig(patience=0)
    with pytest.raises(UserError, match="lr_grid"):
        ProbeConfig(lr_grid=())
