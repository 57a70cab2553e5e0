"""Register-neuron detection (docs/detection.md): batched detection against a plain per-image
implementation written here, the no-outlier error and the threshold suggestion, the JSON round
trip, the published DINOv2 neurons and the ranking's tie-breaking."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import PIL.Image
import pytest
import torch

import configs
from common.demo.fixture import fixture_images, make_planted_model
from common.errors import UserError
from common.models.families import get_family
from common.models.hooks import HookedViT
from common.registers.detection import (
    NoOutliersError,
    collect_norms,
    detect_register_neurons,
    rank_scores,
    suggest_threshold,
)
from common.registers.neurons import NeuronRanking, paper_neurons

RTOL, ATOL = 1e-5, 1e-6


# ------------------------------------------------------------------------------------------
# An independent, plain per-image implementation of docs/detection.md (own hooks, no HookedViT).


def _blocks(model, family):
    return list(model.transformer.resblocks) if family == "clip" else list(model.blocks)


def _mlp_out(block, family):
    return block.mlp.c_proj if family == "clip" else block.mlp.fc2


@torch.no_grad()
def plain_forward(model, family, image, detect_index):
    """One image ``[3, H, W]`` -> (layer ``detect_index`` output ``[N, d]``, ``[L, N, D]`` MLP
    hidden activations), read with plain torch hooks."""
    blocks = _blocks(model, family)
    acts: dict[int, torch.Tensor] = {}
    residual: list[torch.Tensor] = []
    handles = []
    for layer, block in enumerate(blocks):
        handles.append(_mlp_out(block, family).register_forward_pre_hook(
            lambda module, args, layer=layer: acts.__setitem__(layer, args[0].detach().clone())))
    handles.append(blocks[detect_index].register_forward_hook(
        lambda module, args, output: residual.append(output.detach().clone())))
    try:
        model(image[None])
    finally:
        for handle in handles:
            handle.remove()
    assert residual[0].shape[0] == 1 and acts[0].shape[0] == 1
    return residual[0][0], torch.stack([acts[layer][0] for layer in range(len(blocks))])


def reference_detection(per_image, threshold, trained_registers=0):
    """``per_image``: list of (residual [N, d], acts [L, N, D]).  Returns (scores [L, D] float64,
    counted images).  Trained registers (positions 1..T) are dropped first: docs/detection.md looks at CLS
    and the image patches only."""
    total, counted = None, 0
    for residual, acts in per_image:
        keep = [0] + list(range(1 + trained_registers, residual.shape[0]))
        residual, acts = residual[keep], acts[:, keep]
        norms = residual.double().norm(dim=-1)                       # [N]
        outlier = norms > threshold
        if not bool(outlier.any()):
            continue                                                  # skipped, not counted
        counted += 1
        acts = acts.double()                                          # [L, N, D]
        n_positions = acts.shape[1]
        score = acts[:, outlier, :].abs().mean(dim=1)                 # [L, D]
        sparse = (acts < 0.5).sum(dim=1) >= 0.5 * n_positions         # [L, D]
        score = score * sparse
        total = score if total is None else total + score
    return (None if total is None else (total / counted).numpy()), counted


def reference_ranking(scores):
    entries = [(layer, neuron, float(scores[layer, neuron]))
               for layer in range(scores.shape[0]) for neuron in range(scores.shape[1])]
    return sorted(entries, key=lambda entry: (-entry[2], entry[0], entry[1]))


def assert_matches_reference(result, ref_scores, shape):
    layers, width = shape
    assert len(result.ranked) == layers * width
    got = np.full(shape, np.nan)
    for layer, neuron, score in result.ranked:
        assert np.isnan(got[layer, neuron]), "a (layer, neuron) appears twice"
        got[layer, neuron] = score
    np.testing.assert_allclose(got, ref_scores, rtol=RTOL, atol=ATOL)

    # The result's own list is ordered: scores non-increasing, exact ties by (layer, neuron).
    for (l0, n0, s0), (l1, n1, s1) in zip(result.ranked, result.ranked[1:]):
        assert s0 >= s1
        if s0 == s1:
            assert (l0, n0) < (l1, n1)

    # Same order as the reference wherever neighbouring reference scores differ clearly.
    position = {(layer, neuron): i for i, (layer, neuron, _) in enumerate(result.ranked)}
    reference = reference_ranking(ref_scores)
    clear = 0
    for (l0, n0, s0), (l1, n1, s1) in zip(reference, reference[1:]):
        if s0 - s1 > ATOL + RTOL * abs(s0):
            clear += 1
            assert position[(l0, n0)] < position[(l1, n1)], ((l0, n0, s0), (l1, n1, s1))
        elif s0 == s1 == 0.0:
            # exact zeros (the sparsity filter) are ties broken by (layer, neuron) ascending
            assert position[(l0, n0)] < position[(l1, n1)]
    assert clear > 0


def to_batch(backbone, images):
    return torch.stack([backbone.preprocess(PIL.Image.fromarray(image)) for image in images])


# ------------------------------------------------------------------------------------------
# Models


@pytest.fixture(scope="module", params=["clip", "dinov2"])
def planted(request):
    return make_planted_model(request.param, seed=0)


@pytest.fixture(scope="module")
def planted_dinov2():
    return make_planted_model("dinov2", seed=0)


@pytest.fixture(scope="module")
def planted_dinov2_result(planted_dinov2):
    pm = planted_dinov2
    x = to_batch(pm.backbone, fixture_images(8, seed=0))
    return detect_register_neurons(HookedViT(pm.backbone), [x[:4], x[4:]],
                                   detect_layer=pm.config["detect_outliers_layer"],
                                   threshold=pm.config["register_norm_threshold"])


# ------------------------------------------------------------------------------------------
# 1. Batched detection == plain per-image detection


def test_batched_detection_matches_per_image_on_random_clip_b16(clip_b16):
    """Real CLIP ViT-B/16 architecture, random weights, 4 noisy images whose top rows are
    smooth to different extents (token norms then differ between and within images).  The
    threshold is chosen from the observed layer-k norms so that some images are skipped and
    only some tokens of a counted image count.  Batch size 2 vs one image at a time."""
    backbone = clip_b16                  # conftest: open_clip ViT-B/16, random init, seed 0
    rng = np.random.default_rng(0)
    images = []
    for smooth_rows in (0, 112, 32, 176):
        image = 128 + rng.normal(0, 90, size=(224, 224, 3))
        image[:smooth_rows] = 128 + rng.normal(0, 5, size=(smooth_rows, 224, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    x = to_batch(backbone, images)
    detect_layer = configs.CLIP["detect_outliers_layer"]
    detect_index = backbone.num_layers + detect_layer if detect_layer < 0 else detect_layer

    per_image = [plain_forward(backbone.model, "clip", x[i], detect_index) for i in range(len(x))]
    norms = np.stack([residual.norm(dim=-1).numpy() for residual, _ in per_image])   # [4, N]
    n_tokens = norms.shape[1]
    maxima = np.sort(norms.max(axis=1))
    # Candidate thresholds: midpoints of gaps (> 1e-3, so float noise between batched and
    # single-image forwards cannot flip a token) between observed norms, above the smallest
    # per-image maximum (an image is skipped) and below the second largest (two count).
    # Take the one where most counted images have only part of their tokens above, then the
    # widest gap.
    inside = np.sort(norms.ravel())
    inside = inside[(inside > maxima[0]) & (inside < maxima[-2])]
    best = None
    for low, high in zip(inside[:-1], inside[1:]):
        if high - low <= 1e-3:
            continue
        middle = float((low + high) / 2)
        counts = (norms > middle).sum(axis=1)
        key = (int(((counts > 0) & (counts < n_tokens)).sum()), float(high - low))
        if best is None or key > best[0]:
            best = (key, middle)
    assert best is not None
    threshold = best[1]
    above = [int(c) for c in (norms > threshold).sum(axis=1)]
    assert sum(a == 0 for a in above) >= 1 and sum(a > 0 for a in above) >= 2, above
    assert any(0 < a < n_tokens for a in above), above
    # both batches of two hold a skipped and a counted image
    assert (above[0] == 0) != (above[1] == 0) and (above[2] == 0) != (above[3] == 0), above

    ref_scores, ref_counted = reference_detection(per_image, threshold)

    # Spy: detection runs the model as released (1 + P tokens, no test-time register).
    shapes = []
    spy = backbone.blocks[0].register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        result = detect_register_neurons(HookedViT(backbone), [x[:2], x[2:]],
                                         detect_layer=detect_layer, threshold=threshold)
    finally:
        spy.remove()
    assert shapes == [(2, 1 + backbone.num_patches, backbone.width)] * 2
    assert 1 + backbone.num_patches == 197

    assert result.images_used == 4
    assert result.images_counted == ref_counted == sum(a > 0 for a in above)
    assert result.detect_layer_index == detect_index
    assert result.max_norm_seen == pytest.approx(float(maxima[-1]), rel=1e-5)
    assert result.threshold == threshold
    width = backbone.model.transformer.resblocks[0].mlp.c_proj.in_features
    assert_matches_reference(result, ref_scores, (12, width))
    # The sparsity filter really removed some neurons that fire on outlier tokens.
    zeros = sum(1 for _, _, s in result.ranked if s == 0.0)
    assert 0 < zeros < len(result.ranked)


def test_batched_detection_matches_per_image_on_fixture(planted):
    """Both fixture families; 8 fixture images plus one all-texture image with no outlier
    (skipped), in uneven batches of 3, against the per-image reference."""
    pm = planted
    backbone, family = pm.backbone, pm.family
    images = fixture_images(8, seed=1)
    # A fine black-and-white checkerboard: textured everywhere, so no register forms.
    checker = (np.add.outer(np.arange(64), np.arange(64)) % 2 * 255).astype(np.uint8)
    checker = np.repeat(checker[None, :, :, None], 3, axis=3)
    images = np.concatenate([images[:4], checker, images[4:]])
    x = to_batch(backbone, images)
    k, threshold = pm.config["detect_outliers_layer"], pm.config["register_norm_threshold"]
    depth = len(_blocks(backbone.model, family))
    detect_index = depth + k if k < 0 else k

    per_image = [plain_forward(backbone.model, family, x[i], detect_index) for i in range(len(x))]
    ref_scores, ref_counted = reference_detection(per_image, threshold)
    assert ref_counted == 8                                    # the checkerboard has no outlier
    assert not bool((per_image[4][0].norm(dim=-1) > threshold).any())

    shapes = []
    spy = _blocks(backbone.model, family)[detect_index].register_forward_hook(
        lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        result = detect_register_neurons(HookedViT(backbone), [x[0:3], x[3:6], x[6:9]],
                                         detect_layer=k, threshold=threshold)
    finally:
        spy.remove()
    assert [s[1] for s in shapes] == [1 + 64] * 3              # CLS + 8x8 patches, no register
    assert result.images_used == 9 and result.images_counted == 8
    width = _mlp_out(_blocks(backbone.model, family)[0], family).in_features
    assert_matches_reference(result, ref_scores, (depth, width))


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_trained_registers_are_neither_outliers_nor_counted(family):
    """A fixture whose 4 trained registers are high-norm by design (above the threshold at the
    detect layer in every image): detection must equal the reference that looks at CLS and the
    image patches only, rank the planted neurons first - and differ from what counting the
    trained registers would give."""
    pm = make_planted_model(family, seed=0, trained_registers=4)
    backbone = pm.backbone
    assert backbone.num_prefix_tokens == 5
    x = to_batch(backbone, fixture_images(6, seed=4))
    k, threshold = pm.config["detect_outliers_layer"], 60.0
    depth = backbone.num_layers
    detect_index = depth + k
    per_image = [plain_forward(backbone.model, family, x[i], detect_index) for i in range(len(x))]
    trained_norms = torch.stack([residual[1:5].norm(dim=-1) for residual, _ in per_image])
    assert (trained_norms > threshold).all(), trained_norms      # high-norm by design
    ref_scores, ref_counted = reference_detection(per_image, threshold, trained_registers=4)
    result = detect_register_neurons(HookedViT(backbone), [x[:4], x[4:]], detect_layer=k, threshold=threshold)
    assert result.images_counted == ref_counted == 6
    assert_matches_reference(result, ref_scores, (depth, backbone.mlp_width))
    assert {(l, n) for l, n, _ in result.ranked[:3]} == set(pm.planted)
    counting_them, _ = reference_detection(per_image, threshold, trained_registers=0)
    assert np.abs(counting_them - ref_scores).max() > 1.0           # the exclusion matters


def test_following_the_suggested_threshold_finds_outliers(planted):
    """The no-outlier error's suggestion, as printed, and ``auto`` both find outliers."""
    pm = planted
    backbone = pm.backbone
    x = to_batch(backbone, fixture_images(4, seed=6))
    k = pm.config["detect_outliers_layer"]
    hooked = HookedViT(backbone)
    with pytest.raises(NoOutliersError) as caught:
        detect_register_neurons(hooked, [x], detect_layer=k, threshold=1e6)
    norms = collect_norms(hooked, [x], k)
    suggestion, _ = suggest_threshold(norms)
    message = str(caught.value.with_suggestion(suggestion))
    printed = float(message.split("register_norm_threshold=")[2].split()[0])
    assert printed < caught.value.max_norm
    result = detect_register_neurons(hooked, [x], detect_layer=k, threshold=printed)
    assert result.images_counted >= 1


