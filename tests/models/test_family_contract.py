"""The family contract (docs/extending.md), run over every registered family and every preset: the
hook points exist with their shapes; reading them leaves the stock forward bit-identical; the
neurons are what the MLP's output projection reads (for a gated MLP: ``act(gate) * value``); the
attention probabilities are the library's own; ttr moves the planted outliers onto the register;
a model's identity survives register_neurons.json.

Each preset runs as the demo's small planted model of its own structure (full-size models only on
the meta device: tests/models/test_presets.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import hook_count, make_images
from torch import nn

import configs
from common.demo.fixture import fixture_images, make_planted_model
from common.errors import UserError
from common.models.families import FAMILIES, FamilyAdapter
from common.models.hooks import (
    FINAL, REGISTERS, HookedViT, attn_cls_pattern, attn_pattern, mlp_post, resid_post
)
from common.registers.detection import detect_register_neurons
from common.registers.intervention import Intervention
from common.registers.neurons import NeuronRanking

PRESETS = tuple(configs.PRESETS)


def test_every_family_is_covered_by_a_preset_and_implements_the_adapter():
    assert {family for family, _ in configs.PRESETS.values()} == set(FAMILIES)
    with pytest.raises(TypeError, match="abstract"):
        FamilyAdapter(nn.Identity())
    for name, adapter_class in FAMILIES.items():
        assert not adapter_class.__abstractmethods__, name
        assert adapter_class.name == name


@pytest.fixture(scope="module", params=PRESETS)
def planted(request):
    """(planted model, its detection on 8 fixture images)."""
    pm = make_planted_model(request.param, seed=0)
    x = to_batch(pm.backbone, fixture_images(8, seed=0))
    ranking = detect_register_neurons(HookedViT(pm.backbone), [x[:4], x[4:]],
                                      detect_layer=pm.config["detect_outliers_layer"],
                                      threshold=pm.config["register_norm_threshold"])
    return pm, ranking


def to_batch(backbone, images):
    import PIL.Image

    return torch.stack([backbone.preprocess(PIL.Image.fromarray(image)) for image in images])


def test_hook_points_exist_with_their_shapes(planted):
    pm, _ = planted
    bb = pm.backbone
    hooked = HookedViT(bb)
    depth, width, heads = len(bb.blocks), bb.width, bb.num_heads
    names = hooked.hook_names()
    assert len(names) == 2 + 4 * depth
    x = make_images(2, seed=3, size=64)
    pooled, cache = hooked.run_with_cache(x, names, num_registers=1)
    tokens = bb.num_prefix_tokens + bb.num_patches + 1
    assert cache[REGISTERS].shape == (2, tokens, width) and not cache[REGISTERS][:, -1].any()
    assert cache[FINAL].shape == (2, tokens, width)
    for layer in range(depth):
        assert cache[resid_post(layer)].shape == (2, tokens, width)
        assert cache[mlp_post(layer)].shape == (2, tokens, bb.mlp_width)
        pattern = cache[attn_pattern(layer)]
        assert pattern.shape == (2, heads, tokens, tokens)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, heads, tokens))
        assert torch.equal(cache[attn_cls_pattern(layer)], pattern[:, :, 0])
    assert pooled.shape == (2, bb.pooled_width)
    assert hook_count(bb.model) == 0


def test_reading_every_point_leaves_the_stock_forward_bit_identical(planted):
    pm, _ = planted
    bb = pm.backbone
    hooked = HookedViT(bb)
    x = make_images(2, seed=4, size=64)
    with torch.no_grad():
        stock = bb.model(x)
    pooled, cache = hooked.run_with_cache(x, hooked.hook_names())
    assert torch.equal(pooled, stock)
    assert torch.equal(hooked.run_with_hooks(x, []), stock)
    assert cache[REGISTERS].shape[1] == bb.num_prefix_tokens + bb.num_patches
    assert hook_count(bb.model) == 0


def test_neurons_are_what_the_output_projection_reads(planted):
    """Plain hooks written here: the input of the block's own output projection, and for a gated
    MLP the product ``act(gate) * value`` computed from the input projection's output by hand."""
    pm, _ = planted
    bb = pm.backbone
    layer = 2
    mlp = bb.blocks[layer].mlp
    fc2 = mlp.c_proj if hasattr(mlp, "c_proj") else mlp.fc2
    seen = {}
    handles = [fc2.register_forward_pre_hook(lambda m, args: seen.__setitem__("fc2_in", args[0]))]
    gated = type(mlp).__name__ == "GluMlp"
    if gated:
        handles.append(mlp.fc1.register_forward_hook(lambda m, args, out: seen.__setitem__("fc1_out", out)))
    x = make_images(2, seed=5, size=64)
    try:
        _, cache = HookedViT(bb).run_with_cache(x, [mlp_post(layer)], num_registers=1)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(cache[mlp_post(layer)], seen["fc2_in"])
    if gated:
        first, second = seen["fc1_out"].chunk(2, dim=-1)
        product = first * mlp.act(second) if mlp.gate_last else mlp.act(first) * second
        assert torch.equal(cache[mlp_post(layer)], product)
        assert bb.mlp_width == mlp.fc1.out_features // 2


