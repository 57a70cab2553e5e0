"""The planted-register fixture (docs/demo.md), for every preset: a small model of the preset's own
structure, determinism, where the planted neurons fire, that detection ranks them first, and that
ttr moves the high norm from the patches onto the register.

The margins are printed (run with ``-s`` to see them)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import names, run

import configs
from common.demo.fixture import IMAGE_SIZE, fixture_images, make_planted_model
from common.models.families import get_family
from common.models.hooks import HookedViT, resid_post
from common.registers.detection import detect_register_neurons
from common.registers.intervention import Intervention

MODELS = tuple(configs.PRESETS)      # every preset has a planted model of its own structure


def to_batch(backbone, images):
    return torch.stack([backbone.preprocess(PIL.Image.fromarray(image)) for image in images])


def kind(pm):
    """The library class of the planted model's transformer (written out here, not asked of the adapter)."""
    from open_clip.timm_model import TimmModel

    model = pm.backbone.model
    tower = model.trunk if isinstance(model, TimmModel) else model
    return tower, type(tower).__module__.split(".")[0] + "." + type(tower).__name__


def blocks_of(pm):
    tower, name = kind(pm)
    return list(tower.transformer.resblocks) if name == "open_clip.VisionTransformer" else list(tower.blocks)


def mlp_out(block):
    return block.mlp.c_proj if hasattr(block.mlp, "c_proj") else block.mlp.fc2


@torch.no_grad()
def own_forward(pm, x, planted_layer, detect_index):
    """Plain hooks: planted layer's MLP hidden activations ``[B, N, D]`` and layer-k output norms
    ``[B, N]``."""
    blocks = blocks_of(pm)
    seen = {}
    handles = [
        mlp_out(blocks[planted_layer]).register_forward_pre_hook(
            lambda m, args: seen.__setitem__("acts", args[0].clone())),
        blocks[detect_index].register_forward_hook(
            lambda m, args, out: seen.__setitem__("norms", out.norm(dim=-1))),
    ]
    try:
        pm.backbone.model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen["acts"], seen["norms"]


@pytest.fixture(scope="module", params=MODELS)
def detected(request):
    """(planted model, detection result on 8 fixture images with the fixture config)."""
    pm = make_planted_model(request.param, seed=0)
    x = to_batch(pm.backbone, fixture_images(8, seed=0))
    result = detect_register_neurons(
        HookedViT(pm.backbone), [x[:4], x[4:]],
        detect_layer=pm.config["detect_outliers_layer"],
        threshold=pm.config["register_norm_threshold"])
    return pm, result


def detect_index(pm):
    k = pm.config["detect_outliers_layer"]
    depth = len(blocks_of(pm))
    return depth + k if k < 0 else k


# ------------------------------------------------------------------------------------------