def test_auto_threshold_on_unimodal_norms_finds_outliers(clip_b16):
    """Random ViT-B/16 weights and noise images: no register-like mode, yet the suggestion
    lies below the largest norm, says so, and detection with it counts an image."""
    x = make_noise_images(2)
    hooked = HookedViT(clip_b16)
    norms = collect_norms(hooked, [x], -1)
    threshold, reason = suggest_threshold(norms)
    assert threshold < norms.max()
    result = detect_register_neurons(hooked, [x], detect_layer=-1, threshold=threshold)
    assert result.images_counted >= 1


def make_noise_images(count: int) -> torch.Tensor:
    return torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(3))


def test_sparsity_filter_uses_signed_activations():
    """GELU hardly goes below 0, so the fixture cannot tell ``act < 0.5`` from ``|act| < 0.5``.
    With the MLP activation replaced by the identity (signed hidden units, many below -0.5) the
    batched detection must still match the reference, whose filter is on the signed value."""
    pm = make_planted_model("dinov2", seed=0)
    model = pm.backbone.model
    for block in model.blocks:
        block.mlp.act = torch.nn.Identity()
    x = to_batch(pm.backbone, fixture_images(4, seed=4))
    k = -2
    index = len(model.blocks) + k
    per_image = [plain_forward(model, "dinov2", x[i], index) for i in range(len(x))]
    everything = np.sort(np.concatenate([r.norm(dim=-1).numpy() for r, _ in per_image]))
    top = everything[int(0.7 * everything.size):]
    gaps = np.diff(top)
    best = int(np.argmax(gaps))
    assert gaps[best] > 1e-3
    threshold = float((top[best] + top[best + 1]) / 2)
    ref_scores, ref_counted = reference_detection(per_image, threshold)
    assert ref_counted >= 1

    # The signed and the absolute filter really disagree here.
    assert any(bool(((acts < 0.5).sum(dim=1) != (acts.abs() < 0.5).sum(dim=1)).any())
               for _, acts in per_image)
    abs_total = 0
    for residual, acts in per_image:
        outlier = residual.double().norm(dim=-1) > threshold
        if outlier.any():
            acts = acts.double()
            abs_total = abs_total + acts[:, outlier].abs().mean(dim=1) * (
                (acts.abs() < 0.5).sum(dim=1) >= 0.5 * acts.shape[1])
    assert not np.allclose(abs_total.numpy() / ref_counted, ref_scores, rtol=RTOL, atol=ATOL)

    result = detect_register_neurons(HookedViT(pm.backbone), [x[:2], x[2:]], detect_layer=k,
                                     threshold=threshold)
    assert result.images_counted == ref_counted
    assert_matches_reference(result, ref_scores, (len(model.blocks), model.blocks[0].mlp.fc2.in_features))


