"""The study's grid (common.app.grid): which axis value applies where, what is skipped and why,
and the exact arguments of each cell (what a user types after ``python test_<dataset>.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.app.grid import Request, cell_name, plan_grid
from common.app.shards import my_cells, parse_shard
from common.app.study import parse_args
from common.errors import UserError


def _request(tmp_path: Path, *extra: str, data=("aptos", "orthonet")) -> Request:
    folders = []
    for name in data:
        (tmp_path / name).mkdir(exist_ok=True)
        folders.append(f"{name}={tmp_path / name}")
    return parse_args(["--data", *folders, "--out", str(tmp_path / "out"), *extra])


def test_grid_applies_each_axis_only_where_it_makes_sense(tmp_path):
    request = _request(tmp_path, "--axes", "backbone_size=vitl14,vitl14_reg", "neurons=detected,paper",
                       "top_k=10,50", data=("aptos",))
    cells, skipped = plan_grid(request)
    names = [cell.name for cell in cells]
    assert names == [
        "aptos_clip_neurons-detected_top_k-10", "aptos_clip_neurons-detected_top_k-50",
        "aptos_dinov2_backbone_size-vitl14_neurons-detected_top_k-10",
        "aptos_dinov2_backbone_size-vitl14_neurons-detected_top_k-50",
        "aptos_dinov2_backbone_size-vitl14_neurons-paper",
        "aptos_dinov2_backbone_size-vitl14_reg_neurons-detected_top_k-10",
        "aptos_dinov2_backbone_size-vitl14_reg_neurons-detected_top_k-50",
    ]
    reasons = {(s.model, s.combination): s.reason for s in skipped}
    assert "not configured by backbone_size" in reasons[("clip", "backbone_size=vitl14,vitl14_reg")]
    assert "ImageNet" in reasons[("clip", "neurons=paper")]
    assert "vitl14_reg is another model" in reasons[("dinov2", "neurons=paper, backbone_size=vitl14_reg")]
    for top_k in ("10", "50"):
        assert "aptos_dinov2_backbone_size-vitl14_neurons-paper" in reasons[("dinov2", f"neurons=paper, top_k={top_k}")]
    paper = cells[names.index("aptos_dinov2_backbone_size-vitl14_neurons-paper")]
    assert paper.argv[paper.argv.index("--neurons") + 1] == "paper"
    assert not any(a.startswith("top_k=") for a in paper.argv)


def test_cell_arguments_are_what_a_user_types(tmp_path):
    for name in ("clip.bin", "l14.pth", "l14reg.pth"):
        (tmp_path / name).write_bytes(b"x")
    request = _request(tmp_path, "--axes", "normal_values=zero,mean", "backbone_size=vitl14,vitl14_reg",
                       "--zero_shot", "--set", "probe_seeds=(0,1)", "--cache_dir", str(tmp_path / "cache"),
                       "--weights", f"clip={tmp_path / 'clip.bin'}", f"dinov2={tmp_path / 'l14.pth'}",
                       f"dinov2:vitl14_reg={tmp_path / 'l14reg.pth'}")
    cells, _ = plan_grid(request)
    assert len(cells) == 2 * (2 + 4)
    by_name = {cell.name: cell for cell in cells}
    clip = by_name["orthonet_clip_normal_values-mean"]
    assert clip.argv == ["--model", "clip", "--image_path", str((tmp_path / "orthonet").resolve()),
                         "--out", str((tmp_path / "out" / "cells" / clip.name).resolve()),
                         "--cache_dir", str((tmp_path / "cache").resolve()),
                         "--weights", str((tmp_path / "clip.bin").resolve()), "--zero_shot",
                         "--set", "probe_seeds=(0,1)", "--set", "normal_values=mean"]
    assert clip.command().startswith("python test_orthonet.py --model clip")
    plain = by_name["aptos_dinov2_normal_values-zero_backbone_size-vitl14"]
    registers = by_name["aptos_dinov2_normal_values-zero_backbone_size-vitl14_reg"]
    assert plain.argv[plain.argv.index("--weights") + 1].endswith("l14.pth")
    assert registers.argv[registers.argv.index("--weights") + 1].endswith("l14reg.pth")
    assert "--zero_shot" not in plain.argv            # no text tower
    assert "--demo" not in plain.argv


def test_demo_grid(tmp_path):
    request = parse_args(["--demo", "--out", str(tmp_path / "out")])
    cells, skipped = plan_grid(request)
    assert len(cells) == 3 * 2 * 2 and not skipped
    assert {cell.settings["normal_values"] for cell in cells} == {"zero", "mean"}
    for cell in cells:
        assert "--demo" in cell.argv
        data = (tmp_path / "out" / "data" / cell.dataset).resolve()
        assert cell.argv[cell.argv.index("--image_path") + 1] == str(data)
        assert ("--zero_shot" in cell.argv) == (cell.model == "clip")
    # the planted models have one size and no published neurons: listed, not run
    request = parse_args(["--demo", "--out", str(tmp_path / "out"), "--models", "dinov2", "--data", "aptos",
                                "--axes", "backbone_size=vitl14,vitl14_reg", "neurons=detected,paper"])
    cells, skipped = plan_grid(request)
    assert [cell.name for cell in cells] == ["aptos_dinov2_neurons-detected"]
    assert {s.combination for s in skipped} == {"backbone_size=vitl14,vitl14_reg", "neurons=paper"}


def test_cell_name():
    assert cell_name("aptos", "dinov2", {}) == "aptos_dinov2"
    assert cell_name("aptos", "dinov2", {"backbone_size": "vitl14_reg", "top_k": "20"}) == \
        "aptos_dinov2_backbone_size-vitl14_reg_top_k-20"


def test_weights_serve_their_size_only(tmp_path):
    """``MODEL=PATH`` serves the configured size only: a ViT-L/14 checkpoint cannot serve a
    vitl14_reg cell, which then runs without --weights (and would fetch its own)."""
    (tmp_path / "l14.pth").write_bytes(b"x")
    request = _request(tmp_path, "--models", "dinov2", "--axes", "backbone_size=vitl14,vitl14_reg",
                       "--weights", f"dinov2={tmp_path / 'l14.pth'}", data=("aptos",))
    cells = {cell.settings["backbone_size"]: cell for cell in plan_grid(request)[0]}
    assert cells["vitl14"].argv[cells["vitl14"].argv.index("--weights") + 1] == str((tmp_path / "l14.pth").resolve())
    assert "--weights" not in cells["vitl14_reg"].argv


def test_the_presets_and_any_timm_model_are_study_models(tmp_path):
    """Every preset (and a timm:<name> model) is a model of the grid; axes apply by config and
    identity: backbone_size only to models configured by size, each value only to its own family,
    neurons=paper only to DINOv2 ViT-L/14, highest_layer only within the model's depth."""
    request = _request(tmp_path, "--models", "dinov2", "dinov3", "biomedclip", "rad-dino", "uni", "virchow2",
                       "timm:vit_small_patch16_224", "--axes", "backbone_size=vitl14,vitl16",
                       "neurons=detected,paper", "highest_layer=5,25", data=("aptos",))
    cells, skipped = plan_grid(request)
    names = [cell.name for cell in cells]
    assert names == [
        "aptos_dinov2_backbone_size-vitl14_neurons-detected_highest_layer-5",
        "aptos_dinov2_backbone_size-vitl14_neurons-paper_highest_layer-5",
        "aptos_dinov3_backbone_size-vitl16_neurons-detected_highest_layer-5",
        "aptos_biomedclip_neurons-detected_highest_layer-5",
        "aptos_rad-dino_neurons-detected_highest_layer-5",
        "aptos_uni_neurons-detected_highest_layer-5",
        "aptos_virchow2_neurons-detected_highest_layer-5",
        "aptos_virchow2_neurons-detected_highest_layer-25",     # 32 blocks: 25 is within its depth
        "aptos_timm-vit_small_patch16_224_neurons-detected_highest_layer-5",
    ]
    reasons = {(s.model, s.combination): s.reason for s in skipped}
    assert "not a size of dinov2" in reasons[("dinov2", "backbone_size=vitl16")]
    assert "not a size of dinov3" in reasons[("dinov3", "backbone_size=vitl14")]
    assert "not configured by backbone_size" in reasons[("uni", "backbone_size=vitl14,vitl16")]
    assert "uni has 24 layers (highest_layer 0..23)" == reasons[("uni", "highest_layer=25")]
    assert "rad-dino has 12 layers" in reasons[("rad-dino", "highest_layer=25")]
    for model in ("biomedclip", "rad-dino", "uni", "virchow2", "timm:vit_small_patch16_224"):
        assert "another model" in reasons[(model, "neurons=paper")], model
    by_name = {cell.name: cell for cell in cells}
    virchow = by_name["aptos_virchow2_neurons-detected_highest_layer-25"]
    assert virchow.argv[:2] == ["--model", "virchow2"] and "highest_layer=25" in virchow.argv
    timm_cell = by_name["aptos_timm-vit_small_patch16_224_neurons-detected_highest_layer-5"]
    assert timm_cell.argv[:2] == ["--model", "timm:vit_small_patch16_224"]
    assert timm_cell.folder.endswith("cells/aptos_timm-vit_small_patch16_224_neurons-detected_highest_layer-5")


