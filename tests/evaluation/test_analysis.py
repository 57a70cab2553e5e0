"""The analysis pass and its figures on the planted fixture (docs/run.md, docs/demo.md).

The planted neurons fire on the uniform background patches that ``fixture._border_mask`` marks,
so the no-ttr norm maps carry outliers exactly there and ttr moves them onto the register."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch

from common.data.imagebank import split_preprocess
from common.demo.fixture import _border_mask, fixture_images, make_planted_model
from common.evaluation.analysis import (
    OUTLIER_COLUMNS,
    ModeSetup,
    analyse,
    analysis_paths,
    layer_curve_table,
    outlier_table,
)
from common.models.hooks import HookedViT, resid_post
from common.registers.intervention import Intervention
from common.reporting.plots import map_layers, write_outputs

FAMILIES = ("clip", "dinov2")
IMAGES = 6
FIGURE_IMAGES = 2


def _neurons(planted):
    grouped: dict[int, list[int]] = {}
    for layer, neuron in planted:
        grouped.setdefault(layer, []).append(neuron)
    return grouped


def pixels_of(backbone, images: np.ndarray) -> tuple[torch.Tensor, callable]:
    """The images through the backbone's PIL steps as ``uint8 [n, 3, H, W]``, and the
    normalisation that turns them into model inputs."""
    pil_steps, mean, std, _ = split_preprocess(backbone.preprocess)
    pixels = torch.stack([torch.from_numpy(np.asarray(pil_steps(PIL.Image.fromarray(im))).transpose(2, 0, 1).copy())
                          for im in images])
    return pixels, lambda p: p.float().div(255).sub(mean[:, None, None]).div(std[:, None, None])


@pytest.fixture(scope="module", params=FAMILIES)
def analysed(request):
    return _analyse(request.param)


@pytest.fixture(scope="module")
def analysed_clip():
    return _analyse("clip")


def _analyse(family: str):
    pm = make_planted_model(family, seed=0)
    hooked = HookedViT(pm.backbone)
    pixels, normalise = pixels_of(pm.backbone, fixture_images(IMAGES, seed=5))
    ttr = Intervention(_neurons(pm.planted)).fwd_hooks(hooked.token_layout(1))
    analysis = analyse(
        hooked, pixels, normalise, {"no-ttr": ModeSetup(0, []), "ttr": ModeSetup(1, ttr)},
        labels=[f"Train/class a/image_{i}.png" for i in range(IMAGES)],
        threshold=pm.config["register_norm_threshold"], detect_layer=pm.config["detect_outliers_layer"],
        intervened_layers=sorted(_neurons(pm.planted)), figure_images=FIGURE_IMAGES, batch_size=4)
    return pm, analysis, pixels, normalise


def test_shapes(analysed):
    pm, analysis, _, _ = analysed
    backbone = pm.backbone
    n, depth, (rows, cols) = IMAGES, backbone.num_layers, backbone.grid_size
    for mode, registers in (("no-ttr", 0), ("ttr", 1)):
        m = analysis.modes[mode]
        assert m.max_patch_norm.shape == (n, depth)
        assert m.max_cls_patch_attention.shape == (n, depth)
        assert m.detect_patch_norms.shape == (n, rows * cols)
        assert m.register_norms.shape == (n, registers)
        assert m.cls_entropy.shape == m.cls_on_register.shape == (n,)
        assert m.figure_norms.shape == (FIGURE_IMAGES, depth, rows, cols)
        assert m.figure_cls_attention.shape == (FIGURE_IMAGES, 2, backbone.num_heads, rows, cols)
        assert m.figure_cls_on_register.shape == (FIGURE_IMAGES, 2, backbone.num_heads)
    assert analysis.figure_inputs.shape[0] == FIGURE_IMAGES and analysis.figure_inputs.shape[-1] == 3
    assert 0.0 <= analysis.figure_inputs.min() and analysis.figure_inputs.max() <= 1.0
    assert analysis.intervened_layers == sorted({layer for layer, _ in pm.planted})


def test_norm_maps_differ_where_the_outliers_are_planted(analysed):
    pm, analysis, _, _ = analysed
    border = _border_mask(analysis.grid[0]).numpy().reshape(analysis.grid)
    detect, threshold = analysis.detect_layer, analysis.threshold
    no = analysis.modes["no-ttr"].figure_norms[:, detect]        # [F, rows, cols]
    ttr = analysis.modes["ttr"].figure_norms[:, detect]
    difference = no - ttr
    for k in range(FIGURE_IMAGES):
        on, off = difference[k][border], difference[k][~border]
        print(f"{pm.family} image {k}: no-ttr - ttr on planted patches min {on.min():.1f}, "
              f"elsewhere max |.| {np.abs(off).max():.1f}")
        assert (no[k][border] > threshold).all()           # outliers at every planted position
        assert (no[k][~border] <= threshold).all()         # and nowhere else
        assert (ttr[k] < threshold).all()                  # gone under ttr
        assert on.min() > 5 * np.abs(off).max()            # the maps differ where the outliers are


def test_outlier_table(analysed, tmp_path):
    pm, analysis, _, _ = analysed
    table = outlier_table(analysis)
    assert tuple(table.columns) == OUTLIER_COLUMNS
    assert table["mode"].tolist() == ["no-ttr", "ttr"]
    no, ttr = table.iloc[0], table.iloc[1]
    threshold = pm.config["register_norm_threshold"]
    assert no["patch_share_above_threshold"] > 0
    assert ttr["patch_share_above_threshold"] == 0.0
    assert ttr["register_norm"] > threshold and math.isnan(no["register_norm"])
    assert math.isnan(no["cls_attention_on_register"]) and 0 < ttr["cls_attention_on_register"] < 1
    assert no["mean_max_patch_norm"] > threshold > ttr["mean_max_patch_norm"]
    max_entropy = math.log(analysis.grid[0] * analysis.grid[1])
    for value in table["cls_attention_entropy"]:
        assert 0 < value <= max_entropy + 1e-6
    # the planted share is the border mask's share of the patches
    assert no["patch_share_above_threshold"] == pytest.approx(_border_mask(analysis.grid[0]).float().mean().item())
    curves = layer_curve_table(analysis)
    assert len(curves) == 2 * analysis.num_layers


def test_written_outputs(analysed_clip, tmp_path):
    """The figures are drawn the same way for every family: drawn once (CLIP) to keep the suite fast."""
    pm, analysis, _, _ = analysed_clip
    sections = write_outputs(analysis, tmp_path)
    table = pd.read_csv(tmp_path / "outliers.csv")
    assert tuple(table.columns) == OUTLIER_COLUMNS
    assert table.loc[table["mode"] == "ttr", "patch_share_above_threshold"].item() == 0.0
    assert table.loc[table["mode"] == "no-ttr", "patch_share_above_threshold"].item() > 0
    pngs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    expected = {"layer_curves.png", "norm_histogram.png"}
    expected |= {f"{kind}_{k + 1}.png" for kind in ("norm_maps", "attention_maps") for k in range(FIGURE_IMAGES)}
    assert set(pngs) == expected
    for name in pngs:
        path = tmp_path / "figures" / name
        assert path.stat().st_size > 10_000, name
        with PIL.Image.open(path) as image:
            image.verify()
        with PIL.Image.open(path) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 300, (name, image.size)
    text = "\n".join(sections)
    assert "| no-ttr |" in text and "| ttr |" in text
    for name in pngs:
        assert f"(figures/{name})" in text
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left behind


def test_analysis_paths_are_seeded_and_fixed():
    paths = [f"/x/{i:03d}.png" for i in range(50)]
    first = analysis_paths(paths, 10, seed=0)
    assert first == analysis_paths(list(reversed(paths)), 10, seed=0)   # order of the input does not matter
    assert len(set(first)) == 10 and first != sorted(paths)[:10]
    assert first != analysis_paths(paths, 10, seed=1)
    assert analysis_paths(paths, 100, seed=0) == analysis_paths(paths, 50, seed=0)


def test_map_layers():
    assert map_layers(6, 5) == list(range(6))
    deep = map_layers(24, 22)
    assert 0 in deep and 23 in deep and 22 in deep and len(deep) <= 13


@torch.no_grad()
def _last_cls_attention(pm, x_last: torch.Tensor) -> torch.Tensor:
    """The last block's CLS attention ``[B, H, N]`` recomputed from its weights (pre-attention
    norm, q/k projections, softmax), given the block's input ``x_last [B, N, d]``."""
    block = pm.backbone.blocks[-1]
    heads = pm.backbone.num_heads
    if pm.family == "clip":
        h = block.ln_1(x_last)
        width = h.shape[-1]
        q = h @ block.attn.in_proj_weight[:width].T + block.attn.in_proj_bias[:width]
        k = h @ block.attn.in_proj_weight[width:2 * width].T + block.attn.in_proj_bias[width:2 * width]
    else:
        h = block.norm1(x_last)
        width = h.shape[-1]
        qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
        q, k = qkv[..., :width], qkv[..., width:2 * width]
    b, n, _ = q.shape
    q = q.reshape(b, n, heads, -1).transpose(1, 2)
    k = k.reshape(b, n, heads, -1).transpose(1, 2)
    scores = (q[:, :, :1] @ k.transpose(-2, -1))[:, :, 0] / (q.shape[-1] ** 0.5)
    return scores.softmax(dim=-1)


