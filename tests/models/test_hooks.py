"""The hook manager (docs/intervention.md): reading leaves the stock output bit-identical, captures equal
what the libraries compute themselves, test-time registers are appended as zeros in the right
place, and no hook outlives its context.

All on the real architectures (open_clip ViT-B/16, timm DINOv2) with random weights.
"""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import hook_count, names, run

from common.models.hooks import (
    FINAL,
    HookedViT,
    attn_cls_pattern,
    attn_pattern,
    mlp_post,
    resid_post,
)
from common.registers.intervention import Intervention

CLIP_EVERYTHING = names(residual=(0, 5, 11), neurons=(0, 5, 11), attention=(0, 5, 11),
                          cls_attention=(3, 5, 11), final_tokens=True)
DINO_EVERYTHING = names(residual=(0, 12, 23), neurons=(0, 12, 23), attention=(0, 12, 23),
                          cls_attention=(7, 12, 23), final_tokens=True)


@pytest.fixture(scope="module")
def clip_full():
    """The full open_clip CLIP model built independently, with the loader's seeding."""
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None)
    return model.eval()


@pytest.fixture(scope="module")
def timm_l14():
    """timm's DINOv2 ViT-L/14 at 224 px built independently, with the loader's seeding."""
    torch.manual_seed(0)
    return timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=224).eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------------------
# 1. no intervention, R = 0: the stock library's output, bit for bit


def test_clip_hooked_features_equal_open_clip(clip_b16, clip_full, images):
    assert_same_weights(clip_b16.model, clip_full.visual)
    x = images[:2]
    with torch.no_grad():
        reference = clip_full.encode_image(x, normalize=False)
    hooked = HookedViT(clip_b16)
    pooled, cache = run(hooked, x, capture=CLIP_EVERYTHING)
    assert torch.equal(pooled, reference)
    bare, bare_cache = run(hooked, x)  # what stock_forward gives
    assert torch.equal(bare, reference) and len(bare_cache) == 0
    assert set(cache) == ({resid_post(l) for l in (0, 5, 11)} | {mlp_post(l) for l in (0, 5, 11)}
                          | {attn_pattern(l) for l in (0, 5, 11)}
                          | {attn_cls_pattern(l) for l in (3, 5, 11)} | {FINAL})
    # final-norm CLS token, projected, is the pooled feature
    torch.testing.assert_close(cache[FINAL][:, 0] @ clip_full.visual.proj, reference,
                               rtol=0, atol=1e-5)


def test_dinov2_hooked_features_equal_timm(dinov2_l14, timm_l14, images):
    assert_same_weights(dinov2_l14.model, timm_l14)
    x = images[:1]  # one image: ViT-L is slow on a CPU
    with torch.no_grad():
        reference = timm_l14(x)
    pooled, cache = run(HookedViT(dinov2_l14), x, capture=DINO_EVERYTHING)
    assert torch.equal(pooled, reference)
    assert len(cache) == 3 * 4 + 1
    assert torch.equal(cache[FINAL][:, 0], reference)


# ------------------------------------------------------------------------------------------
# Captures equal what plain hooks written here record


@pytest.mark.parametrize("fixture", ["clip_b16", "dinov2_s14_reg", "dinov3_s16"])
def test_captures_equal_plain_hooks(fixture, request, images):
    bb = request.getfixturevalue(fixture)
    clip = bb.family == "clip"
    layers = (1, bb.num_layers - 1)
    seen = {}
    handles = []
    for layer in layers:
        block = bb.blocks[layer]
        activation = block.mlp.gelu if clip else block.mlp.act
        handles.append(block.register_forward_hook(
            lambda m, a, out, layer=layer: seen.__setitem__(("residual", layer), out)))
        handles.append(activation.register_forward_hook(
            lambda m, a, out, layer=layer: seen.__setitem__(("neurons", layer), out)))
    final_norm = bb.model.ln_post if clip else bb.model.norm
    handles.append(final_norm.register_forward_hook(lambda m, a, out: seen.__setitem__("final", out)))
    try:
        _, cache = run(HookedViT(bb), images[:1], num_registers=2,
                                     capture=names(residual=(1, -1), neurons=(1, -1), final_tokens=True))
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:  # -1 is reported under its 0-based index
        assert torch.equal(cache[resid_post(layer)], seen[("residual", layer)])
        assert torch.equal(cache[mlp_post(layer)], seen[("neurons", layer)])
    assert torch.equal(cache[FINAL], seen["final"])
    assert cache[mlp_post(1)].shape[-1] == bb.mlp_width


