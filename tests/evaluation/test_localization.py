"""Attention localization (common/evaluation/localization.py, docs/run.md): the metrics against values
computed by hand on small maps, the summary against a plain bootstrap loop, the lighter attention
pass against the analysis pass, and the demo's planted models: their sinks pull the CLS attention
off the object, and ttr puts it back (every preset)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch

import configs
from common.data.imagebank import split_preprocess
from common.data.masks import mask_at_input, mask_steps
from common.demo.fixture import IMAGE_SIZE, make_planted_model
from common.demo.synthetic import make_synthetic, synthetic_masks
from common.evaluation.analysis import ModeSetup, analyse
from common.evaluation.localization import (
    LOCALIZATION_COLUMNS,
    SUMMARY_COLUMNS,
    cls_patch_map,
    image_metrics,
    last_layer_attention,
    localization_summary,
    localize,
    upsample,
)
from common.models.hooks import HookedViT
from common.registers.intervention import Intervention

# ------------------------------------------------------------------------- by hand


def test_upsample_is_bilinear_without_corner_alignment():
    """2x2 -> 4x4: target pixel i samples source coordinate (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75,
    1.25, clamped to [0, 1]; a 1 in the top-left corner therefore gives weights 1, 0.75, 0.25, 0 along
    each axis."""
    ramp = np.array([1.0, 0.75, 0.25, 0.0])
    out = upsample(np.array([[[1.0, 0.0], [0.0, 0.0]]]), (4, 4))
    np.testing.assert_allclose(out[0], np.outer(ramp, ramp), atol=1e-12)


def test_cls_patch_map_averages_heads_then_renormalises():
    attention = torch.tensor([[[0.2, 0.2, 0.1], [0.4, 0.0, 0.0]]])            # [B=1, H=2, P=3]
    # head mean 0.3, 0.1, 0.05 (sum 0.45)
    np.testing.assert_allclose(cls_patch_map(attention)[0].numpy(), [2 / 3, 2 / 9, 1 / 9], rtol=1e-6)


def test_metrics_by_hand():
    """A 4x4 map of ones with a 5 in the corner: total 20, mean 1.25, so only the corner is above the
    mean.  Mask = the top row: energy (5 + 1 + 1 + 1) / 20 = 0.4, the maximum inside, IoU 1 / 4."""
    attention = np.ones((4, 4))
    attention[0, 0] = 5.0
    top = np.zeros((4, 4), bool)
    top[0] = True
    metrics = image_metrics(attention, top)
    assert metrics["energy_in_mask"] == pytest.approx(0.4)
    assert metrics["pointing_hit"] == 1.0
    assert (metrics["intersection"], metrics["union"]) == (1, 4) and metrics["iou"] == pytest.approx(0.25)
    assert metrics["mask_share"] == 0.25
    bottom = np.zeros((4, 4), bool)
    bottom[3] = True                                          # misses the maximum
    metrics = image_metrics(attention, bottom)
    assert metrics["pointing_hit"] == 0.0
    assert metrics["energy_in_mask"] == pytest.approx(4 / 20)
    assert (metrics["intersection"], metrics["union"]) == (0, 5) and metrics["iou"] == 0.0


def test_a_mask_equal_to_the_region_above_the_mean_has_iou_1():
    attention = np.zeros((6, 6))
    attention[1:3, 2:5] = 1.0
    metrics = image_metrics(attention, attention > 0)
    assert metrics["iou"] == 1.0 and metrics["energy_in_mask"] == 1.0 and metrics["pointing_hit"] == 1.0


def test_localize_upsamples_each_mode_and_leaves_out_empty_masks():
    """Patch maps 2x2 on an 8x8 image: the mask is the top-left quarter, where the baseline puts
    nothing and the other mode everything; image 1's mask is empty (cropped away) and is left out."""
    maps = {"no-ttr": np.array([[[0.0, 0.5], [0.5, 0.0]], [[1, 0], [0, 0]]], float),
            "ttr": np.array([[[1.0, 0.0], [0.0, 0.0]], [[1, 0], [0, 0]]], float)}
    quarter = np.zeros((8, 8), bool)
    quarter[:4, :4] = True
    masks = [quarter, np.zeros((8, 8), bool)]
    table, left_out = localize(["a.png", "b.png"], maps, lambda i: masks[i], progress=False)
    assert left_out == ["b.png"]
    assert tuple(table.columns) == LOCALIZATION_COLUMNS
    assert table[["path", "mode"]].values.tolist() == [["a.png", "no-ttr"], ["a.png", "ttr"]]
    for mode, attention in (("no-ttr", maps["no-ttr"][0]), ("ttr", maps["ttr"][0])):
        up = upsample(attention[None], (8, 8))[0]
        row = table[table["mode"] == mode].iloc[0]
        assert row["energy_in_mask"] == pytest.approx(up[quarter].sum() / up.sum())
        assert row["mask_share"] == 0.25
    assert table.loc[table["mode"] == "ttr", "pointing_hit"].item() == 1.0
    assert table.loc[table["mode"] == "no-ttr", "pointing_hit"].item() == 0.0


# ------------------------------------------------------------------------- the summary


def test_summary_against_a_plain_bootstrap_loop():
    rng = np.random.default_rng(4)
    n, boot, perm, seed = 23, 200, 150, 7
    rows = []
    for i in range(n):
        for mode, shift in (("no-ttr", 0.0), ("ttr", 0.2)):
            union = int(rng.integers(50, 100))
            intersection = int(rng.integers(0, union))
            rows.append({"path": f"{i}.png", "mode": mode, "energy_in_mask": rng.random() * 0.7 + shift,
                         "pointing_hit": float(rng.random() < 0.3 + shift), "iou": intersection / union,
                         "intersection": intersection, "union": union, "mask_share": 0.2})
    table = pd.DataFrame(rows)
    summary = localization_summary(table, n_boot=boot, n_perm=perm, seed=seed)
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    # the same resampled indices, the statistics by a loop
    draws = np.random.default_rng(seed).integers(0, n, size=(boot, n))
    by = {mode: table[table["mode"] == mode].reset_index(drop=True) for mode in ("no-ttr", "ttr")}

    def value(frame, metric, idx):
        part = frame.iloc[idx]
        if metric == "iou_accumulated":
            return part["intersection"].sum() / part["union"].sum()
        return part[metric].mean()

    j = 5                                   # 2k / 200 < 0.05 for k = 0..4: the 5th smallest and largest
    for metric in ("energy_in_mask", "pointing_hit", "iou", "iou_accumulated"):
        full = {mode: value(by[mode], metric, np.arange(n)) for mode in by}
        resampled = {mode: np.array([value(by[mode], metric, d) for d in draws]) for mode in by}
        diffs = np.sort(resampled["ttr"] - resampled["no-ttr"])
        got = summary.set_index(["metric", "mode"])
        ttr, base = got.loc[(metric, "ttr")], got.loc[(metric, "no-ttr")]
        assert base["mean"] == pytest.approx(full["no-ttr"]) and ttr["mean"] == pytest.approx(full["ttr"])
        means = np.sort(resampled["ttr"])
        assert (ttr["mean_lo"], ttr["mean_hi"]) == pytest.approx((means[j - 1], means[boot - j]))
        assert ttr["diff"] == pytest.approx(full["ttr"] - full["no-ttr"])
        assert (ttr["diff_lo"], ttr["diff_hi"]) == pytest.approx((diffs[j - 1], diffs[boot - j]))
        assert ttr["diff_se"] == pytest.approx(np.std(diffs, ddof=1))
        assert math.isnan(base["diff"]) and ttr["images"] == n
        # the permutation test by a loop: each image's two rows swapped with probability 1/2
        swaps = np.random.default_rng([seed, 1]).random((perm, n)) < 0.5
        permuted = []
        for swap in swaps:
            cols = ["energy_in_mask", "pointing_hit", "iou", "intersection", "union"]
            as_ttr = by["ttr"].copy()
            as_base = by["no-ttr"].copy()
            as_ttr.loc[swap, cols] = by["no-ttr"].loc[swap, cols].to_numpy()
            as_base.loc[swap, cols] = by["ttr"].loc[swap, cols].to_numpy()
            permuted.append(value(as_ttr, metric, np.arange(n)) - value(as_base, metric, np.arange(n)))
        observed = full["ttr"] - full["no-ttr"]
        reach = np.count_nonzero(np.abs(np.array(permuted)) >= abs(observed) - 1e-12)
        assert ttr["diff_p"] == pytest.approx((reach + 1) / (perm + 1))
    assert got.loc[("iou_accumulated", "ttr"), "mean"] != pytest.approx(got.loc[("iou", "ttr"), "mean"])


def test_summary_refuses_modes_over_different_images():
    table = pd.DataFrame([{"path": "a", "mode": "no-ttr"}, {"path": "b", "mode": "ttr"}],
                         columns=list(LOCALIZATION_COLUMNS)).fillna(0.5)
    with pytest.raises(ValueError, match="same images"):
        localization_summary(table, n_boot=10, n_perm=10, seed=0)


# ------------------------------------------------------------------------- the planted models


def _neurons(planted):
    grouped: dict[int, list[int]] = {}
    for layer, neuron in planted:
        grouped.setdefault(layer, []).append(neuron)
    return grouped


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Demo data (the pacemaker and aptos drawings: an object with a wire, a fundus disk) with their
    object masks: ``[(image path, mask path)]``."""
    pairs = []
    for name in ("pacemaker", "aptos"):
        root = make_synthetic(name, tmp_path_factory.mktemp(name), per_class=3, image_size=IMAGE_SIZE, seed=1)
        images = sorted(str(p) for p in root.rglob("*.png") if ".masks" not in p.parts)
        masks = synthetic_masks(root, images)
        assert sorted(masks) == images
        pairs += sorted(masks.items())
    return pairs


def _inputs(backbone, pairs):
    pil_steps, mean, std, _ = split_preprocess(backbone.preprocess)
    pixels = torch.stack([torch.from_numpy(np.asarray(pil_steps(PIL.Image.open(image).convert("RGB")))
                                           .transpose(2, 0, 1).copy()) for image, _ in pairs])
    steps = mask_steps(pil_steps)
    masks = [mask_at_input(mask, image, steps) for image, mask in pairs]
    return pixels, (lambda p: p.float().div(255).sub(mean[:, None, None]).div(std[:, None, None])), masks


@pytest.mark.parametrize("model", tuple(configs.PRESETS))
def test_ttr_moves_the_attention_onto_the_object(synthetic, model):
    """On the demo's images: without ttr the planted sinks (uniform background patches) take the
    last layer's CLS attention off the object - less inside the mask than uniform attention would
    put there; with ttr the register takes the sinks' share, and over the image patches the
    attention sits on the object: more inside the mask on every image, over 1.5x the mask's share
    on average."""
    pm = make_planted_model(model, seed=0)
    hooked = HookedViT(pm.backbone)
    pixels, normalise, masks = _inputs(pm.backbone, synthetic)
    ttr = Intervention(_neurons(pm.planted)).fwd_hooks(hooked.token_layout(1))
    rows, cols = pm.backbone.grid_size
    maps = {"no-ttr": last_layer_attention(hooked, pixels, normalise, 0, [], batch_size=8),
            "ttr": last_layer_attention(hooked, pixels, normalise, 1, ttr, batch_size=8)}
    maps = {mode: m.reshape(len(m), rows, cols) for mode, m in maps.items()}
    table, left_out = localize([image for image, _ in synthetic], maps, lambda i: masks[i], progress=False)
    assert not left_out
    no = table[table["mode"] == "no-ttr"].reset_index(drop=True)
    yes = table[table["mode"] == "ttr"].reset_index(drop=True)
    share = no["mask_share"]
    assert (yes["energy_in_mask"] > no["energy_in_mask"]).all()
    assert no["energy_in_mask"].mean() < 0.5 * share.mean()
    assert yes["energy_in_mask"].mean() > 1.5 * share.mean()
    assert yes["iou"].mean() > no["iou"].mean() + 0.2
    assert yes["pointing_hit"].mean() > no["pointing_hit"].mean()
    print(f"\n{model}: energy in mask no-ttr {no['energy_in_mask'].mean():.3f}, ttr {yes['energy_in_mask'].mean():.3f} "
          f"(mask share {share.mean():.3f}); IoU {no['iou'].mean():.3f} -> {yes['iou'].mean():.3f}; pointing "
          f"{no['pointing_hit'].mean():.2f} -> {yes['pointing_hit'].mean():.2f}")


@pytest.mark.parametrize("model", ("clip", "dinov2"))
def test_the_lighter_pass_gives_the_analysis_maps(synthetic, model):
    """The analysis pass keeps each image's last-layer map; images outside its sample get them from
    the lighter pass: the same numbers either way."""
    pm = make_planted_model(model, seed=0)
    hooked = HookedViT(pm.backbone)
    pixels, normalise, _ = _inputs(pm.backbone, synthetic)
    ttr = Intervention(_neurons(pm.planted)).fwd_hooks(hooked.token_layout(1))
    modes = {"no-ttr": ModeSetup(0, []), "ttr": ModeSetup(1, ttr)}
    analysis = analyse(hooked, pixels[:5], normalise, modes, labels=[f"{i}" for i in range(5)],
                       threshold=pm.config["register_norm_threshold"],
                       detect_layer=pm.config["detect_outliers_layer"], figure_images=1, batch_size=4,
                       extra_pixels=pixels[5:9], extra_labels=[f"{i}" for i in range(5, 9)])
    assert analysis.extra_labels == ["5", "6", "7", "8"]
    for mode, setup in modes.items():
        whole = last_layer_attention(hooked, pixels[:9], normalise, setup.num_registers, setup.fwd_hooks,
                                     batch_size=3)
        result = analysis.modes[mode]
        assert result.last_cls_attention.shape == (5, pm.backbone.num_patches)
        np.testing.assert_allclose(result.last_cls_attention, whole[:5], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(result.extra_cls_attention, whole[5:], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(whole.sum(axis=1), 1.0, rtol=1e-5)