def test_attention_is_the_library_own(planted):
    """Probabilities as the library materialises them: timm's non-fused attention (what its
    attn_drop receives; also the rotary Eva of DINOv3), open_clip's MultiheadAttention with
    need_weights."""
    pm, _ = planted
    bb = pm.backbone
    layer = 4
    attention = bb.blocks[layer].attn
    x = make_images(1, seed=6, size=64)
    timm_attention = hasattr(attention, "fused_attn")
    seen = {}
    if timm_attention:
        handle = attention.attn_drop.register_forward_hook(lambda m, args, out: seen.__setitem__("p", out))
        fused, attention.fused_attn = attention.fused_attn, False
    else:                               # open_clip: nn.MultiheadAttention on ln_1(x)
        block = bb.blocks[layer]

        def read(module, args):
            h = block.ln_1(args[0])
            seen["p"] = attention(h, h, h, need_weights=True, average_attn_weights=False)[1]

        handle = block.register_forward_pre_hook(read)
    try:
        _, cache = HookedViT(bb).run_with_cache(x, [attn_pattern(layer)], num_registers=1)
    finally:
        handle.remove()
        if timm_attention:
            attention.fused_attn = fused
    torch.testing.assert_close(cache[attn_pattern(layer)], seen["p"], rtol=0, atol=1e-5)


def test_ttr_moves_the_planted_outliers_onto_the_register(planted):
    pm, ranking = planted
    bb = pm.backbone
    assert {(l, n) for l, n, _ in ranking.ranked[:len(pm.planted)]} == set(pm.planted)
    selected = ranking.select(pm.config["highest_layer"], pm.config["top_k"])
    hooked = HookedViT(bb)
    layer = hooked.layer_index(pm.config["detect_outliers_layer"])
    threshold = pm.config["register_norm_threshold"]
    x = to_batch(bb, fixture_images(6, seed=21))
    prefix, patches = bb.num_prefix_tokens, bb.num_patches
    _, plain = hooked.run_with_cache(x, [resid_post(layer)])
    assert (plain[resid_post(layer)].norm(dim=-1)[:, prefix:].amax(dim=1) > threshold).all()
    hooks = Intervention(selected).fwd_hooks(hooked.token_layout(1))
    _, ttr = hooked.run_with_cache(x, [resid_post(layer)], num_registers=1, fwd_hooks=hooks)
    norms = ttr[resid_post(layer)].norm(dim=-1)
    assert (norms[:, prefix:prefix + patches].amax(dim=1) < threshold).all()
    assert (norms[:, -1] > threshold).all()


def test_identity_round_trips_through_register_neurons_json(planted, tmp_path):
    pm, ranking = planted
    path = tmp_path / "register_neurons.json"
    ranking.save(path, pm.config["highest_layer"], pm.config["top_k"])
    loaded = NeuronRanking.load(path)
    assert loaded.identity == pm.backbone.identity
    assert loaded.identity.as_dict() == pm.backbone.identity.as_dict()
    loaded.check_model(pm.backbone.identity, str(path))
    other = make_planted_model("virchow2" if pm.model != "virchow2" else "clip").backbone.identity
    with pytest.raises(UserError, match="the ranking was found on"):
        loaded.check_model(other, str(path))
    with pytest.raises(UserError):
        NeuronRanking.load(path).check_model(configs_identity("uni"), str(path))


def configs_identity(model: str):
    from common.models.families import get_family

    family, config = configs.PRESETS[model]
    return get_family(family).identity(config)
