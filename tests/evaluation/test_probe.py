"""The linear probe: learning, early stopping with the best epoch restored, determinism,
hyper-parameter selection, convergence, threads and input validation (docs/run.md).

:class:`LinearProbe` (one probe at a time, stock torch parts) is the reference; the batched
grid behind :func:`fit_probe` / :func:`fit_probes` is tested against it member by member."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss
from sklearn.utils.class_weight import compute_class_weight

import common.evaluation.probe as probe_module
from common.errors import UserError
from common.evaluation.probe import LinearProbe, ProbeConfig, fit_probe, fit_probes

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


def noisy_data(seed: int = 1, n: int = 80, nv: int = 200, d: int = 20, c: int = 3, flip: float = 0.3):
    """A linear rule with 30% of the training labels randomised: the probes reach their best
    validation loss at different epochs, fast learning rates stop early, slow ones do not."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(d, c))
    X = (rng.normal(size=(n + nv, d)) * 2.0 + 1.0).astype(np.float32)
    y = (X @ W).argmax(axis=1)
    flipped = rng.random(n) < flip
    y[:n][flipped] = rng.integers(0, c, flipped.sum())
    return X[:n], y[:n], X[n:], y[n:]


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
    reference = {}
    for lr in cfg.lr_grid:
        for wd in cfg.weight_decay_grid:
            reference[(lr, wd)] = LinearProbe(3, lr, wd, cfg, seed=0).fit(X_tr, y_tr, X_va, y_va)
    losses = {key: p.best_val_loss_ for key, p in reference.items()}
    best = min(losses, key=losses.get)
    assert sorted(losses.values())[1] - losses[best] > 1e-3  # a clear winner, not a round-off tie
    assert (chosen["lr"], chosen["weight_decay"]) == best
    assert chosen["val_loss"] == probe.best_val_loss_ == pytest.approx(losses[best], rel=1e-5)
    assert chosen["best_epoch"] == probe.best_epoch_ == reference[best].best_epoch_
    assert chosen["epochs_run"] == probe.n_epochs_run_ == reference[best].n_epochs_run_
    assert chosen["converged"] is probe.converged_ is reference[best].converged_
    assert len(set(losses.values())) > 1  # the grid actually matters here
    np.testing.assert_allclose(probe.predict_proba(X_va), reference[best].predict_proba(X_va), atol=2e-5)


def test_fit_probes_one_probe_per_seed():
    X, y = separable(300)
    cfg = ProbeConfig(lr_grid=(1e-2,), weight_decay_grid=(1e-4, 1e-2), max_epochs=10, seeds=(0, 7))
    proba, chosen = fit_probes(X[:150], y[:150], X[150:200], y[150:200], X[200:], 3, cfg)
    assert proba.shape == (2, 100, 3) and proba.dtype == np.float32
    assert [c["seed"] for c in chosen] == [0, 7]
    keys = {"seed", "lr", "weight_decay", "val_loss", "best_epoch", "epochs_run", "converged"}
    assert all(set(c) == keys for c in chosen)
    assert all(isinstance(c["converged"], bool) for c in chosen)
    probe, params = fit_probe(X[:150], y[:150], X[150:200], y[150:200], 3, cfg, seed=7)
    assert params == chosen[1]
    assert np.array_equal(proba[1], probe.predict_proba(X[200:]))
    assert not np.array_equal(proba[0], proba[1])


# --------------------------------------------------------------------------- the batched grid


def batched(X_tr, y_tr, X_va, y_va, n_classes, cfg, seed, grid=None):
    """The whole grid of ``cfg`` (or ``grid``) for one seed, every member exposed."""
    data = probe_module._prepare(X_tr, y_tr, X_va, y_va, n_classes, cfg)
    with probe_module._probe_threads():
        fit = probe_module._fit_grid(data, grid or probe_module._grid(cfg), cfg, seed)
    return fit, data