def test_detection_leaves_no_hooks(planted):
    backbone = planted.backbone
    x = to_batch(backbone, fixture_images(2))
    before = backbone.model(x)
    detect_register_neurons(HookedViT(backbone), [x], detect_layer=-1, threshold=60)
    collect_norms(HookedViT(backbone), [x], -2)
    for module in backbone.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert torch.equal(backbone.model(x), before)


# ------------------------------------------------------------------------------------------
# 4. No outliers; the threshold suggestion


def test_threshold_above_every_norm_raises_no_outliers_error(planted):
    pm = planted
    backbone, family = pm.backbone, pm.family
    x = to_batch(backbone, fixture_images(4, seed=2))
    k = pm.config["detect_outliers_layer"]
    depth = len(_blocks(backbone.model, family))
    index = depth + k if k < 0 else k
    largest = max(float(plain_forward(backbone.model, family, x[i], index)[0].norm(dim=-1).max())
                  for i in range(len(x)))
    threshold = 10000.0
    assert threshold > largest
    with pytest.raises(NoOutliersError) as caught:
        detect_register_neurons(HookedViT(backbone), [x[:2], x[2:]], detect_layer=k, threshold=threshold)
    error = caught.value
    assert isinstance(error, UserError) and error.exit_code == 2
    assert error.max_norm == pytest.approx(largest, rel=1e-5)
    assert error.threshold == threshold
    message = str(error)
    assert f"{largest:.1f}" in message and "10000" in message

    suggested = error.with_suggestion(123.456)
    assert isinstance(suggested, NoOutliersError) and isinstance(suggested, UserError)
    message = str(suggested)
    assert f"{largest:.1f}" in message and "10000" in message and "123.5" in message
    assert "suggest" in message

    # Just above the largest norm is also "no outlier" (norm > t is strict).
    with pytest.raises(NoOutliersError):
        detect_register_neurons(HookedViT(backbone), [x], detect_layer=k, threshold=largest * 1.0001)