# ------------------------------------------------------------------------------------------
# 2. attention probabilities equal what each library materialises itself


@pytest.mark.parametrize("num_registers", [0, 2])
def test_clip_attention_equals_multihead_attention_weights(clip_b16, images, num_registers):
    bb = clip_b16
    x = images[:num_registers or 1]
    layers = {"full": 1, "both": 6, "cls": 10}
    inputs = {}
    handles = [bb.blocks[l].register_forward_pre_hook(lambda m, args, l=l: inputs.__setitem__(l, args[0]))
               for l in layers.values()]
    try:
        _, cache = run(HookedViT(bb), x, num_registers=num_registers,
                                     capture=names(attention=(1, 6), cls_attention=(6, 10)))
    finally:
        for handle in handles:
            handle.remove()
    n = 1 + 196 + num_registers
    for kind, layer in layers.items():
        block = bb.blocks[layer]
        with torch.no_grad():
            h = block.ln_1(inputs[layer])
            reference = block.attn(h, h, h, need_weights=True, average_attn_weights=False)[1]
        b = x.shape[0]
        assert reference.shape == (b, 12, n, n)
        if kind in ("full", "both"):
            probabilities = cache[attn_pattern(layer)]
            assert probabilities.shape == (b, 12, n, n)
            torch.testing.assert_close(probabilities, reference, rtol=0, atol=1e-5)
            torch.testing.assert_close(probabilities.sum(-1), torch.ones(b, 12, n), rtol=0, atol=1e-5)
        else:
            assert attn_pattern(layer) not in cache
        if kind in ("both", "cls"):
            cls_row = cache[attn_cls_pattern(layer)]
            assert cls_row.shape == (b, 12, n)
            torch.testing.assert_close(cls_row, reference[:, :, 0, :], rtol=0, atol=1e-5)


@pytest.mark.parametrize("fixture,num_registers", [("dinov2_s14", 0), ("dinov2_l14", 2), ("dinov2_s14_reg", 2),
                                                  ("dinov3_s16", 0), ("dinov3_s16", 2)])
