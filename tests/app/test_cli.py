"""The entry scripts as a user runs them: exit codes and messages on bad usage, missing weights
offline, --describe, --check_data on every layout.  The whole runs are in test_end_to_end.py."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from badinput import run_script
from common.app.cli import main
from common.app.settings import DatasetSpec
from common.data.registry import KINDS
from common.demo.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[2]
HEADLINE = ["top1", "top3", "f1_macro", "precision_macro", "recall_macro", "auc_macro", "balanced_accuracy"]
SPECS = {"pacemaker": DatasetSpec("pacemaker", "Pacemaker", manufacturer=True),
         "orthonet": DatasetSpec("orthonet", "OrthoNet"),
         "aptos": DatasetSpec("aptos", "APTOS 2019", qwk=True)}


def no_network_env(tmp_path: Path) -> dict:
    """An empty hub cache and a hub endpoint nobody listens on: the offline situation."""
    return {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
            "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}


@pytest.mark.parametrize("model, expected_file", [
    ("clip", "open_clip_pytorch_model.bin"),
    ("dinov2", "dinov2_vitl14_pretrain.pth"),
    ("dinov3", "vit_large_patch16_dinov3.lvd1689m"),
])
def test_missing_weights_offline_says_what_to_fetch(tmp_path, model, expected_file):
    """The hub is probed with a short TCP connect (no retries on a dead network): the run stops
    with one line naming the file to fetch and how to pass it."""
    images = tmp_path / "images"
    images.mkdir()
    result = run_script("test_pacemaker.py", "--model", model, "--image_path", str(images),
                        "--out", str(tmp_path / "out"), env=no_network_env(tmp_path), timeout=120)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    assert expected_file in message and "--weights" in message
    assert "Traceback" not in result.stderr


def cli(capsys, dataset: str, *argv: str) -> tuple[int, str, str]:
    """``main`` in-process: (exit code, stdout, stderr)."""
    code = main(SPECS[dataset], list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args, needle", [
    (["--model", "clip", "--image_path", "IMAGES", "--set", "top_kk=3"], "unknown config key; valid keys:"),
    (["--model", "clip", "--image_path", "IMAGES", "--set", "top_k=many"], "top_k"),
    (["--model", "clip", "--image_path", "IMAGES", "--set", "normal_values=median"], "normal_values"),
    (["--model", "clip", "--image_path", "IMAGES", "--set", "noequals"], "KEY=VALUE"),
    (["--model", "clip", "--image_path", "IMAGES", "--device", "tpu7"], "tpu7"),
    (["--model", "clip", "--image_path", "IMAGES", "--set", "detect_outliers_layer=12"], "-12..11"),
    (["--model", "dinov2", "--image_path", "IMAGES", "--set", "highest_layer=24"], "0..23"),
    (["--model", "dinov2", "--image_path", "IMAGES", "--set", "highest_layer=-1"], "0..23"),
    (["--model", "clip", "--image_path", "IMAGES", "--manifest", "IMAGES/m.csv"], "--manifest"),
    (["--model", "clip", "--image_path", "IMAGES", "--num_workers", "-1"], "num_workers"),
    (["--check_data"], "--image_path"),
    (["--check_data", "--image_path", "MISSING"], "MISSING"),
    (["--model", "resnet50", "--image_path", "IMAGES"], "timm:<name> or open_clip:<arch>:<tag>"),
    (["--model", "timm:no_such_vit", "--image_path", "IMAGES"], "no_such_vit"),
    (["--model", "open_clip:ViT-B-32", "--image_path", "IMAGES"], "open_clip:<architecture>:<pretrained tag>"),
    (["--model", "virchow2", "--image_path", "IMAGES", "--set", "highest_layer=32"], "0..31"),
    (["--model", "uni", "--image_path", "IMAGES", "--set", "model_args={'mlp_layer': 'Nope'}"], "Nope"),
    (["--model", "uni", "--image_path", "IMAGES", "--zero_shot"], "text tower"),
    (["--model", "uni", "--demo", "--set", "model_args={}"], "model_args"),
    (["--describe"], "--describe needs --model"),
])
def test_bad_usage_exits_2_with_one_line(tmp_path, capsys, args, needle):
    (tmp_path / "images").mkdir()
    missing = str(tmp_path / "nope")
    args = [a.replace("IMAGES", str(tmp_path / "images")).replace("MISSING", missing) for a in args]
    code, _, err = cli(capsys, "aptos", *args, "--out", str(tmp_path / "out"))
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle.replace("MISSING", missing) in last
    assert "Traceback" not in err


def test_describe_prints_the_configured_model(capsys):
    """``--describe`` needs no dataset; ``--set`` applies (a DINOv2 size)."""
    code, out, _ = cli(capsys, "aptos", "--model", "dinov2", "--describe", "--set", "backbone_size=vitb14_reg")
    described = json.loads(out)
    assert code == 0
    assert (described["architecture"], described["layers"], described["width"], described["mlp_width"],
            described["trained_registers"], described["image_size"]) == \
        ("vit_base_patch14_reg4_dinov2", 12, 768, 3072, 4, 224)


def test_unknown_set_key_lists_valid_keys(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    code, _, err = cli(capsys, "orthonet", "--model", "dinov2", "--image_path", str(tmp_path / "images"),
                       "--set", "hihgest_layer=3")
    assert code == 2
    assert "highest_layer" in err and "register_norm_threshold" in err


# ------------------------------------------------------------------------------------------
# --check_data: every layout as downloaded, resolved exactly as a run does

LAYOUTS = [(name, layout) for name, kind in KINDS.items() for layout in kind.synthetic.layouts]


@pytest.mark.parametrize("name, layout", LAYOUTS)
def test_check_data_reads_every_layout(tmp_path, capsys, name, layout):
    data = make_synthetic(name, tmp_path / "data", classes=3, per_class=8, image_size=24, layout=layout)
    code, out, err = cli(capsys, name, "--check_data", "--image_path", str(data), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "Layout:" in out and "splits written to" in out
    splits = pd.read_csv(tmp_path / "out" / "splits.csv")
    assert list(splits.columns) == ["path", "label", "class_name", "split"]
    assert len(splits) == 3 * 8 and set(splits["split"]) == {"train", "val", "test"}
    assert splits["class_name"].nunique() == 3
    # No model was run: nothing but splits.csv (and the run-folder marker) in the output folder.
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == ["splits.csv"]


def test_check_data_without_out_writes_where_it_says(tmp_path, capsys, monkeypatch):
    data = make_synthetic("pacemaker", tmp_path / "data", per_class=6, image_size=24)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "pacemaker", "--check_data", "--image_path", str(data))
    assert code == 0, err
    written = Path(out.strip().splitlines()[-1].removeprefix("splits written to "))
    assert written.name == "splits.csv" and (tmp_path / written).is_file()


def test_check_data_refuses_a_finished_run(tmp_path, capsys):
    data = make_synthetic("pacemaker", tmp_path / "data", per_class=6, image_size=24)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"status": "done", "dataset": "pacemaker", "model": "clip"}))
    (run / "splits.csv").write_text("their splits\n")
    code, _, err = cli(capsys, "pacemaker", "--check_data", "--image_path", str(data), "--out", str(run))
    assert code == 2 and "never overwrites" in err
    assert (run / "splits.csv").read_text() == "their splits\n"
