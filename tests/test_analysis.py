"""The analysis pass and its figures on the planted fixture (SPEC §7, §8).

The planted neurons fire on the uniform background patches that ``fixture._border_mask`` marks,
so the no-ttr norm maps carry outliers exactly there and ttr moves them onto the register."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import PIL.Image
import pytest

from common.analysis import OUTLIER_COLUMNS, analyse, analysis_paths, layer_curve_table, outlier_table, write_outputs
from common.fixture import _border_mask, fixture_images, make_planted_model
from common.plots import map_layers

FAMILIES = ("clip", "dinov2")
IMAGES = 6
FIGURE_IMAGES = 2


def _neurons(planted):
    grouped: dict[int, list[int]] = {}
    for layer, neuron in planted:
        grouped.setdefault(layer, []).append(neuron)
    return grouped


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analysis_images")
    paths = []
    for index, image in enumerate(fixture_images(IMAGES, seed=5)):
        path = folder / f"image_{index}.png"
        PIL.Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module", params=FAMILIES)
def analysed(request, image_paths):
    pm = make_planted_model(request.param, seed=0)
    analysis = analyse(
        pm.backbone, image_paths, threshold=pm.config["register_norm_threshold"],
        detect_layer=pm.config["detect_outliers_layer"], neurons=_neurons(pm.planted), num_registers=1,
        figure_images=FIGURE_IMAGES, batch_size=4, progress=False)
    return pm, analysis


def test_shapes(analysed):
    pm, analysis = analysed
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
        assert m.figure_cls_attention.shape == (FIGURE_IMAGES, backbone.num_heads, rows, cols)
    assert analysis.figure_inputs.shape[0] == FIGURE_IMAGES and analysis.figure_inputs.shape[-1] == 3
    assert 0.0 <= analysis.figure_inputs.min() and analysis.figure_inputs.max() <= 1.0
    assert analysis.intervened_layers == sorted({layer for layer, _ in pm.planted})


def test_norm_maps_differ_where_the_outliers_are_planted(analysed):
    pm, analysis = analysed
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
    pm, analysis = analysed
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


def test_written_outputs(analysed, tmp_path):
    pm, analysis = analysed
    if pm.family != "clip":
        pytest.skip("figures are drawn the same way for both families; drawn once to keep the suite fast")
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