def test_suggested_threshold_separates_planted_outliers(planted):
    pm = planted
    backbone, family = pm.backbone, pm.family
    x = to_batch(backbone, fixture_images(8, seed=3))
    k = pm.config["detect_outliers_layer"]
    depth = len(_blocks(backbone.model, family))
    index = depth + k if k < 0 else k

    norms = collect_norms(HookedViT(backbone), [x[:5], x[5:]], k)
    per_image = [plain_forward(backbone.model, family, x[i], index) for i in range(len(x))]
    own_norms = np.concatenate([residual.norm(dim=-1).numpy() for residual, _ in per_image])
    np.testing.assert_allclose(norms, own_norms, rtol=1e-5)

    # Ground truth: the tokens where a planted neuron fires.
    planted_layer = pm.planted[0][0]
    planted_ids = [neuron for _, neuron in pm.planted]
    fires = np.concatenate([acts[planted_layer][:, planted_ids].max(dim=1).values.numpy() > 1.0
                            for _, acts in per_image])
    assert 0 < fires.sum() < fires.size

    threshold, reason = suggest_threshold(norms)
    assert np.array_equal(own_norms > threshold, fires)
    assert "gap" in reason and "MAD" not in reason
    assert f"{threshold:.1f}" in reason

    result = detect_register_neurons(HookedViT(backbone), [x], detect_layer=k, threshold=threshold)
    assert {(l, n) for l, n, _ in result.ranked[:len(pm.planted)]} == set(pm.planted)


