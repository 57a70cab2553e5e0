"""The controls of docs/intervention.md ("Controls"): random neurons, the register substitutes
(ttr-mean, ttr-noise, ttr-shuffle) and the trained-register substitutes, each checked against a
hand computation from activations read with plain torch hooks on a small model."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from common.demo.fixture import fixture_images, make_planted_model
from common.errors import UserError
from common.models.hooks import HookedViT, mlp_post
from common.registers.controls import (
    ControlInputs,
    extract_mode_batch,
    mode_setup,
    neurons_hash,
    random_neurons,
)
from common.registers.detection import detect_register_neurons
from common.registers.features import extract_batch
from common.registers.intervention import Intervention, apply_intervention, derangement
from common.registers.modes import (
    CONTROLS,
    EXTRA_MODES,
    TRAINED_CONTROLS,
    applicable_controls,
    draw_index,
    draw_modes,
    is_control,
    run_modes,
)
from common.registers.trained import substitute_trained, trained_register_stats

SEED = 7


def seeded_normal(shape, *parts):
    """The documented stream, written out: a torch CPU generator seeded by numpy's SeedSequence."""
    state = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(state))


def to_batch(backbone, images):
    return torch.stack([backbone.preprocess(PIL.Image.fromarray(image)) for image in images])


def own_signed_max(values: torch.Tensor) -> float:
    largest, most_negative = values.max(), values.min()
    return float(largest if largest.abs() > most_negative.abs() else most_negative)


# ------------------------------------------------------------------------------------------
# names


def test_mode_names_and_expansion():
    assert set(CONTROLS) <= set(EXTRA_MODES) and "no-ttr-removed" in CONTROLS
    assert draw_modes(3) == ("ttr-random-01", "ttr-random-02", "ttr-random-03")
    assert draw_modes(100)[0] == "ttr-random-001" and draw_index("ttr-random-007") == 7
    assert draw_index("ttr-random") is None and draw_index("ttr") is None
    assert is_control("ttr-random-02") and is_control("trained-zero") and not is_control("ttr")
    assert set(TRAINED_CONTROLS).isdisjoint(applicable_controls(0))
    assert set(TRAINED_CONTROLS) <= set(applicable_controls(4))
    modes = run_modes(("ttr-mean",), controls=True, random_draws=2, trained_registers=0)
    assert modes == ("no-ttr", "ttr", "no-ttr-removed", "ttr-mean", "ttr-noise", "ttr-shuffle",
                     "ttr-random-01", "ttr-random-02")
    assert run_modes((), controls=False, random_draws=5, trained_registers=4) == ("no-ttr", "ttr")
    assert run_modes(("trained-zero", "ttr-random"), controls=False, random_draws=1, trained_registers=4) == \
        ("no-ttr", "ttr", "trained-zero", "ttr-random-01")
    with pytest.raises(ValueError, match="trained registers"):
        run_modes(("trained-mean",), controls=False, random_draws=1, trained_registers=0)


# ------------------------------------------------------------------------------------------
# random neurons


SELECTED = {2: [5, 9, 40], 3: [0], 7: [1, 2, 3, 4, 5, 6, 7, 8]}


def test_random_draws_avoid_the_selection_and_match_the_layer_histogram():
    width = 64
    draws = [random_neurons(SELECTED, width, SEED, k) for k in range(1, 201)]
    for drawn in draws:
        assert sorted(drawn) == sorted(SELECTED)                               # the same layers
        for layer, ids in drawn.items():
            assert len(ids) == len(SELECTED[layer]) == len(set(ids))           # as many, distinct
            assert not set(ids) & set(SELECTED[layer])                         # never a selected neuron
            assert all(0 <= n < width for n in ids) and ids == sorted(ids)
    # reproducible by seed and draw number; different draws and seeds differ
    assert random_neurons(SELECTED, width, SEED, 3) == draws[2]
    assert len({neurons_hash(d) for d in draws}) == len(draws)
    assert random_neurons(SELECTED, width, SEED + 1, 3) != draws[2]
    # every non-selected neuron of layer 2 comes up over 200 draws (uniform among the others)
    assert set().union(*(d[2] for d in draws)) == set(range(width)) - set(SELECTED[2])


def test_random_draw_needs_enough_other_neurons():
    with pytest.raises(UserError, match="layer 7"):
        random_neurons(SELECTED, 15, SEED, 1)       # 8 selected of 15: only 7 others


def test_neurons_hash_names_the_set():
    assert neurons_hash({2: [9, 5]}) == neurons_hash({2: [5, 9]}) != neurons_hash({2: [5, 10]})
    assert len(neurons_hash({2: [5]})) == 12