def test_fixture_images():
    images = fixture_images(5, seed=3)
    assert images.shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert np.array_equal(images, fixture_images(5, seed=3))
    assert not np.array_equal(images, fixture_images(5, seed=4))
    for image in images:
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == border[0]).all()                     # uniform background
        centre = image[IMAGE_SIZE // 2 - 4:IMAGE_SIZE // 2 + 4, IMAGE_SIZE // 2 - 4:IMAGE_SIZE // 2 + 4]
        assert centre.std() > 10                                # textured object


def structure(model: str, dims: bool):
    """What "the same structure" means: the transformer's class, the MLP's and activation's classes,
    the token layout, layer scale, position embeddings of the prefix, the projection head."""
    choice = configs.PRESETS[model]
    family = get_family(choice[0])
    from common.models.family import SmallDims

    small = SmallDims(image_size=64, patch_size=8, width=64, depth=6, heads=4, mlp_ratio=4.0) if dims else None
    with torch.device("meta"):
        module = family.create(choice[1], seed=0, dims=small)
    adapter = family.wrap(module)
    block = adapter.blocks[0]
    mlp = block.mlp
    act = getattr(mlp, "act", getattr(mlp, "gelu", None))
    tower = adapter.tower
    return {"tower": type(tower).__name__, "wrapper": type(module).__name__, "mlp": type(mlp).__name__,
            "act": type(act).__name__, "gate_last": getattr(mlp, "gate_last", None),
            "prefix": adapter.num_prefix_tokens, "cls": adapter.has_cls,
            "no_embed_class": getattr(tower, "no_embed_class", None),
            "layer_scale": type(getattr(block, "ls1", getattr(block, "gamma_1", None))).__name__,
            "dynamic": getattr(tower, "dynamic_img_size", None), "pool": getattr(tower, "global_pool", None),
            "rope": getattr(tower, "rope", None) is not None}


@pytest.mark.parametrize("model", MODELS)
def test_planted_model_has_the_structure_of_its_preset(model):
    """The demo's small model of a preset is the preset's architecture with other dimensions: same
    family and library classes, MLP type (a gated MLP for Virchow2), activation, token layout
    (trained registers, CLS, prefix position embeddings), layer scale and pooling."""
    small, full = structure(model, dims=True), structure(model, dims=False)
    if model == "dinov3":   # the small DINOv3 also has an absolute position embedding (docs/demo.md)
        assert small.pop("rope") and full.pop("rope")
    assert small == full
    if model == "virchow2":
        assert full["mlp"] == "GluMlp" and full["act"] == "SiLU" and full["gate_last"] is False
        assert full["prefix"] == 5 and full["no_embed_class"] is False


@pytest.mark.parametrize("model", MODELS)
def test_planted_model_is_deterministic(model):
    first, again, other = (make_planted_model(model, seed=s) for s in (0, 0, 1))
    assert first.model == model and first.backbone.name == model
    assert first.family == configs.PRESETS[model][0] == first.backbone.family
    assert first.planted == again.planted
    state, state_again, state_other = (m.backbone.model.state_dict() for m in (first, again, other))
    assert all(torch.equal(state[name], state_again[name]) for name in state)
    assert any(not torch.equal(state[name], state_other[name]) for name in state)

    layers = {layer for layer, _ in first.planted}
    assert len(layers) == 1 and len(set(first.planted)) == len(first.planted) >= 2
    config = first.config
    assert config["highest_layer"] == next(iter(layers))
    assert config["top_k"] == len(first.planted)
    assert config["register_norm_threshold"] > 0 and "detect_outliers_layer" in config
    assert first.backbone.model.training is False


@pytest.mark.parametrize("model", MODELS)
def test_outliers_are_exactly_where_planted_neurons_fire(model):
    """Independent of detection: on fixture images the planted neurons fire (> 1) only on some
    uniform-background patches, are silent (< 0.5) at most positions (so the sparsity filter
    keeps them), and the tokens above the threshold at the detect layer are exactly those."""
    pm = make_planted_model(model, seed=0)
    images = fixture_images(8, seed=5)
    x = to_batch(pm.backbone, images)
    planted_layer = pm.planted[0][0]
    ids = [n for _, n in pm.planted]
    acts, norms = own_forward(pm, x, planted_layer, detect_index(pm))
    prefix = pm.backbone.num_prefix_tokens                           # CLS + trained registers
    # CLS and the image patches: the positions detection looks at (trained registers left out)
    keep = [0] + list(range(prefix, acts.shape[1]))
    acts, norms = acts[:, keep], norms[:, keep]
    planted_acts = acts[:, :, ids]                                   # [B, N, S]
    fires = planted_acts.max(dim=2).values > 1.0                     # [B, N]
    assert not fires[:, 0].any()                                     # never CLS
    assert fires.sum(dim=1).min() >= 1                               # every image has one
    assert ((planted_acts < 0.5).sum(dim=1) >= 0.5 * acts.shape[1]).all()
    # firing patches are uniform (one grey value over the 8x8 patch)
    grid = IMAGE_SIZE // 8
    for b in range(len(images)):
        for token in torch.nonzero(fires[b]).flatten().tolist():
            row, col = divmod(token - 1, grid)
            patch = images[b, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]
            assert (patch == patch[0, 0]).all()
    threshold = pm.config["register_norm_threshold"]
    assert torch.equal(norms > threshold, fires)
    high, low = norms[fires].min().item(), norms[~fires].max().item()
    print(f"\n{model}: outlier norms >= {high:.1f}, other tokens <= {low:.1f}, threshold {threshold}")


def test_detection_ranks_planted_neurons_first(detected):
    """Criterion: the planted neurons rank first, each >= 5x the best non-planted neuron."""
    pm, result = detected
    n = len(pm.planted)
    assert {(l, j) for l, j, _ in result.ranked[:n]} == set(pm.planted)
    best_other = result.ranked[n][2]
    assert (result.ranked[n][0], result.ranked[n][1]) not in set(pm.planted)
    lowest_planted = min(s for _, _, s in result.ranked[:n])
    assert lowest_planted >= 5 * best_other, (lowest_planted, best_other)
    assert result.images_counted == 8
    assert result.select(pm.config["highest_layer"], pm.config["top_k"]) == {
        pm.planted[0][0]: sorted(j for _, j in pm.planted)}
    print(f"\n{pm.model}: lowest planted score {lowest_planted:.2f}, best other {best_other:.3f} "
          f"(x{lowest_planted / best_other:.1f})")


def test_ttr_moves_the_outlier_onto_the_register(detected):
    """No ttr: every image has patches above the threshold at the detect layer.  ttr (R = 1,
    detected neurons, normal_values zero): every patch below, the register above, per image.
    Checked on images other than those used for detection."""
    pm, result = detected
    backbone = pm.backbone
    hooked = HookedViT(backbone)
    k = detect_index(pm)
    threshold = pm.config["register_norm_threshold"]
    selected = result.select(pm.config["highest_layer"], pm.config["top_k"])
    x = to_batch(backbone, fixture_images(8, seed=11))
    n_patches = backbone.num_patches
    prefix = backbone.num_prefix_tokens                   # 1, or 5 with DINOv3's trained registers

    _, plain = run(hooked, x, capture=names(residual=(k,)))
    plain_norms = plain[resid_post(k)].norm(dim=-1)
    assert plain_norms.shape == (8, prefix + n_patches)
    plain_patch_max = plain_norms[:, prefix:].max(dim=1).values
    assert (plain_patch_max > threshold).all(), plain_patch_max

    intervention = Intervention(selected)
    assert intervention.normal_values == "zero" and intervention.scale == 1.0
    _, ttr = run(hooked, x, num_registers=1, intervention=intervention, capture=names(residual=(k,)))
    norms = ttr[resid_post(k)].norm(dim=-1)
    assert norms.shape == (8, prefix + n_patches + 1)
    patch_max = norms[:, prefix:prefix + n_patches].max(dim=1).values
    register = norms[:, -1]
    assert (patch_max < threshold).all(), patch_max
    assert (register > threshold).all(), register

    # Independently of HookedViT: the same through plain hooks on the same module order.
    own_norms = _own_ttr_norms(pm, x, selected, k)
    torch.testing.assert_close(own_norms, norms, rtol=1e-4, atol=1e-3)

    print(f"\n{pm.model} (threshold {threshold}): no-ttr max patch / t in "
          f"[{(plain_patch_max / threshold).min():.2f}, {(plain_patch_max / threshold).max():.2f}]; "
          f"ttr max patch / t in [{(patch_max / threshold).min():.2f}, {(patch_max / threshold).max():.2f}]; "
          f"ttr register / t in [{(register / threshold).min():.2f}, {(register / threshold).max():.2f}]")


@torch.no_grad()
def _own_ttr_norms(pm, x, selected, detect_index):
    """ttr written out with plain hooks: a zero token appended after the position embedding,
    at each selected layer register <- signed max over all positions and selected neurons,
    patches <- 0; returns layer-k norms ``[B, N + 1]``."""
    tower, name = kind(pm)
    blocks = blocks_of(pm)
    handles = []

    def append(tokens):
        return torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])], dim=1)

    if name == "open_clip.VisionTransformer":
        handles.append(tower.ln_pre.register_forward_pre_hook(lambda m, args: (append(args[0]),)))
    elif name == "timm.VisionTransformer":
        handles.append(tower.patch_drop.register_forward_hook(lambda m, args, out: append(out)))
    else:
        assert name == "timm.Eva"
        # timm's Eva: after _pos_embed, before norm_pre; the rotary table gets one no-rotation
        # row (sin 0, cos 1) for the appended token, which has no position.
        handles.append(tower.norm_pre.register_forward_pre_hook(lambda m, args: (append(args[0]),)))

        def extend(module, args, kwargs):
            rope = kwargs["rope"]
            half = rope.shape[-1] // 2
            row = torch.cat([torch.zeros(1, half), torch.ones(1, half)], dim=1)
            return args, {**kwargs, "rope": torch.cat([rope, row], dim=0)}

        handles += [block.register_forward_pre_hook(extend, with_kwargs=True) for block in blocks]
    prefix = pm.backbone.num_prefix_tokens

    def intervene(ids):
        def hook(module, args):
            acts = args[0].clone()
            for b in range(acts.shape[0]):
                values = acts[b][:, ids]
                largest, most_negative = values.max(), values.min()
                m = largest if largest.abs() > most_negative.abs() else most_negative
                acts[b, -1, ids] = m
                acts[b, prefix:-1, ids] = 0.0
            return (acts,)
        return hook

    for layer, ids in selected.items():
        handles.append(mlp_out(blocks[layer]).register_forward_pre_hook(intervene(ids)))
    seen = {}
    handles.append(blocks[detect_index].register_forward_hook(
        lambda m, args, out: seen.__setitem__("norms", out.norm(dim=-1))))
    try:
        pm.backbone.model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen["norms"]