def test_suggest_threshold_gap_and_mad_fallback():
    rng = np.random.default_rng(0)
    # Bimodal: 950 ordinary tokens around 10, 50 outliers around 100.
    norms = np.concatenate([rng.normal(10, 1, 950), rng.normal(100, 3, 50)])
    threshold, reason = suggest_threshold(norms)
    ordinary_max, outlier_min = norms[:950].max(), norms[950:].min()
    assert threshold == pytest.approx(math.sqrt(ordinary_max * outlier_min))
    assert "gap" in reason

    # Unimodal with a tail past 10 MADs (no 1.5x gap anywhere): median + 10 x MAD.
    norms = np.concatenate([rng.normal(20, 1, 5000), [26.0, 28.0, 30.0, 33.0]])
    threshold, reason = suggest_threshold(norms)
    median = np.median(norms)
    mad = np.median(np.abs(norms - median))
    assert threshold == pytest.approx(median + 10 * mad)
    assert "MAD" in reason and "no gap" in reason
    assert threshold < norms.max()

    # Unimodal, nothing 10 MADs out: still strictly below the largest norm (following the
    # advice must find outliers), between the two largest, and the reason says the norms look
    # unimodal.
    norms = rng.lognormal(mean=3.0, sigma=0.1, size=5000)
    threshold, reason = suggest_threshold(norms)
    ordered = np.sort(norms)
    assert ordered[-2] < threshold < ordered[-1]
    assert "unimodal" in reason and "no gap" in reason

    with pytest.raises(UserError):
        suggest_threshold(np.zeros(0))


