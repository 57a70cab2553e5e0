"""A run's controls where settings enter and where the run prepares them (common.app.controls):
the modes a config asks for, a control that does not apply to the model as a one-line error,
the trained registers' statistics when no detection pass gave them, the study's controls axis, and (slow)
the demo with --controls end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest

from badinput import FAST
from common.app.cli import main
from common.app.controls import control_inputs, run_modes
from common.app.grid import plan_grid
from common.app.runstate import RunState
from common.app.settings import DatasetSpec, RunOptions, resolve_config
from common.app.study import parse_args
from common.data.cache import Cache
from common.data.imagebank import ImageBank
from common.demo.fixture import fixture_images, make_planted_model
from common.runtime.distributed import Dist
from common.errors import UserError
from common.models.hooks import HookedViT
from common.registers.controls import modes_of_run
from common.registers.trained import trained_register_stats

APTOS = DatasetSpec("aptos", "APTOS 2019", qwk=True)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def controls_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The demo on the DINOv3-structured planted model (trained registers) with --controls, 2 draws."""
    base = tmp_path_factory.mktemp("controls_demo")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "test_aptos.py"), "--demo", "--model", "dinov3", "--out", str(base / "out"),
               "--cache_dir", str(base / "cache"), *FAST, "--controls", "--set", "random_draws=2"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return base / "out", result


def test_controls_flag_and_extra_modes_give_the_runs_modes():
    config = resolve_config("clip", ["random_draws=3"], {"controls": True})
    assert config["controls"] is True and config["random_draws"] == 3
    assert modes_of_run(config, trained_registers=0) == (
        "no-ttr", "ttr", "no-ttr-removed", "ttr-mean", "ttr-noise", "ttr-shuffle",
        "ttr-random-01", "ttr-random-02", "ttr-random-03")
    with_registers = modes_of_run(config, trained_registers=4)
    assert with_registers[6:10] == ("trained-zero", "trained-mean", "trained-noise", "trained-shuffle")
    named = resolve_config("dinov3", ["extra_modes=('trained-shuffle', 'ttr-noise')"])
    assert modes_of_run(named, trained_registers=4) == ("no-ttr", "ttr", "ttr-noise", "trained-shuffle")
    assert resolve_config("clip")["random_draws"] == 10 and resolve_config("clip")["controls"] is False