def assert_member_equals_reference(fit, g, data, reference, X_va):
    """Member ``g`` of a batched fit equals the one-at-a-time probe up to float32 round-off."""
    ref_val = np.sort([h["val_loss"] for h in reference.history_])
    # The problem must not hinge on a round-off tie (two epochs' losses within ~1e-7), or
    # the best epoch would be decided by round-off rather than by the procedure.
    assert len(ref_val) < 2 or ref_val[1] - ref_val[0] > 3e-6, "test problem has a near-tie"
    assert fit.best_epoch[g] == reference.best_epoch_
    assert fit.epochs_run[g] == reference.n_epochs_run_ == len(fit.history[g])
    assert fit.converged[g] == reference.converged_
    for key in ("val_loss", "train_loss", "lr"):
        np.testing.assert_allclose([h[key] for h in fit.history[g]], [h[key] for h in reference.history_],
                                   rtol=1e-5, atol=1e-7, err_msg=key)
    assert fit.best_val_loss[g] == pytest.approx(reference.best_val_loss_, rel=1e-5)
    np.testing.assert_allclose(fit.weight[g].numpy(), reference.model_.weight.detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(fit.bias[g].numpy(), reference.model_.bias.detach().numpy(), atol=2e-5)
    member = probe_module._member_probe(fit, g, data, reference.config)
    np.testing.assert_allclose(member.predict_proba(X_va), reference.predict_proba(X_va), atol=2e-5)


@pytest.mark.parametrize("class_weights, grad_clip", [(False, 1.0), (True, 0.05), (False, None)])
def test_batched_members_equal_the_one_at_a_time_reference(class_weights, grad_clip):
    X_tr, y_tr, X_va, y_va = noisy_data()
    cfg = ProbeConfig(lr_grid=(3e-3, 1e-2, 5e-2), weight_decay_grid=(0.0, 1.0), max_epochs=30, patience=5,
                      batch_size=16, grad_clip=grad_clip, class_weights=class_weights, seeds=(3,))
    fit, data = batched(X_tr, y_tr, X_va, y_va, 3, cfg, seed=3)
    assert [(lr, wd) for lr, wd in zip(fit.lrs, fit.weight_decays)] == probe_module._grid(cfg)
    for g, (lr, wd) in enumerate(probe_module._grid(cfg)):
        reference = LinearProbe(3, lr, wd, cfg, seed=3).fit(X_tr, y_tr, X_va, y_va)
        assert_member_equals_reference(fit, g, data, reference, X_va)
    assert len(set(fit.epochs_run)) > 1  # members stopped at different epochs
    assert any(fit.converged) and not all(fit.converged)


def test_best_epoch_is_restored_per_member():
    X_tr, y_tr, X_va, y_va = overfitting_data()
    cfg = ProbeConfig(lr_grid=(3e-3, 3e-2), weight_decay_grid=(0.0, 0.1), max_epochs=150, patience=10,
                      batch_size=16, seeds=(0,))
    fit, data = batched(X_tr, y_tr, X_va, y_va, 3, cfg, seed=0)
    restored_epochs = set()
    for g in range(len(fit.lrs)):
        val_losses = [h["val_loss"] for h in fit.history[g]]
        assert fit.best_epoch[g] == int(np.argmin(val_losses)) + 1 < fit.epochs_run[g]
        assert fit.best_val_loss[g] == min(val_losses) < val_losses[-1]
        proba = probe_module._member_probe(fit, g, data, cfg).predict_proba(X_va).astype(np.float64)
        restored = log_loss(y_va, proba / proba.sum(axis=1, keepdims=True), labels=[0, 1, 2])
        assert restored == pytest.approx(min(val_losses), rel=1e-4)  # this member's own best epoch
        assert restored < val_losses[-1] - 1e-3
        restored_epochs.add(fit.best_epoch[g])
    assert len(restored_epochs) > 1  # the members' best epochs differ: each restored its own


def test_a_stopped_member_stops_changing():
    X_tr, y_tr, X_va, y_va = overfitting_data(seed=3)
    cfg = ProbeConfig(lr_grid=(1e-1, 1e-3), weight_decay_grid=(1e-2,), max_epochs=80, patience=5,
                      batch_size=8, seeds=(0,))
    fit, data = batched(X_tr, y_tr, X_va, y_va, 3, cfg, seed=0)
    fast, slow = 0, 1
    assert fit.converged[fast] and fit.epochs_run[fast] + 10 < fit.epochs_run[slow]
    # Trained beside a member that went on for many more epochs, the early-stopped member ends
    # exactly where it ends alone (same epochs, same best epoch, same weights) ...
    alone, _ = batched(X_tr, y_tr, X_va, y_va, 3, cfg, seed=0, grid=[probe_module._grid(cfg)[fast]])
    assert len(fit.history[fast]) == fit.epochs_run[fast] == alone.epochs_run[0]
    assert fit.best_epoch[fast] == alone.best_epoch[0]
    np.testing.assert_allclose(fit.weight[fast].numpy(), alone.weight[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(fit.bias[fast].numpy(), alone.bias[0].numpy(), atol=1e-6)
    # ... and where the one-at-a-time reference ends.
    reference = LinearProbe(3, 1e-1, 1e-2, cfg, seed=0).fit(X_tr, y_tr, X_va, y_va)
    assert_member_equals_reference(fit, fast, data, reference, X_va)


def test_gradient_clipping_is_per_member():
    X_tr, y_tr, X_va, y_va = noisy_data()
    cfg = ProbeConfig(lr_grid=(1e-2, 5e-2), weight_decay_grid=(0.0,), max_epochs=25, patience=5,
                      batch_size=16, grad_clip=0.05, seeds=(0,))
    fit, data = batched(X_tr, y_tr, X_va, y_va, 3, cfg, seed=0)
    unclipped, _ = batched(X_tr, y_tr, X_va, y_va, 3, ProbeConfig(**{**vars(cfg), "grad_clip": None}), seed=0)
    for g, pair in enumerate(probe_module._grid(cfg)):
        assert np.abs(fit.weight[g].numpy() - unclipped.weight[g].numpy()).max() > 1e-3  # clipping bites
        # each member clipped on its own norm: the same as trained alone and as clip_grad_norm_ alone
        alone, _ = batched(X_tr, y_tr, X_va, y_va, 3, cfg, seed=0, grid=[pair])
        np.testing.assert_allclose(fit.weight[g].numpy(), alone.weight[0].numpy(), atol=1e-6)
        reference = LinearProbe(3, *pair, cfg, seed=0).fit(X_tr, y_tr, X_va, y_va)
        assert_member_equals_reference(fit, g, data, reference, X_va)


# --------------------------------------------------------------------------- convergence


def test_converged_when_early_stopping_fires(caplog):
    X_tr, y_tr, X_va, y_va = overfitting_data()
    cfg = ProbeConfig(lr_grid=(3e-2,), weight_decay_grid=(0.0,), max_epochs=150, patience=10, batch_size=16,
                      seeds=(0, 1))
    with caplog.at_level(logging.WARNING, logger="common.evaluation.probe"):
        _, chosen = fit_probes(X_tr, y_tr, X_va, y_va, X_va[:5], 3, cfg)
    for c in chosen:
        assert c["converged"] is True
        assert c["epochs_run"] < cfg.max_epochs
        assert c["epochs_run"] - c["best_epoch"] == cfg.patience
    assert not [r for r in caplog.records if "did not converge" in r.getMessage()]


def test_not_converged_when_max_epochs_is_too_small(caplog):
    X_tr, y_tr, X_va, y_va = overfitting_data()
    cfg = ProbeConfig(lr_grid=(1e-3, 3e-2), weight_decay_grid=(0.0,), max_epochs=4, patience=10, batch_size=16,
                      seeds=(0, 1))
    with caplog.at_level(logging.WARNING, logger="common.evaluation.probe"):
        _, chosen = fit_probes(X_tr, y_tr, X_va, y_va, X_va[:5], 3, cfg)
    for c in chosen:
        assert c["converged"] is False
        assert c["epochs_run"] == cfg.max_epochs and c["best_epoch"] > cfg.max_epochs - cfg.patience
    warnings = [r for r in caplog.records if "did not converge" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # one warning per mode's probe
    assert "2 of 2 seeds" in warnings[0].getMessage() and "max_epochs=4" in warnings[0].getMessage()
    # the reference agrees on the definition
    reference = LinearProbe(3, chosen[0]["lr"], 0.0, cfg, seed=0).fit(X_tr, y_tr, X_va, y_va)
    assert reference.converged_ is False and reference.n_epochs_run_ == cfg.max_epochs


# --------------------------------------------------------------------------- threads, determinism


@pytest.mark.parametrize("workers", [1, 2])
def test_probe_runs_on_one_thread_and_restores_the_setting(monkeypatch, workers):
    X, y = separable(200)
    seen: list[int] = []
    real_fit_grid = probe_module._fit_grid

    def recording_fit_grid(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_fit_grid(*args, **kwargs)

    monkeypatch.setattr(probe_module, "_fit_grid", recording_fit_grid)
    monkeypatch.setattr(probe_module, "PROBE_WORKERS", workers)
    cfg = ProbeConfig(lr_grid=(1e-2,), weight_decay_grid=(1e-4,), max_epochs=3, seeds=(0, 1, 2))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        fit_probes(X[:100], y[:100], X[100:150], y[100:150], X[150:], 3, cfg)
        assert seen == [1, 1, 1]
        assert torch.get_num_threads() == 3
        LinearProbe(3, 1e-2, 1e-4, cfg, seed=0).fit(X[:100], y[:100], X[100:150], y[100:150])
        assert torch.get_num_threads() == 3

        def failing_fit_grid(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(probe_module, "_fit_grid", failing_fit_grid)
        with pytest.raises(RuntimeError, match="boom"):
            fit_probes(X[:100], y[:100], X[100:150], y[100:150], X[150:], 3, cfg)
        assert torch.get_num_threads() == 3  # restored after a failure too
    finally:
        torch.set_num_threads(previous)


def test_a_failing_seed_stops_the_other_workers(monkeypatch):
    X, y = separable(200)
    cfg = ProbeConfig(lr_grid=(1e-2,), weight_decay_grid=(1e-4,), max_epochs=20_000, patience=20_000,
                      seeds=(0, 1))
    real_fit_grid = probe_module._fit_grid
    started = threading.Event()
    cancelled: list[int] = []

    def fit_grid(data, grid, config, seed, cancel=None):
        if seed == 1:
            started.wait(timeout=30)  # fail while seed 0 is training
            raise ValueError("seed 1 failed")
        started.set()
        try:
            return real_fit_grid(data, grid, config, seed, cancel)  # 20,000 epochs: about a minute
        except probe_module._Cancelled:
            cancelled.append(seed)
            raise

    monkeypatch.setattr(probe_module, "_fit_grid", fit_grid)
    monkeypatch.setattr(probe_module, "PROBE_WORKERS", 2)
    with pytest.raises(ValueError, match="seed 1 failed"):
        fit_probes(X[:100], y[:100], X[100:150], y[100:150], X[150:], 3, cfg)
    assert cancelled == [0]


def test_fit_probes_is_bit_identical_whatever_the_worker_count(monkeypatch):
    X, y = separable(300, d=12, c=4, seed=5)
    cfg = ProbeConfig(lr_grid=(1e-2, 3e-2), weight_decay_grid=(1e-4, 1e-1), max_epochs=15, patience=4,
                      batch_size=32, seeds=(0, 1, 2))
    args = (X[:150], y[:150], X[150:200], y[150:200], X[200:], 4, cfg)
    monkeypatch.setattr(probe_module, "PROBE_WORKERS", 1)
    a, chosen_a = fit_probes(*args)
    b, chosen_b = fit_probes(*args)
    monkeypatch.setattr(probe_module, "PROBE_WORKERS", 3)
    c, chosen_c = fit_probes(*args)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert chosen_a == chosen_b == chosen_c
    assert not np.array_equal(a[0], a[1])  # the seeds differ


def test_fit_probes_leaves_the_global_rngs_alone():
    X, y = separable(200)
    cfg = ProbeConfig(lr_grid=(1e-2,), weight_decay_grid=(1e-4, 1e-2), max_epochs=5, seeds=(0, 1))
    torch.manual_seed(123)
    np.random.seed(7)
    expected_torch, expected_numpy = torch.rand(3), np.random.random(3)
    torch.manual_seed(123)
    np.random.seed(7)
    fit_probes(X[:100], y[:100], X[100:150], y[100:150], X[150:], 3, cfg)
    assert torch.equal(torch.rand(3), expected_torch)
    assert np.array_equal(np.random.random(3), expected_numpy)


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
@pytest.mark.parametrize("entry", ["LinearProbe", "fit_probe", "fit_probes"])
def test_bad_inputs_raise_user_error(mutate, match, entry):
    X, y = separable(200)
    d = {"X_tr": X[:100], "y_tr": y[:100], "X_va": X[100:], "y_va": y[100:]}
    mutate(d)
    with pytest.raises(UserError, match=match):
        if entry == "LinearProbe":
            LinearProbe(3, 1e-2, 1e-4, FAST, seed=0).fit(d["X_tr"], d["y_tr"], d["X_va"], d["y_va"])
        elif entry == "fit_probe":
            fit_probe(d["X_tr"], d["y_tr"], d["X_va"], d["y_va"], 3, FAST, seed=0)
        else:
            fit_probes(d["X_tr"], d["y_tr"], d["X_va"], d["y_va"], X[:10], 3, FAST)


def test_bad_test_features_and_settings_raise_user_error():
    X, y = separable(200)
    probe = LinearProbe(3, 1e-2, 1e-4, FAST, seed=0).fit(X[:100], y[:100], X[100:150], y[100:150])
    bad = X[150:].copy()
    bad[0, 0] = np.nan
    with pytest.raises(UserError, match="test features contain NaN"):
        probe.predict_proba(bad, split="test")
    with pytest.raises(UserError, match="test features contain NaN"):
        fit_probes(X[:100], y[:100], X[100:150], y[100:150], bad, 3, FAST)
    with pytest.raises(UserError, match="test features have 3 columns"):
        fit_probes(X[:100], y[:100], X[100:150], y[100:150], X[150:, :3], 3, FAST)
    with pytest.raises(UserError, match="n_classes"):
        fit_probes(X[:100], y[:100], X[100:150], y[100:150], X[150:], 1, FAST)
    with pytest.raises(UserError, match="n_classes"):
        LinearProbe(1, 1e-2, 1e-4, FAST, seed=0)
    with pytest.raises(UserError, match="lr"):
        LinearProbe(3, -1.0, 1e-4, FAST, seed=0)
    with pytest.raises(UserError, match="patience"):
        ProbeConfig(patience=0)
    with pytest.raises(UserError, match="lr_grid"):
        ProbeConfig(lr_grid=())


def test_improvements_smaller_than_min_delta_do_not_count():
    """Early stopping counts an epoch as better only when the validation loss falls by more than
    ``min_delta`` of the best (relative): a loss creeping down forever still lets it fire."""
    config = ProbeConfig(min_delta=1e-3)
    assert config.improves(0.998, 1.0) and not config.improves(0.9995, 1.0)
    assert config.improves(5.0, float("inf"))
    assert ProbeConfig(min_delta=0.0).improves(0.9999999, 1.0)
    with pytest.raises(UserError, match="min_delta"):
        ProbeConfig(min_delta=1.5)
