"""The entry scripts as a user runs them: exit codes, messages, files written, the cache, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


# `make demo` runs with the full defaults; here the statistics and figures are trimmed (one probe
# seed, fewer resamples, one figure image) so that six end-to-end runs fit the suite's budget.
FAST = ["--set", "probe_seeds=(0,)", "--set", "bootstrap_resamples=200", "--set", "figure_images=1",
        "--set", "analysis_images=16"]


# The end-to-end runs are independent processes: two at a time, one thread each, they finish in
# about half the time of one after the other on a 2-core machine.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _demo(base: Path, script: str, model: str):
    out = base / f"{Path(script).stem}_{model}"
    result = run_script(script, "--demo", "--model", model, "--out", str(out),
                        "--cache_dir", str(base / f"cache_{Path(script).stem}_{model}"), *FAST,
                        env=SINGLE_THREAD)
    return out, result


def _cache_sequence(base: Path) -> dict:
    """The same demo again, then with another top_k, another backbone, and --no_cache."""
    out, cache = base / "cached", base / "cache_shared"
    common = ["--demo", "--out", str(out), "--cache_dir", str(cache), *FAST]
    steps: dict = {}
    for name, extra in (("first", ["--model", "clip"]), ("again", ["--model", "clip"]),
                        ("fewer", ["--model", "clip", "--set", "top_k=2"]),
                        ("other", ["--model", "dinov2"]), ("ignored", ["--model", "clip", "--no_cache"])):
        result = run_script("test_orthonet.py", *extra, *common, env=SINGLE_THREAD)
        steps[name] = result
        if result.returncode == 0:
            steps[f"{name}_metrics"] = pd.read_csv(out / "metrics.csv")
            steps[f"{name}_config"] = json.loads((out / "config.json").read_text())
    steps["cache_dir"] = cache
    return steps


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("end_to_end")
    with ThreadPoolExecutor(max_workers=2) as pool:
        cache_job = pool.submit(_cache_sequence, base)
        demo_jobs = {case: pool.submit(_demo, base, *case) for case in DEMO_CASES}
        runs = {case: job.result() for case, job in demo_jobs.items()}
        runs["cache"] = cache_job.result()
    return runs


@pytest.mark.parametrize("script, model", DEMO_CASES)
def test_demo_runs_end_to_end(end_to_end, script, model):
    out, result = end_to_end[(script, model)]
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.json", "register_neurons.json", "splits.csv", "metrics.csv",
                 "predictions_no-ttr.csv", "predictions_ttr.csv", "summary.md", "outliers.csv"):
        assert (out / name).is_file(), name
    assert list((out / "figures").glob("*.png"))
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


def test_feature_cache_reuse_and_invalidation(end_to_end):
    steps = end_to_end["cache"]
    for name in ("first", "again", "fewer", "other", "ignored"):
        assert steps[name].returncode == 0, (name, steps[name].stderr[-2000:])
    assert _reused(steps["first"].stdout) == (0, 6)

    assert _reused(steps["again"].stdout) == (6, 6)
    assert "extraction skipped" in steps["again"].stderr
    # Same inputs, same seeds: the same numbers.
    pd.testing.assert_frame_equal(steps["first_metrics"], steps["again_metrics"])

    # A different neuron selection changes only the ttr features.
    assert _reused(steps["fewer"].stdout) == (3, 6)
    hits = steps["fewer_config"]["feature_cache_hits"]
    assert all(hits[f"no-ttr/{s}"] == 1 and hits[f"ttr/{s}"] == 0 for s in ("train", "val", "test"))

    # Another backbone shares nothing.
    assert _reused(steps["other"].stdout) == (0, 6)

    # --no_cache ignores what is there.
    assert _reused(steps["ignored"].stdout)[0] == 0
    assert not list(steps["cache_dir"].glob(".features-*"))  # no temporary files left behind