# ------------------------------------------------------------------------------------------
# the shuffle's derangement


def test_derangement_is_seeded_and_has_no_fixed_point():
    for size in range(2, 12):
        for batch in range(20):
            order = derangement(size, SEED, 2, batch).tolist()
            assert sorted(order) == list(range(size)) and all(order[i] != i for i in range(size))
    assert torch.equal(derangement(8, SEED, 2, 3), derangement(8, SEED, 2, 3))
    seen = {tuple(derangement(8, SEED, 2, batch).tolist()) for batch in range(30)}
    assert len(seen) > 20                                          # it changes with the batch number
    assert {tuple(derangement(3, SEED, 2, b).tolist()) for b in range(40)} == {(1, 2, 0), (2, 0, 1)}
    assert derangement(1, SEED, 2, 0).tolist() == [0]


# ------------------------------------------------------------------------------------------
# the register substitutes on a hand-made tensor: [CLS, p1, p2, p3, reg], neurons n0..n2, S = [0, 2]

HAND = torch.tensor([
    [[9., 0., 1.], [1., 5., 2.], [3., 5., -6.], [2., 5., 1.], [0., 0., 0.]],    # m = 9 (CLS)
    [[0., 0., 0.], [-4., 1., 1.], [1., 1., 1.], [1., 1., 0.], [0., 0., 0.]],    # m = -4
])


def test_substitutes_on_a_hand_tensor():
    common = dict(num_prefix_tokens=1, num_registers=1, scale=2.0, normal_values="same")
    # mean over the 3 patches per neuron: image 0: n0 (1+3+2)/3 = 2, n2 (2-6+1)/3 = -1; image 1: n0 -2/3, n2 2/3
    out = apply_intervention(HAND, [0, 2], register_value="mean", **common)
    torch.testing.assert_close(out[:, 4, [0, 2]], 2.0 * torch.tensor([[2., -1.], [-2 / 3, 2 / 3]]))
    # shuffle with donors [1, 0]: each image gets the other's signed max
    out = apply_intervention(HAND, [0, 2], register_value="shuffle", donors=torch.tensor([1, 0]), **common)
    assert out[:, 4, [0, 2]].tolist() == [[-8., -8.], [18., 18.]]
    # noise: mean + unbiased std x draw; image 0 n0 patches [1, 3, 2]: std 1
    draws = torch.tensor([[[0.5, -1.0]], [[2.0, 0.0]]])
    out = apply_intervention(HAND, [0, 2], register_value="noise", noise=draws, **common)
    std = HAND[:, 1:4][:, :, [0, 2]].std(dim=1, unbiased=True)
    expected = 2.0 * (torch.tensor([[2., -1.], [-2 / 3, 2 / 3]]) + std * draws[:, 0])
    torch.testing.assert_close(out[:, 4, [0, 2]], expected)
    assert out[0, 4, 0].item() == pytest.approx(2.0 * (2.0 + 1.0 * 0.5))
    # everything but the registers' S entries as given (normal_values=same), n1 untouched
    assert torch.equal(out[:, :4], HAND[:, :4]) and torch.equal(out[:, :, 1], HAND[:, :, 1])


# ------------------------------------------------------------------------------------------
# on a small model: the substitutes against activations read with plain torch hooks


@pytest.fixture(scope="module")
def planted_clip():
    pm = make_planted_model("clip", seed=0)
    return pm, to_batch(pm.backbone, fixture_images(5, seed=11))


def _raw_and_moved(pm, x, run, layer, batch=0):
    """(activations entering layer ``layer``'s output projection before the intervention, after it)."""
    hooked = HookedViT(pm.backbone)
    raw = {}
    handle = hooked.adapter.mlp_out(layer).register_forward_pre_hook(
        lambda module, args: raw.__setitem__("x", args[0].detach().clone()))
    try:
        _, cache = hooked.run_with_cache(x, [mlp_post(layer)], num_registers=run.num_registers,
                                         fwd_hooks=run.fwd_hooks(hooked.token_layout(run.num_registers), batch))
    finally:
        handle.remove()
    return raw["x"], cache[mlp_post(layer)]


