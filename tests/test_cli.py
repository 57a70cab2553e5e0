"""The entry scripts as a user runs them: exit codes, messages, files written, the cache, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC_METRICS = ["top1", "top3", "f1_macro", "precision_macro", "recall_macro", "auc_macro", "balanced_accuracy"]


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def no_network_env(tmp_path: Path) -> dict:
    """An empty hub cache and a hub endpoint nobody listens on: the offline situation."""
    return {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
            "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}


@pytest.mark.parametrize("model, expected_file", [
    ("clip", "open_clip_pytorch_model.bin"),
    ("dinov2", "dinov2_vitl14_pretrain.pth"),
])
def test_missing_weights_offline_fail_fast_with_what_to_fetch(tmp_path, model, expected_file):
    images = tmp_path / "images"
    images.mkdir()
    started = time.monotonic()
    result = run_script("test_pacemaker.py", "--model", model, "--image_path", str(images),
                        "--out", str(tmp_path / "out"), env=no_network_env(tmp_path), timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert elapsed < 15, f"took {elapsed:.1f}s"
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    assert expected_file in message and "--weights" in message
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, needle", [
    (["--model", "vit"], "invalid choice"),
    (["--model", "clip", "--image_path", "IMAGES", "--set", "top_kk=3"], "unknown config key; valid keys:"),
    (["--model", "clip", "--image_path", "IMAGES", "--set", "top_k=many"], "top_k"),
    (["--model", "clip", "--image_path", "IMAGES", "--set", "normal_values=median"], "normal_values"),
    (["--model", "clip", "--image_path", "IMAGES", "--set", "noequals"], "KEY=VALUE"),
    (["--model", "clip", "--image_path", "IMAGES", "--device", "cuda"], "cuda"),
    (["--model", "clip", "--image_path", "IMAGES", "--device", "tpu7"], "tpu7"),
    (["--model", "clip"], "--image_path"),
    (["--check_data"], "--image_path"),
    (["--check_data", "--image_path", "MISSING"], "MISSING"),
])
def test_bad_usage_exits_2_with_one_line(tmp_path, args, needle):
    (tmp_path / "images").mkdir()
    missing = str(tmp_path / "nope")
    args = [a.replace("IMAGES", str(tmp_path / "images")).replace("MISSING", missing) for a in args]
    result = run_script("test_aptos.py", *args, "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert needle.replace("MISSING", missing) in last
    assert "Traceback" not in result.stderr


def test_unknown_set_key_lists_valid_keys(tmp_path):
    (tmp_path / "images").mkdir()
    result = run_script("test_orthonet.py", "--model", "dinov2", "--image_path", str(tmp_path / "images"),
                        "--set", "hihgest_layer=3", timeout=120)
    assert result.returncode == 2
    assert "highest_layer" in result.stderr and "register_norm_threshold" in result.stderr


def test_check_data_reports_and_writes_splits_without_a_model(tmp_path):
    from common.synthetic import make_synthetic

    data = make_synthetic("pacemaker", tmp_path / "data", per_class=10, image_size=32)
    result = run_script("test_pacemaker.py", "--check_data", "--model", "clip", "--image_path", str(data),
                        "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Train" in result.stdout or "train" in result.stdout
    splits = pd.read_csv(tmp_path / "out" / "splits.csv")
    assert set(splits["split"]) == {"train", "val", "test"}
    assert list(splits.columns) == ["path", "label", "class_name", "split"]
    # No model was run: nothing but splits.csv in the output folder.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["splits.csv"]


# ------------------------------------------------------------------------------------------
# The demo end to end, for every script and both families.

DEMO_CASES = [(script, model) for script in ("test_pacemaker.py", "test_orthonet.py", "test_aptos.py")
              for model in ("clip", "dinov2")]
CHANCE = {"test_pacemaker.py": 1 / 4, "test_orthonet.py": 1 / 4, "test_aptos.py": 1 / 5}


@pytest.mark.parametrize("script, model", DEMO_CASES)
def test_demo_runs_end_to_end(tmp_path, script, model):
    out = tmp_path / "run"
    result = run_script(script, "--demo", "--model", model, "--out", str(out),
                        "--cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.json", "register_neurons.json", "splits.csv", "metrics.csv",
                 "predictions_no-ttr.csv", "predictions_ttr.csv", "summary.md"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["demo"] is True
    planted = {tuple(pair) for pair in config["planted"]}
    assert planted
    ranked = json.loads((out / "register_neurons.json").read_text())["ranked"]
    assert {(layer, neuron) for layer, neuron, _ in ranked[:len(planted)]} == planted
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["mode"]) == ["no-ttr", "ttr"]
    for name in SPEC_METRICS:
        assert {name, f"{name}_lo", f"{name}_hi"} <= set(metrics.columns)
    assert (metrics["top1"] >= 2 * CHANCE[script]).all(), metrics["top1"].tolist()
    extra = {"test_aptos.py": "qwk", "test_pacemaker.py": "manufacturer_top1"}.get(script)
    if extra:
        assert extra in metrics.columns
    ttr = metrics.set_index("mode").loc["ttr"]
    assert 0.0 <= ttr["p_mcnemar_top1"] <= 1.0 and 0.0 <= ttr["p_bootstrap_f1_macro"] <= 1.0
    summary = (out / "summary.md").read_text()
    assert "synthetic" in summary.lower() and "planted" in summary.lower()
    predictions = pd.read_csv(out / "predictions_ttr.csv")
    splits = pd.read_csv(out / "splits.csv")
    assert len(predictions) == int((splits["split"] == "test").sum())


def _reused(stdout: str) -> tuple[int, int]:
    line = next(l for l in stdout.splitlines() if l.startswith("feature cache:"))
    words = line.split()
    return int(words[2]), int(words[4])


def test_feature_cache_reuse_and_invalidation(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--demo", "--out", str(out), "--cache_dir", str(cache), "--set", "probe_seeds=(0,)",
              "--set", "bootstrap_resamples=50"]
    first = run_script("test_orthonet.py", "--model", "clip", *common)
    assert first.returncode == 0, first.stderr[-2000:]
    assert _reused(first.stdout) == (0, 6)
    metrics_first = pd.read_csv(out / "metrics.csv")

    again = run_script("test_orthonet.py", "--model", "clip", *common)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _reused(again.stdout) == (6, 6)
    assert "extraction skipped" in again.stderr
    # Same inputs, same seeds: the same numbers.
    pd.testing.assert_frame_equal(metrics_first, pd.read_csv(out / "metrics.csv"))

    # A different neuron selection changes only the ttr features.
    fewer = run_script("test_orthonet.py", "--model", "clip", *common, "--set", "top_k=2")
    assert fewer.returncode == 0, fewer.stderr[-2000:]
    assert _reused(fewer.stdout) == (3, 6)
    hits = json.loads((out / "config.json").read_text())["feature_cache_hits"]
    assert all(hits[f"no-ttr/{s}"] == 1 and hits[f"ttr/{s}"] == 0 for s in ("train", "val", "test"))

    # Another backbone shares nothing.
    other = run_script("test_orthonet.py", "--model", "dinov2", *common)
    assert other.returncode == 0, other.stderr[-2000:]
    assert _reused(other.stdout) == (0, 6)

    # --no_cache ignores what is there.
    ignored = run_script("test_orthonet.py", "--model", "clip", *common, "--no_cache")
    assert ignored.returncode == 0
    assert _reused(ignored.stdout)[0] == 0
    assert not list(cache.glob(".features-*"))  # no temporary files left behind