def test_zero_shot_goes_to_models_with_a_text_tower(tmp_path):
    request = _request(tmp_path, "--models", "clip", "biomedclip", "uni", "--zero_shot", data=("aptos",))
    with_prompts = {cell.model for cell in plan_grid(request)[0] if "--zero_shot" in cell.argv}
    assert with_prompts == {"clip", "biomedclip"}


def test_weights_of_models_named_with_colons(tmp_path):
    (tmp_path / "vit.bin").write_bytes(b"x")
    request = _request(tmp_path, "--models", "timm:vit_small_patch16_224", "--weights",
                       f"timm:vit_small_patch16_224={tmp_path / 'vit.bin'}", data=("aptos",))
    cell = plan_grid(request)[0][0]
    assert cell.argv[cell.argv.index("--weights") + 1] == str((tmp_path / "vit.bin").resolve())
    with pytest.raises(UserError, match="uni is not among --models"):
        _request(tmp_path, "--models", "clip", "--weights", f"uni={tmp_path / 'vit.bin'}", data=("aptos",))


def test_demo_highest_layer_axis_checks_the_planted_depth(tmp_path):
    request = parse_args(["--demo", "--out", str(tmp_path / "out"), "--data", "aptos", "--models", "virchow2",
                          "--axes", "highest_layer=2,6"])
    cells, skipped = plan_grid(request)
    assert [cell.name for cell in cells] == ["aptos_virchow2_highest_layer-2"]
    assert [(s.combination, s.reason) for s in skipped] == \
        [("highest_layer=6", "virchow2 has 6 layers (highest_layer 0..5)")]