def test_timm_attention_equals_unfused_softmax(fixture, num_registers, request, images):
    bb = request.getfixturevalue(fixture)
    x = images[:1]
    layers = {"full": 2, "both": 7, "cls": bb.num_layers - 1}
    heads = bb.num_heads
    seen = {}
    saved = {l: bb.blocks[l].attn.fused_attn for l in layers.values()}
    handles = []
    try:
        for l in layers.values():
            bb.blocks[l].attn.fused_attn = False
            handles.append(bb.blocks[l].attn.attn_drop.register_forward_hook(
                lambda m, args, out, l=l: seen.__setitem__(l, args[0])))
        _, cache = run(HookedViT(bb), x, num_registers=num_registers,
                                     capture=names(attention=(layers["full"], layers["both"]),
                                                     cls_attention=(layers["both"], layers["cls"])))
    finally:
        for handle in handles:
            handle.remove()
        for l, fused in saved.items():
            bb.blocks[l].attn.fused_attn = fused
    n = bb.num_prefix_tokens + bb.num_patches + num_registers
    for kind, layer in layers.items():
        reference = seen[layer]
        assert reference.shape == (1, heads, n, n)
        if kind in ("full", "both"):
            probabilities = cache[attn_pattern(layer)]
            assert probabilities.shape == (1, heads, n, n)
            torch.testing.assert_close(probabilities, reference, rtol=0, atol=1e-5)
            torch.testing.assert_close(probabilities.sum(-1), torch.ones(1, heads, n), rtol=0, atol=1e-5)
        if kind in ("both", "cls"):
            torch.testing.assert_close(cache[attn_cls_pattern(layer)], reference[:, :, 0, :], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# 3. token layout with R test-time registers


@pytest.mark.parametrize("fixture,trained,width,out_dim,patches", [
    ("clip_b16", 0, 768, 512, 196), ("dinov2_s14", 0, 384, 384, 256), ("dinov2_s14_reg", 4, 384, 384, 256),
    ("dinov3_s16", 4, 384, 384, 196)])
def test_blocks_see_cls_trained_patches_registers(fixture, trained, width, out_dim, patches, request, images):
    bb = request.getfixturevalue(fixture)
    x = images[:1]
    hooked = HookedViT(bb)
    for R in (0, 3):
        pooled, cache = run(hooked, x, num_registers=R, capture=names(residual=(0, -1), neurons=(2,)))
        n = 1 + trained + patches + R
        assert cache[resid_post(0)].shape == (1, n, width)
        assert cache[resid_post(bb.num_layers - 1)].shape == (1, n, width)
        assert cache[mlp_post(2)].shape == (1, n, bb.mlp_width)
        assert pooled.shape == (1, out_dim)
    layout = hooked.token_layout(3)
    assert layout.patch_slice == slice(1 + trained, 1 + trained + patches)
    assert layout.register_slice == slice(1 + trained + patches, n)


def test_clip_registers_are_zeros_before_ln_pre(clip_b16, images):
    bb, R = clip_b16, 2
    x = images[:2]
    visual = bb.model
    seen = {}
    handle = visual.ln_pre.register_forward_hook(
        lambda m, args, out: seen.update(inp=args[0], out=out))
    try:
        with HookedViT(bb).hooks(num_registers=R), torch.no_grad():
            visual(x)
    finally:
        handle.remove()
    with torch.no_grad():
        patches = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(2, 1, -1)
        embedded = torch.cat([cls, patches], dim=1) + visual.positional_embedding
        ln_of_zero = F.layer_norm(torch.zeros(768), (768,), visual.ln_pre.weight, visual.ln_pre.bias,
                                  visual.ln_pre.eps)
    assert seen["inp"].shape == (2, 197 + R, 768)
    torch.testing.assert_close(seen["inp"][:, :197], embedded, rtol=0, atol=1e-5)
    assert torch.equal(seen["inp"][:, 197:], torch.zeros(2, R, 768))
    # ln_pre's output at the registers is ln_pre of a zero vector (its bias)
    torch.testing.assert_close(seen["out"][:, 197:], ln_of_zero.expand(2, R, 768), rtol=0, atol=1e-6)
    torch.testing.assert_close(ln_of_zero, visual.ln_pre.bias.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fixture", ["dinov2_s14", "dinov2_s14_reg", "dinov3_s16"])
def test_timm_registers_are_zeros_after_pos_embed(fixture, request, images):
    bb, R = request.getfixturevalue(fixture), 3
    x = images[:2]
    seen = []
    handle = bb.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        bb.stock_forward(x)
        with HookedViT(bb).hooks(num_registers=R), torch.no_grad():
            bb.model(x)
    finally:
        handle.remove()
    without, with_registers = seen
    n = bb.num_prefix_tokens + bb.num_patches
    assert without.shape == (2, n, 384) and with_registers.shape == (2, n + R, 384)
    assert torch.equal(with_registers[:, :n], without)
    assert torch.equal(with_registers[:, n:], torch.zeros(2, R, 384))


# ------------------------------------------------------------------------------------------
# 5. no hook outlives its context


class Boom(Exception):
    pass


@pytest.mark.parametrize("fixture", ["clip_b16", "dinov2_s14_reg", "dinov3_s16"])
def test_no_hook_remains(fixture, request, images):
    bb = request.getfixturevalue(fixture)
    model = bb.model
    hooked = HookedViT(bb)
    x = images[:1]
    baseline = hook_count(model)
    stock = bb.stock_forward(x)
    everything = names(residual=(0, 3), neurons=(1, 3), attention=(2,), cls_attention=(4,), final_tokens=True)
    iv = Intervention(neurons={1: [3, 9], 3: [5]})

    ttr_hooks = iv.fwd_hooks(hooked.token_layout(2))
    with hooked.hooks(num_registers=2, fwd_hooks=ttr_hooks, cache=everything):
        assert hook_count(model) >= baseline + 7
    assert hook_count(model) == baseline

    run(hooked, x, num_registers=2, intervention=iv, capture=everything)
    assert hook_count(model) == baseline

    with pytest.raises(Boom):
        with hooked.hooks(num_registers=2, fwd_hooks=ttr_hooks, cache=everything):
            assert hook_count(model) >= baseline + 7
            raise Boom()
    assert hook_count(model) == baseline

    # an error while installing (bad layer after some hooks are in) also cleans up
    with pytest.raises(IndexError):
        with hooked.hooks(num_registers=2, cache=names(residual=(0,), attention=(99,))):
            pass
    assert hook_count(model) == baseline

    # no stale register or intervention: the model gives its stock output again
    assert torch.equal(bb.stock_forward(x), stock)


# ------------------------------------------------------------------------------------------
# 6. DINOv3 (timm Eva: RoPE, 4 trained registers) reads bit for bit too


def test_dinov3_hooked_features_equal_timm(dinov3_s16, images):
    reference = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, img_size=224,
                                  global_pool="token")
    reference.load_state_dict(dinov3_s16.model.state_dict())
    reference.eval()
    x = images[:2]
    with torch.no_grad():
        expected = reference(x)
    everything = names(residual=(0, 5, 11), neurons=(0, 11), attention=(3,), cls_attention=(11,), final_tokens=True)
    pooled, cache = run(HookedViT(dinov3_s16), x, capture=everything)
    assert torch.equal(pooled, expected)
    assert torch.equal(cache[FINAL][:, 0], expected)          # final-norm CLS is the pooled feature
    assert cache[resid_post(0)].shape == (2, 1 + 4 + 196, 384)


# ------------------------------------------------------------------------------------------
# 7. the named hook-point API


def test_hook_names_and_parsing(clip_b16):
    hooked = HookedViT(clip_b16)
    every = hooked.hook_names()
    assert every[0] == "hook_registers" and every[-1] == FINAL
    assert len(every) == 2 + 4 * 12
    assert {resid_post(3), mlp_post(3), attn_pattern(3), attn_cls_pattern(3)} <= set(every)
    assert hooked.canonical("blocks.-1.hook_resid_post") == resid_post(11)
    for bad in ("blocks.3.hook_resid_pre", "hook_embed", "blocks.x.mlp.hook_post"):
        with pytest.raises(ValueError, match="unknown hook point"):
            hooked.parse(bad)
    with pytest.raises(IndexError):
        hooked.parse(resid_post(12))


def test_user_hook_functions_change_what_flows_on(dinov2_s14, images):
    """A hook function at ``mlp.hook_post`` that zeroes some neurons equals doing it by hand."""
    bb, layer, ids = dinov2_s14, 4, [1, 7, 300]
    x = images[:1]
    hooked = HookedViT(bb)
    seen = []

    def zero(activations, name):
        seen.append(name)
        changed = activations.clone()
        changed[:, :, ids] = 0.0
        return changed

    pooled = hooked.run_with_hooks(x, [(mlp_post(layer), zero)])
    assert seen == [mlp_post(layer)]
    handle = bb.blocks[layer].mlp.fc2.register_forward_pre_hook(
        lambda m, args: (args[0].index_fill(2, torch.tensor(ids), 0.0),))
    try:
        expected = bb.stock_forward(x)
    finally:
        handle.remove()
    assert torch.equal(pooled, expected)
    assert (pooled - bb.stock_forward(x)).abs().max() > 1e-4


def test_attention_points_are_read_only(clip_b16, images):
    hooked = HookedViT(clip_b16)
    with pytest.raises(ValueError, match="read-only"):
        hooked.run_with_hooks(images[:1], [(attn_pattern(2), lambda pattern, name: pattern * 0)])
    reads = []
    hooked.run_with_hooks(images[:1], [(attn_cls_pattern(2), lambda pattern, name: reads.append(pattern.shape))])
    assert reads == [(1, 12, 197)]