def _last_layer_inputs(pm, pixels, normalise) -> tuple[int, dict, dict]:
    """The last layer's index and the cached inputs of the last block, no-ttr and ttr (planted neurons)."""
    hooked = HookedViT(pm.backbone)
    last = pm.backbone.num_layers - 1
    x = normalise(pixels)
    ttr_hooks = Intervention(_neurons(pm.planted)).fwd_hooks(hooked.token_layout(1))
    _, plain = hooked.run_with_cache(x, [resid_post(last - 1)])
    _, moved = hooked.run_with_cache(x, [resid_post(last - 1)], num_registers=1, fwd_hooks=ttr_hooks)
    return last, plain, moved


def test_planted_outliers_are_attention_sinks(analysed):
    """Without ttr the last layer's CLS attention piles onto the planted outlier patches; ttr moves
    it onto the register (entropy over the patches rises, a large share lands on the register).
    The analysis' numbers equal a recomputation from the weights."""
    pm, analysis, pixels, normalise = analysed
    last, plain, moved = _last_layer_inputs(pm, pixels, normalise)
    grid = analysis.grid[0]
    border = _border_mask(grid).numpy()
    for mode, inputs, registers in (("no-ttr", plain, 0), ("ttr", moved, 1)):
        attention = _last_cls_attention(pm, inputs[resid_post(last - 1)])            # [B, H, N]
        patches = attention[:, :, 1:1 + grid * grid]
        p = patches / patches.sum(dim=-1, keepdim=True)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=-1).mean(dim=1)          # [B]
        np.testing.assert_allclose(analysis.modes[mode].cls_entropy, entropy.numpy(), rtol=1e-4, atol=1e-5)
        if registers:
            on_register = attention[:, :, -1].mean(dim=1)
            np.testing.assert_allclose(analysis.modes[mode].cls_on_register, on_register.numpy(), rtol=1e-4,
                                       atol=1e-6)
        else:
            on_outliers = patches[:, :, torch.from_numpy(border)].sum(dim=-1).mean(dim=1)
            assert (on_outliers > 0.5).all(), on_outliers                # sinks: most CLS attention
            assert border.mean() < 0.3                                   # on a quarter of the patches
    table = outlier_table(analysis).set_index("mode")
    assert table.loc["ttr", "cls_attention_entropy"] > table.loc["no-ttr", "cls_attention_entropy"] + 0.5
    uniform = 1.0 / (grid * grid + 2)
    assert table.loc["ttr", "cls_attention_on_register"] > 10 * uniform


def test_last_layer_maps_for_the_localization(analysed):
    """Per image the last layer's CLS attention on the image patches, head mean, renormalised to
    sum to 1 (what the localization scores): equal to a recomputation from the weights."""
    pm, analysis, pixels, normalise = analysed
    last, plain, moved = _last_layer_inputs(pm, pixels, normalise)
    patches = analysis.grid[0] * analysis.grid[1]
    for mode, inputs in (("no-ttr", plain), ("ttr", moved)):
        attention = _last_cls_attention(pm, inputs[resid_post(last - 1)])[:, :, 1:1 + patches].mean(dim=1)
        expected = (attention / attention.sum(dim=-1, keepdim=True)).numpy()
        np.testing.assert_allclose(analysis.modes[mode].last_cls_attention, expected, rtol=1e-4, atol=1e-6)
        assert analysis.modes[mode].extra_cls_attention.shape == (0, patches)