# ------------------------------------------------------------------------------------------
# 5. JSON round trip, selection, the published neurons


def independent_select(ranked, highest_layer, top_k):
    kept = [(layer, neuron) for layer, neuron, _ in ranked if layer <= highest_layer][:top_k]
    selected: dict[int, list[int]] = {}
    for layer, neuron in kept:
        selected.setdefault(layer, []).append(neuron)
    return selected


def test_json_round_trip_full_ranking_and_selection(planted_dinov2, planted_dinov2_result, tmp_path):
    result = planted_dinov2_result
    model = planted_dinov2.backbone.model
    layers, width = len(model.blocks), model.blocks[0].mlp.fc2.in_features
    assert len(result.ranked) == layers * width
    assert len({(l, n) for l, n, _ in result.ranked}) == layers * width

    path = tmp_path / "register_neurons.json"
    result.save(path, highest_layer=2, top_k=3)
    assert os.listdir(tmp_path) == ["register_neurons.json"]          # atomic: no temp left
    raw = json.loads(path.read_text())
    assert len(raw["ranked"]) == layers * width
    assert raw["selected"] == {"2": [n for _, n in planted_dinov2.planted]}
    assert all(isinstance(key, str) for key in raw["selected"])
    assert raw["highest_layer"] == 2 and raw["top_k"] == 3

    loaded = NeuronRanking.load(path)
    assert loaded.ranked == result.ranked
    assert loaded.threshold == result.threshold
    assert loaded.images_counted == result.images_counted == 8
    assert loaded.source == f"file:{path}"

    # Loading applies the current highest_layer and top_k.
    choices = [(2, 3), (1, 5), (5, 10), (0, 4)]
    selections = []
    for highest_layer, top_k in choices:
        selection = loaded.select(highest_layer, top_k)
        assert selection == independent_select(result.ranked, highest_layer, top_k)
        assert all(type(layer) is int for layer in selection)
        assert all(layer <= highest_layer for layer in selection)
        assert sum(len(ids) for ids in selection.values()) == top_k
        selections.append(selection)
    assert selections[0] == {2: sorted(n for _, n in planted_dinov2.planted)}
    assert len({json.dumps(s, sort_keys=True) for s in selections}) == len(choices)

    # Overwriting keeps one file.
    result.save(path, highest_layer=1, top_k=5)
    assert os.listdir(tmp_path) == ["register_neurons.json"]
    assert json.loads(path.read_text())["selected"] == {
        str(l): ids for l, ids in independent_select(result.ranked, 1, 5).items()}

    with pytest.raises(ValueError):   # a programmer's error: a user's top_k is checked by the settings
        loaded.select(2, 0)


def test_failed_save_leaves_old_file_and_no_temp(planted_dinov2_result, tmp_path):
    path = tmp_path / "register_neurons.json"
    planted_dinov2_result.save(path)
    before = path.read_bytes()
    broken = NeuronRanking(**{**planted_dinov2_result.__dict__, "extra": {"bad": object()}})
    with pytest.raises(TypeError):
        broken.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["register_neurons.json"]