@pytest.mark.parametrize("mode", ["ttr-mean", "ttr-noise", "ttr-shuffle"])
def test_register_substitutes_write_what_they_should(planted_clip, mode):
    pm, x = planted_clip
    neurons = {}
    for layer, neuron in pm.planted:
        neurons.setdefault(layer, []).append(neuron)
    layer, ids = next(iter(sorted(neurons.items())))
    intervention = Intervention(neurons=neurons, scale=1.5, normal_values="zero")
    run = mode_setup(mode, intervention, 1, ControlInputs(seed=SEED, mlp_width=pm.backbone.mlp_width,
                                                           layers=pm.backbone.num_layers))
    raw, moved = _raw_and_moved(pm, x, run, layer, batch=4)
    prefix, patches = 1, pm.backbone.num_patches
    register = moved[:, -1, ids]                                            # [B, S]
    patch_values = raw[:, prefix:prefix + patches, ids]                     # [B, P, S]
    expected = torch.empty_like(register)
    for b in range(len(x)):                                                 # by hand, image by image
        mean, std = patch_values[b].mean(dim=0), patch_values[b].std(dim=0, unbiased=True)
        if mode == "ttr-mean":
            expected[b] = 1.5 * mean
        elif mode == "ttr-noise":
            draw = seeded_normal((len(x), 1, len(ids)), SEED, 1, 4, layer)[b, 0]
            expected[b] = 1.5 * (mean + std * draw)
    if mode == "ttr-shuffle":
        maxima = torch.tensor([own_signed_max(raw[b][:, ids]) for b in range(len(x))])
        # which image's maximum each register got (the five maxima differ)
        assert len(set(maxima.tolist())) == len(x)
        donors = [int(torch.argmin((maxima - register[b, 0] / 1.5).abs())) for b in range(len(x))]
        assert sorted(donors) == list(range(len(x))) and all(d != b for b, d in enumerate(donors))
        assert donors == derangement(len(x), SEED, 2, 4).tolist()             # the seeded one, batch 4
        expected = 1.5 * maxima[donors][:, None].expand_as(register)
    torch.testing.assert_close(register, expected, rtol=1e-5, atol=1e-5)
    # the patches as ttr's normal_values says (zero), CLS and the other neurons untouched
    assert torch.equal(moved[:, prefix:prefix + patches, ids], torch.zeros_like(patch_values))
    others = [n for n in range(raw.shape[-1]) if n not in ids]
    assert torch.equal(moved[:, :, others], raw[:, :, others]) and torch.equal(moved[:, 0], raw[:, 0])
    # the same batch number gives the same values; another gives other draws (noise, shuffle)
    _, again = _raw_and_moved(pm, x, run, layer, batch=4)
    assert torch.equal(again, moved)
    if mode != "ttr-mean":
        _, other = _raw_and_moved(pm, x, run, layer, batch=5)
        assert not torch.equal(other[:, -1, ids], register)


def test_a_shuffled_batch_of_one_takes_the_donor(planted_clip):
    pm, x = planted_clip
    hooked = HookedViT(pm.backbone)
    layer, neuron = pm.planted[0]
    intervention = Intervention(neurons={layer: [neuron]})
    inputs = ControlInputs(seed=SEED, mlp_width=pm.backbone.mlp_width, layers=pm.backbone.num_layers)
    shuffle = mode_setup("ttr-shuffle", intervention, 1, inputs)
    alone = extract_mode_batch(hooked, x[3:4], shuffle, batch=2, donor=lambda: x[2:3])
    pair = extract_batch(hooked, x[2:4], num_registers=1, fwd_hooks=shuffle.fwd_hooks(hooked.token_layout(1), 2))
    np.testing.assert_array_equal(alone.pooled, pair.pooled[1:])
    ttr = extract_batch(hooked, x[3:4], num_registers=1, fwd_hooks=intervention.fwd_hooks(hooked.token_layout(1)))
    assert np.abs(alone.pooled - ttr.pooled).max() > 1e-4               # not its own value
    # the first batch of a list has no previous image: a single image keeps its own value (= ttr)
    first = extract_mode_batch(hooked, x[3:4], shuffle, batch=0, donor=lambda: x[2:3])
    np.testing.assert_allclose(first.pooled, ttr.pooled, rtol=0, atol=1e-6)


def test_descriptions_keep_ttr_and_tell_the_controls_apart():
    intervention = Intervention(neurons={2: [5, 9]})
    inputs = ControlInputs(seed=SEED, mlp_width=64, layers=6)
    ttr = mode_setup("ttr", intervention, 1, inputs).describe()
    assert ttr == {"mode": "ttr", "num_registers": 1, "intervention": {
        "neurons": {"2": [5, 9]}, "scale": 1.0, "normal_values": "zero", "per_neuron_max": False}}
    described = [mode_setup(m, intervention, 1, inputs).describe()
                 for m in ("ttr-mean", "ttr-noise", "ttr-shuffle", "ttr-random-01", "ttr-random-02")]
    assert len({repr(d["intervention"]) for d in described} | {repr(ttr["intervention"])}) == 6
    assert mode_setup("no-ttr-removed", intervention, 1, inputs).num_registers == 0
    with pytest.raises(ValueError, match="statistics"):
        mode_setup("trained-mean", intervention, 1, inputs)