def test_shards_are_disjoint_slices_covering_the_grid(tmp_path):
    request = _request(tmp_path, "--axes", "normal_values=zero,mean,same", "top_k=10,20")
    cells, _ = plan_grid(request)
    assert len(cells) == 2 * 2 * 3 * 2
    for count in (1, 2, 5, 24, 30):
        slices = [my_cells(cells, (index, count)) for index in range(1, count + 1)]
        names = [cell.name for part in slices for cell in part]
        assert sorted(names) == sorted(cell.name for cell in cells) and len(set(names)) == len(names)
        assert max(map(len, slices)) - min(map(len, slices)) <= 1          # balanced
    assert parse_shard("3/8") == (3, 8)
    for bad in ("0/4", "5/4", "2", "a/b", "2/0", "-1/3"):
        with pytest.raises(UserError, match="SLURM_ARRAY_TASK_ID"):
            parse_shard(bad)


def test_main_cells_are_the_axes_at_their_main_values(tmp_path):
    """A main cell has every axis at the configured value where the grid lists it (neurons:
    detected), else at the first value given; the study's Holm family is their primary metric."""
    request = _request(tmp_path, "--axes", "normal_values=mean,zero", "top_k=7,9", "backbone_size=vitl14,vitl14_reg",
                       data=("aptos",))
    cells, _ = plan_grid(request)
    main = [cell.name for cell in cells if cell.main]
    # normal_values: configured zero (listed second); top_k: the configured 20 / 50 are not listed -> 7;
    # backbone_size: configured vitl14 (dinov2 only)
    assert main == ["aptos_clip_normal_values-zero_top_k-7", "aptos_dinov2_normal_values-zero_top_k-7_backbone_size-vitl14"]
    assert len(cells) == 12
    assert all(cell.main for cell in plan_grid(_request(tmp_path))[0])   # no axes: every cell is a main cell