@pytest.mark.parametrize("item, needle", [
    ("random_draws=0", "random_draws=0: it must be at least 1"),
    ("extra_modes=('ttr-random-01',)", "'ttr-random-01' is not an extra mode; valid: no-ttr-removed, ttr-random"),
    ("controls=maybe", "--set controls='maybe': expected true or false"),
])
def test_a_bad_control_setting_is_one_line(item, needle):
    with pytest.raises(UserError) as caught:
        resolve_config("clip", [item])
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_a_control_that_does_not_apply_to_the_model_is_one_line(tmp_path, capsys):
    """clip has no trained registers: trained-zero by name stops the run before any model work."""
    code = main(APTOS, ["--demo", "--model", "clip", "--out", str(tmp_path / "out"),
                        "--set", "extra_modes=('ttr-mean', 'trained-zero')"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "trained-zero" in err and "trained registers" in err and "--controls" in err
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("item, needle", [
    ("extra_modes=('ttr-noize',)", "'ttr-noize' is not an extra mode"),
    ("random_draws=-1", "random_draws=-1"),
])
def test_an_unknown_control_on_the_command_line_exits_2(tmp_path, capsys, item, needle):
    code = main(APTOS, ["--demo", "--model", "clip", "--controls", "--out", str(tmp_path / "out"), "--set", item])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_trained_statistics_without_a_detection_pass(tmp_path):
    """Neurons from a file: the statistics come from one pass over the detection images, the
    same as computed directly; a run without a trained control (or with them from detection) skips it."""
    pm = make_planted_model("dinov3", seed=0)
    paths = []
    for i, image in enumerate(fixture_images(5, seed=2)):
        paths.append(str(tmp_path / f"{i}.png"))
        PIL.Image.fromarray(image).save(paths[-1])
    config = resolve_config("dinov3", ["batch_size=2"], demo=True)
    state = RunState(spec=APTOS, options=RunOptions("dinov3", None, tmp_path / "out"), config=config, dist=Dist(),
                     modes=("no-ttr", "ttr", "trained-mean"))
    state.backbone = pm.backbone
    with ImageBank(pm.backbone.preprocess, cache=Cache(tmp_path / "cache")) as bank:
        state.bank = bank
        inputs = control_inputs(state, lambda: paths)
        expected = trained_register_stats(HookedViT(pm.backbone), bank.batches(paths, 5))
    assert inputs.trained.images == 5 and inputs.seed == config["seed"]
    assert inputs.mlp_width == pm.backbone.mlp_width and inputs.layers == pm.backbone.num_layers
    np.testing.assert_allclose(inputs.trained.mean, expected.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(inputs.trained.std, expected.std, rtol=1e-5, atol=1e-6)
    state.modes = ("no-ttr", "ttr", "trained-zero")
    assert control_inputs(state, lambda: pytest.fail("no pass is needed")).trained is None
    state.modes = run_modes(state)
    assert state.modes == ("no-ttr", "ttr")


def test_the_study_has_a_controls_axis(tmp_path):
    (tmp_path / "aptos").mkdir()
    request = parse_args(["--data", f"aptos={tmp_path / 'aptos'}", "--out", str(tmp_path / "out"),
                          "--models", "clip", "dinov3", "--axes", "controls=off,on"])
    cells, skipped = plan_grid(request)
    assert [c.name for c in cells] == ["aptos_clip_controls-off", "aptos_clip_controls-on",
                                       "aptos_dinov3_controls-off", "aptos_dinov3_controls-on"]
    assert not skipped                                         # every model: each run takes what applies
    by_name = {c.name: c for c in cells}
    assert "--controls" in by_name["aptos_clip_controls-on"].argv
    assert "--controls" not in by_name["aptos_clip_controls-off"].argv
    assert by_name["aptos_clip_controls-off"].main and not by_name["aptos_clip_controls-on"].main
    with pytest.raises(UserError, match="controls is a grid axis"):
        parse_args(["--data", f"aptos={tmp_path / 'aptos'}", "--out", str(tmp_path / "out2"),
                    "--axes", "controls=on", "--set", "controls=true"])
    assert Path(by_name["aptos_dinov3_controls-on"].folder).name == "aptos_dinov3_controls-on"


@pytest.mark.slow
def test_demo_with_controls(controls_demo):
    """--controls on a model with trained registers: every control a row of metrics.csv scored
    against no-ttr, controls.csv, and the summary placing ttr among the random draws."""
    out, result = controls_demo
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    controls = ["no-ttr-removed", "ttr-mean", "ttr-noise", "ttr-shuffle", "trained-zero", "trained-mean",
                "trained-noise", "trained-shuffle", "ttr-random-01", "ttr-random-02"]
    assert config["modes"] == ["no-ttr", "ttr", *controls] and config["config"]["controls"] is True
    rows = pd.read_csv(out / "metrics.csv").set_index("mode")
    assert list(rows.index) == config["modes"]
    for mode in controls:
        assert np.isfinite(rows.loc[mode, "qwk_diff"]) and 0 < rows.loc[mode, "p_qwk"] <= 1
        assert rows.loc[mode, "refits"] == 0 and (out / f"predictions_{mode}.csv").is_file()
    assert rows.loc["ttr", "refits"] == 1
    table = pd.read_csv(out / "controls.csv").set_index("mode")
    assert list(table.index) == ["ttr", *controls]
    np.testing.assert_allclose(table.loc[controls, "primary_diff"], rows.loc[controls, "qwk_diff"])
    selected = {layer: set(ids) for layer, ids in config["selected_neurons"].items()}
    for mode in ("ttr-random-01", "ttr-random-02"):
        drawn = json.loads(table.loc[mode, "neurons"])
        assert {layer: len(ids) for layer, ids in drawn.items()} == {k: len(v) for k, v in selected.items()}
        assert all(not set(ids) & selected[layer] for layer, ids in drawn.items())
    shares = table["patch_share_above_threshold"]
    assert shares["ttr"] < min(shares["ttr-random-01"], shares["ttr-random-02"])     # the planted outliers go
    summary = (out / "summary.md").read_text()
    section = summary.split("## Controls", 1)[1].split("## Run", 1)[0]
    assert "percentile 0 of the draws' (median" in section and "`trained-shuffle`" in section
    assert list(pd.read_csv(out / "outliers.csv")["mode"]) == ["no-ttr", "ttr", "no-ttr-removed"]