# ------------------------------------------------------------------------------------------
# trained registers (the planted DINOv3 and Virchow2 fixtures: 4 trained registers each)


@pytest.fixture(scope="module", params=["dinov3", "virchow2"])
def planted_reg(request):
    pm = make_planted_model(request.param, seed=0)
    assert pm.backbone.num_prefix_tokens == 5                                 # CLS + 4 trained registers
    return pm, to_batch(pm.backbone, fixture_images(6, seed=12))


def _block_outputs(pm, x, run=None, batch=0):
    """Per block (raw output before the control, output after it), read with plain forward hooks."""
    hooked = HookedViT(pm.backbone)
    raw, after, handles = {}, {}, []
    blocks = hooked.adapter.blocks
    for layer, block in enumerate(blocks):
        handles.append(block.register_forward_hook(
            lambda module, args, out, layer=layer: raw.__setitem__(layer, out.detach().clone())))
    try:
        hooks = run.fwd_hooks(hooked.token_layout(0), batch) if run is not None else []
        with hooked.hooks(fwd_hooks=hooks):
            for layer, block in enumerate(blocks):           # registered after the control's: see its output
                handles.append(block.register_forward_hook(
                    lambda module, args, out, layer=layer: after.__setitem__(layer, out.detach().clone())))
            with torch.no_grad():
                pm.backbone.model(x)
    finally:
        for handle in handles:
            handle.remove()
    return raw, after


def test_trained_statistics_from_detection_match_a_hand_computation(planted_reg):
    pm, x = planted_reg
    raw, _ = _block_outputs(pm, x)
    states = np.stack([raw[l][:, 1:5].double().numpy() for l in range(len(raw))])     # [L, B, T, d]
    mean, std = states.mean(axis=1), states.std(axis=1, ddof=1)
    result = detect_register_neurons(HookedViT(pm.backbone), [x[:4], x[4:]],
                                     detect_layer=pm.config["detect_outliers_layer"], threshold=0.0)
    alone = trained_register_stats(HookedViT(pm.backbone), [x[:2], x[2:]])
    for stats in (result.trained, alone):
        assert stats.images == 6 and stats.mean.shape == (pm.backbone.num_layers, 4, pm.backbone.width)
        np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.std, std, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["trained-zero", "trained-mean", "trained-noise", "trained-shuffle"])
def test_trained_substitutes_write_what_they_should(planted_reg, mode):
    pm, x = planted_reg
    stats = trained_register_stats(HookedViT(pm.backbone), [x])
    inputs = ControlInputs(seed=SEED, mlp_width=pm.backbone.mlp_width, layers=pm.backbone.num_layers, trained=stats)
    run = mode_setup(mode, Intervention(neurons={1: [0]}), 1, inputs)
    assert run.num_registers == 0
    raw, after = _block_outputs(pm, x, run, batch=3)
    _, plain = _block_outputs(pm, x)
    B, d = len(x), pm.backbone.width
    order = derangement(B, SEED, 2, 3).tolist()
    for layer in range(pm.backbone.num_layers):
        got = after[layer][:, 1:5]
        if mode == "trained-zero":
            expected = torch.zeros_like(got)
        elif mode == "trained-mean":
            expected = torch.from_numpy(stats.mean[layer]).expand(B, 4, d)
        elif mode == "trained-noise":
            draws = seeded_normal((B, 4, d), SEED, 3, 3, layer)
            expected = torch.from_numpy(stats.mean[layer]) + torch.from_numpy(stats.std[layer]) * draws
        else:
            expected = raw[layer][order, 1:5]                  # another image's, from the same forward
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # CLS and patches leave the block as it made them
        assert torch.equal(after[layer][:, :1], raw[layer][:, :1])
        assert torch.equal(after[layer][:, 5:], raw[layer][:, 5:])
    # the substitute flows on: the last block's patches differ from the model as released (by
    # little for the others: the fixture's trained registers hardly vary between images)
    change = (after[len(after) - 1][:, 5:] - plain[len(plain) - 1][:, 5:]).abs().max()
    assert change > (1e-3 if mode == "trained-zero" else 0.0)


def test_substitute_trained_spares_everything_else():
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    out = substitute_trained(tokens, slice(1, 3), "shuffle", donors=torch.tensor([1, 0]))
    assert torch.equal(out[0, 1:3], tokens[1, 1:3]) and torch.equal(out[1, 1:3], tokens[0, 1:3])
    assert torch.equal(out[:, [0, 3, 4, 5, 6]], tokens[:, [0, 3, 4, 5, 6]])
    assert torch.equal(tokens, torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3))   # not in place