def test_nan_scores_round_trip(tmp_path):
    result = paper_neurons(get_family("dinov2").identity(configs.DINOV2))
    path = tmp_path / "paper.json"
    result.save(path)
    assert all(entry[2] is None for entry in json.loads(path.read_text())["ranked"])
    loaded = NeuronRanking.load(path)
    assert [(l, n) for l, n, _ in loaded.ranked] == [(l, n) for l, n, _ in result.ranked]
    assert all(math.isnan(s) for _, _, s in loaded.ranked)


@pytest.mark.parametrize("content", [
    "{not json",
    "",
    "[1, 2, 3]",
    '{"format": "ttr-register-neurons/1"}',
    '{"ranked": [[1, 2]]}',
    '{"ranked": [["a", 2, 0.5]]}',
    '{"ranked": []}',
    "null",
])
def test_malformed_json_is_a_user_error_naming_the_path(tmp_path, content):
    path = tmp_path / "neurons.json"
    path.write_text(content)
    with pytest.raises(UserError) as caught:
        NeuronRanking.load(path)
    assert str(path) in str(caught.value)


def test_missing_or_unreadable_file_is_a_user_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "register_neurons.json"
    with pytest.raises(UserError) as caught:
        NeuronRanking.load(missing)
    assert str(missing) in str(caught.value)
    with pytest.raises(UserError) as caught:
        NeuronRanking.load(tmp_path)                                 # a folder
    assert str(tmp_path) in str(caught.value)


def test_paper_neurons_are_the_published_list():
    published = {  # docs/detection.md, written out here on purpose
        12: [3168],
        13: [2400],
        14: [2110, 1510, 1082, 2711, 2464, 147, 543, 581],
        15: [1714, 3507, 2492, 2680, 131, 720, 3499, 3062, 2625],
        16: [2301, 3576, 1940, 3463, 1244, 407, 3152, 2517, 3465],
        17: [884, 133, 1427, 3464, 2373, 2436, 841, 3574, 2129, 3355, 4047, 3341, 1330, 4031,
             844, 944, 464],
    }
    total = sum(len(ids) for ids in published.values())
    assert total == 45
    result = paper_neurons(get_family("dinov2").identity(configs.DINOV2))
    assert [(l, n) for l, n, _ in result.ranked] == [(l, n) for l, ids in published.items() for n in ids]
    assert result.select(23, total) == published
    assert result.select(23, 1000) == published
    assert result.select(14, 2) == {12: [3168], 13: [2400]}
    assert result.select(13, 50) == {12: [3168], 13: [2400]}
    assert result.source == "paper"


@pytest.mark.parametrize("family,config", [("clip", configs.CLIP),
                                           ("dinov2", dict(configs.DINOV2, backbone_size="vitb14")),
                                           ("dinov2", dict(configs.DINOV2, backbone_size="vitl14_reg")),
                                           ("timm", configs.UNI)])
def test_paper_neurons_other_models_are_a_user_error(family, config):
    with pytest.raises(UserError, match="vit_large_patch14_dinov2"):
        paper_neurons(get_family(family).identity(config))


def test_rank_scores_ties_by_layer_then_neuron():
    scores = np.array([
        [1.0, 5.0, 1.0, 0.0],
        [5.0, 1.0, 2.0, 0.0],
        [0.0, 2.0, 5.0, 1.0],
    ])
    expected = [
        (0, 1, 5.0), (1, 0, 5.0), (2, 2, 5.0),
        (1, 2, 2.0), (2, 1, 2.0),
        (0, 0, 1.0), (0, 2, 1.0), (1, 1, 1.0), (2, 3, 1.0),
        (0, 3, 0.0), (1, 3, 0.0), (2, 0, 0.0),
    ]
    assert rank_scores(scores) == expected
    # A tie across layers: the lower layer first, then the lower neuron.
    assert rank_scores(np.array([[0.5, 0.5], [0.5, 0.7]])) == [
        (1, 1, 0.7), (0, 0, 0.5), (0, 1, 0.5), (1, 0, 0.5)]
