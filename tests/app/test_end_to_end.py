"""The entry scripts end to end, as a user runs them: the demo of every script and family, the
cache, the course project's artifacts, the extra modes, torchrun, kill, interrupt and resume.

Marked ``slow`` (``pytest -m "not slow"`` skips them); ``make test`` runs everything."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import configs
from badinput import FAST, run_main, run_script
from common.demo.fixture import IMAGE_SIZE, PATCH_SIZE
from common.demo.synthetic import make_synthetic
from common.io import read_checked_npz

ROOT = Path(__file__).resolve().parents[2]
HEADLINE = ["top1", "top3", "f1_macro", "precision_macro", "recall_macro", "auc_macro", "balanced_accuracy"]


# ------------------------------------------------------------------------------------------
# End to end (slow): the demo for every script and family, the cache, the course artifacts,
# the extra modes, torchrun, interrupt and resume.

# Every script, and every family: open_clip's own ViT and its timm trunk (BiomedCLIP), timm's DINOv2,
# DINOv3 with trained registers, a SwiGLU ViT with registers (Virchow2).  Each script also runs with
# CLIP below: test_orthonet.py in the cache sequence, test_aptos.py in the course artifacts.
DEMO_CASES = [("test_pacemaker.py", "clip"), ("test_pacemaker.py", "dinov3"), ("test_orthonet.py", "dinov2"),
              ("test_orthonet.py", "biomedclip"), ("test_aptos.py", "dinov2"), ("test_aptos.py", "virchow2")]
CHANCE = {"test_pacemaker.py": 1 / 4, "test_orthonet.py": 1 / 4, "test_aptos.py": 1 / 5}
# The end-to-end runs are independent processes: two at a time, one thread each.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _demo(base: Path, script: str, model: str, *extra: str, name: str | None = None):
    out = base / (name or f"{Path(script).stem}_{model}")
    result = run_script(script, "--demo", "--model", model, "--out", str(out),
                        "--cache_dir", str(base / f"cache_{out.name}"), *FAST, *extra, env=SINGLE_THREAD)
    return out, result


def _cache_sequence(base: Path) -> dict:
    """The same demo again, then with another top_k, another backbone, and --no_cache: one data
    folder and one cache, a run folder each."""
    data = make_synthetic("orthonet", base / "cache_data", per_class=40, image_size=64)
    cache = base / "cache_shared"
    common = ["--demo", "--image_path", str(data), "--cache_dir", str(cache), *FAST]
    steps: dict = {}
    for name, extra in (("first", ["--model", "clip"]), ("again", ["--model", "clip"]),
                        ("fewer", ["--model", "clip", "--set", "top_k=2"]),
                        ("other", ["--model", "dinov2"]), ("ignored", ["--model", "clip", "--no_cache"])):
        out = base / f"cached_{name}"
        result = run_script("test_orthonet.py", *extra, *common, "--out", str(out), env=SINGLE_THREAD)
        steps[name] = result
        if result.returncode == 0:
            steps[f"{name}_metrics"] = pd.read_csv(out / "metrics.csv")
            steps[f"{name}_config"] = json.loads((out / "config.json").read_text())
            steps[f"{name}_outliers"] = pd.read_csv(out / "outliers.csv")
    steps["cache_dir"] = cache
    return steps


def _course_artifacts(base: Path) -> dict:
    """A demo run, then course-format artifacts made from it (a .pt ranking, saved probes) fed back."""
    first_out, first = _demo(base, "test_aptos.py", "clip", name="course_source")
    if first.returncode != 0:
        return {"first": first}
    ranked = [tuple(entry) for entry in json.loads((first_out / "register_neurons.json").read_text())["ranked"]]
    course = base / "Trained_Models" / "aptos_clip"
    course.mkdir(parents=True)
    torch.save([(int(l), int(n), float(s)) for l, n, s in ranked], course / "register_neurons.pt")
    generator = torch.Generator().manual_seed(0)
    for name in ("best_model_no_ttr.pth", "best_model_ttr.pth"):
        torch.save({"fc.weight": torch.randn(5, 32, generator=generator), "fc.bias": torch.randn(5, generator=generator)},
                   course / name)
    data = first_out / "synthetic_data"
    out, result = _demo(base, "test_aptos.py", "clip", "--image_path", str(data),
                        "--neurons", str(course / "register_neurons.pt"), "--reference_probes", str(course),
                        name="course_run")
    torch.save({"fc.weight": torch.zeros(5, 7), "fc.bias": torch.zeros(5)}, base / "bad_probe.pth")
    wrong = base / "wrong_probes"
    wrong.mkdir()
    for name in ("best_model_no_ttr.pth", "best_model_ttr.pth"):
        shutil.copy(base / "bad_probe.pth", wrong / name)
    _, shape_error = _demo(base, "test_aptos.py", "clip", "--image_path", str(data), "--reference_probes",
                           str(wrong), name="course_wrong")
    return {"first": first, "first_out": first_out, "course": course, "out": out, "result": result,
            "shape_error": shape_error}


def _torchrun(base: Path) -> dict:
    """The same demo data, one process and two gloo ranks."""
    data = make_synthetic("orthonet", base / "torchrun_data", per_class=20, image_size=64)
    runs = {}
    for name, launcher in (("single", None), ("ranks", [sys.executable, "-m", "torch.distributed.run",
                                                       "--nproc_per_node=2", "--master_port=29533"])):
        out = base / f"torchrun_{name}"
        runs[name] = (out, run_script("test_orthonet.py", "--demo", "--model", "dinov2", "--image_path", str(data),
                                      "--out", str(out), "--cache_dir", str(base / f"cache_torchrun_{name}"),
                                      *FAST, env=SINGLE_THREAD, launcher=launcher))
    return runs


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("end_to_end")
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {"cache": pool.submit(_cache_sequence, base), "course": pool.submit(_course_artifacts, base),
                "torchrun": pool.submit(_torchrun, base),
                "extra": pool.submit(_demo, base, "test_pacemaker.py", "clip", "--set",
                                     "extra_modes=('no-ttr-removed',)", "--set", "intervention_max=neuron",
                                     name="extra_modes")}
        jobs.update({case: pool.submit(_demo, base, *case) for case in DEMO_CASES})
        return {key: job.result() for key, job in jobs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("script, model", DEMO_CASES)
def test_demo_runs_end_to_end(end_to_end, script, model):
    out, result = end_to_end[(script, model)]
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.json", "register_neurons.json", "splits.csv", "metrics.csv",
                 "predictions_no-ttr.csv", "predictions_ttr.csv", "summary.md", "outliers.csv"):
        assert (out / name).is_file(), name
    assert list((out / "figures").glob("*.png"))
    config = json.loads((out / "config.json").read_text())
    assert config["demo"] is True and config["status"] == "done" and config["model"] == model
    assert config["command_line"][0].endswith(script) and "--demo" in config["command_line"]
    assert config["precision"] == "fp32" and config["config"]["precision"] == "auto"
    planted = {tuple(pair) for pair in config["planted"]}
    assert planted
    neurons = json.loads((out / "register_neurons.json").read_text())
    assert {(layer, neuron) for layer, neuron, _ in neurons["ranked"][:len(planted)]} == planted
    assert neurons["model"]["family"] == configs.PRESETS[model][0] and neurons["above_highest_layer"]["count"] == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["mode"]) == ["no-ttr", "ttr"]
    extra = {"test_aptos.py": "qwk", "test_pacemaker.py": "manufacturer_top1"}.get(script)
    names = HEADLINE + ([extra] if extra else [])
    for name in names:
        assert {name, f"{name}_lo", f"{name}_hi", f"{name}_seed_sd", f"{name}_diff", f"{name}_diff_lo",
                f"{name}_diff_hi", f"p_{name}"} <= set(metrics.columns)
    assert (metrics["top1"] >= 2 * CHANCE[script]).all(), metrics["top1"].tolist()
    ttr = metrics.set_index("mode").loc["ttr"]
    assert 0.0 <= ttr["p_top1"] <= 1.0 and 0.0 < ttr["p_f1_macro"] <= 1.0
    assert (metrics["schema_version"] == 2).all() and config["schema_version"] == 2
    primary = "qwk" if script == "test_aptos.py" else "top1"
    assert config["config"]["primary_metric"] == primary and np.isfinite(ttr[f"mde_{primary}"])
    assert ttr["refits"] == 1 and np.isfinite(ttr[f"{primary}_diff_lo_refit"])
    assert ttr["top1_discordant_ttr_better"] + ttr["top1_discordant_ttr_worse"] <= ttr["changed_predictions"]
    # one prediction per mode: the predictions file scores the table's top-1
    predictions = pd.read_csv(out / "predictions_ttr.csv")
    splits = pd.read_csv(out / "splits.csv")
    assert len(predictions) == int((splits["split"] == "test").sum())
    assert (predictions["true"] == predictions["predicted"]).mean() == pytest.approx(ttr["top1"])
    summary = (out / "summary.md").read_text()
    assert "synthetic" in summary.lower() and "planted" in summary.lower()
    answer = summary.split("## The answer", 1)[1].split("## Results", 1)[0]
    label = "Quadratic weighted kappa" if primary == "qwk" else "Top-1 accuracy"
    verdict = next(line for line in answer.splitlines() if line.strip())
    assert verdict.startswith(f"**{label} (primary metric): ") and "probe refits" in verdict
    assert "Secondary metrics (exploratory" in answer
    # the terminal ends with where the summary is, then the same verdict, marked as the demo's
    last = result.stdout.strip().splitlines()[-2:]
    assert last[0] == f"done: {out / 'summary.md'}"
    assert last[1] == "answer (demo: synthetic data, planted model): " + verdict.strip("*")
    assert summary.index("## The answer") < summary.index("## Results")
    # the planted outliers are attention sinks: ttr moves CLS attention onto the register
    outliers = pd.read_csv(out / "outliers.csv").set_index("mode")
    patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    assert outliers.loc["ttr", "cls_attention_entropy"] > outliers.loc["no-ttr", "cls_attention_entropy"] + 0.3
    assert outliers.loc["ttr", "cls_attention_on_register"] > 10 / (patches + 2)
    assert outliers.loc["no-ttr", "patch_share_above_threshold"] > 0.1
    assert outliers.loc["ttr", "patch_share_above_threshold"] == 0.0
    # attention localization on the synthetic images' object masks (docs/localization.md): every test
    # image, both modes, the documented columns; the planted sinks sit off the object, ttr raises the
    # attention's share inside the mask
    located = pd.read_csv(out / "localization.csv")
    assert list(located.columns) == ["path", "mode", "energy_in_mask", "pointing_hit", "iou", "intersection",
                                     "union", "mask_share"]
    assert sorted(located["mode"].unique()) == ["no-ttr", "ttr"]
    assert len(located) == 2 * int((splits["split"] == "test").sum())
    energy = located.groupby("mode")["energy_in_mask"].mean()
    assert energy["ttr"] > energy["no-ttr"] + 0.1, energy.to_dict()
    assert "## Attention localization" in summary and (out / "figures" / "localization.png").is_file()
    # each image decoded once
    assert config["images_decoded"] == len(splits)


def _reused(stdout: str) -> tuple[int, int]:
    line = next(l for l in stdout.splitlines() if l.startswith("feature cache:"))
    words = line.split()
    return int(words[2]), int(words[4])


@pytest.mark.slow
def test_cache_reuse_and_invalidation(end_to_end):
    steps = end_to_end["cache"]
    for name in ("first", "again", "fewer", "other", "ignored"):
        assert steps[name].returncode == 0, (name, steps[name].stderr[-2000:])
    assert _reused(steps["first"].stdout) == (0, 6)
    images = steps["first_config"]["images_decoded"]
    assert images > 0

    # the same inputs: nothing recomputed, nothing decoded, the same numbers
    assert _reused(steps["again"].stdout) == (6, 6)
    assert "extraction skipped" in steps["again"].stderr and "detection: from the cache" in steps["again"].stderr
    assert "from the cache" in steps["again"].stderr.split("figures and outlier statistics", 1)[1]
    assert steps["again_config"]["images_decoded"] == 0
    pd.testing.assert_frame_equal(steps["first_metrics"], steps["again_metrics"])
    pd.testing.assert_frame_equal(steps["first_outliers"], steps["again_outliers"])

    # new ttr settings: only the ttr features change, and no image is decoded again
    assert _reused(steps["fewer"].stdout) == (3, 6)
    hits = steps["fewer_config"]["feature_cache_hits"]
    assert all(hits[f"no-ttr/{s}"] == 1 and hits[f"ttr/{s}"] == 0 for s in ("train", "val", "test"))
    assert steps["fewer_config"]["images_decoded"] == 0

    # another backbone shares the decoded images only if it preprocesses alike (it does not here)
    assert _reused(steps["other"].stdout) == (0, 6)

    # --no_cache ignores what is there
    assert _reused(steps["ignored"].stdout)[0] == 0
    assert steps["ignored_config"]["images_decoded"] == images
    assert not [p for p in steps["cache_dir"].rglob("*") if p.name.endswith(".tmp")]  # nothing half-written


@pytest.mark.slow
def test_course_artifacts_are_inputs(end_to_end):
    course = end_to_end["course"]
    assert course["first"].returncode == 0, course["first"].stderr[-2000:]
    assert course["result"].returncode == 0, course["result"].stderr[-2000:]
    out = course["out"]
    neurons = json.loads((out / "register_neurons.json").read_text())
    assert neurons["source"] == f"file:{course['course'] / 'register_neurons.pt'}"
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["mode"]) == ["no-ttr", "ttr", "no-ttr (course probe)", "ttr (course probe)"]
    rows = metrics.set_index("mode")
    assert not np.isnan(rows.loc["ttr (course probe)", "top1_diff"])
    assert np.isnan(rows.loc["no-ttr (course probe)", "top1_diff"])
    assert "course project's saved probes" in (out / "summary.md").read_text()
    # a probe of the wrong width: exit 2 naming both shapes
    wrong = course["shape_error"]
    assert wrong.returncode == 2, wrong.stderr[-1000:]
    line = wrong.stderr.strip().splitlines()[-1]
    assert "[5, 7]" in line and "32" in line and "Traceback" not in wrong.stderr
    assert "extract features" not in wrong.stderr           # refused before any extraction


@pytest.mark.slow
def test_extra_modes_and_per_neuron_max(end_to_end):
    out, result = end_to_end["extra"]
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["mode"]) == ["no-ttr", "ttr", "no-ttr-removed"]
    assert not np.isnan(metrics.set_index("mode").loc["no-ttr-removed", "top1_diff"])
    outliers = pd.read_csv(out / "outliers.csv").set_index("mode")
    assert np.isnan(outliers.loc["no-ttr-removed", "register_norm"])          # R = 0: no register
    assert outliers.loc["no-ttr-removed", "patch_share_above_threshold"] == 0.0  # the outliers are gone
    config = json.loads((out / "config.json").read_text())
    assert config["modes"] == ["no-ttr", "ttr", "no-ttr-removed"] and config["config"]["intervention_max"] == "neuron"
    assert (out / "predictions_no-ttr-removed.csv").is_file()


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(end_to_end):
    runs = end_to_end["torchrun"]
    (single, one), (ranked, two) = runs["single"], runs["ranks"]
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((ranked / "config.json").read_text())["processes"] == 2
    for name in ("metrics.csv", "splits.csv", "predictions_ttr.csv", "predictions_no-ttr.csv", "outliers.csv"):
        assert (single / name).read_bytes() == (ranked / name).read_bytes(), name
    a = json.loads((single / "register_neurons.json").read_text())
    b = json.loads((ranked / "register_neurons.json").read_text())
    assert [entry[:2] for entry in a["ranked"]] == [entry[:2] for entry in b["ranked"]]
    np.testing.assert_allclose([e[2] for e in a["ranked"]], [e[2] for e in b["ranked"]], rtol=1e-12, atol=1e-12)
    assert a["selected"] == b["selected"]
    # the features themselves: the same cache entries, bit for bit
    base = single.parent
    files = {p.relative_to(base / "cache_torchrun_single"): p for p in (base / "cache_torchrun_single" / "features").rglob("*.npz")}
    assert len(files) == 6
    for relative, path in files.items():
        key = path.stem
        mine = read_checked_npz(path, key)
        theirs = read_checked_npz(base / "cache_torchrun_ranks" / relative, key)
        assert theirs is not None and all(np.array_equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.slow
def test_killed_mid_extraction_resumes(tmp_path):
    """SIGKILL once the first feature set is on disk: nothing half-written is left for a re-run to
    trust, the re-run reuses the complete sets and gives the numbers of an uninterrupted run."""
    data = make_synthetic("pacemaker", tmp_path / "data", per_class=60, image_size=64)
    cache = tmp_path / "cache"
    args = ["--demo", "--model", "clip", "--image_path", str(data), "--cache_dir", str(cache), *FAST,
            "--set", "batch_size=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **SINGLE_THREAD}
    process = subprocess.Popen([sys.executable, str(ROOT / "test_pacemaker.py"), *args, "--out", str(tmp_path / "a")],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and not list((cache / "features").rglob("*.npz")):
            time.sleep(0.01)
        process.send_signal(signal.SIGSTOP)
        complete = len(list((cache / "features").rglob("*.npz")))
        process.kill()
    finally:
        process.wait()
    assert 1 <= complete < 6, complete          # it was stopped mid-extraction
    assert json.loads((tmp_path / "a" / "config.json").read_text())["status"] == "running"
    resumed = run_script("test_pacemaker.py", *args, "--out", str(tmp_path / "a"), env=SINGLE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _reused(resumed.stdout)[0] >= complete
    clean = run_script("test_pacemaker.py", *args, "--out", str(tmp_path / "b"), "--no_cache", env=SINGLE_THREAD)
    assert clean.returncode == 0, clean.stderr[-2000:]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "metrics.csv"), pd.read_csv(tmp_path / "b" / "metrics.csv"))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_interrupt_leaves_a_resumable_run(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of extraction: exit 130, config.json says interrupted, every feature
    set on disk is complete, and the same command resumes from them."""
    import common.app.run as run_module

    data = make_synthetic("orthonet", tmp_path / "data", per_class=12, image_size=64)
    args = ["--demo", "--model", "clip", "--image_path", str(data), "--out", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), *FAST]
    calls = {"n": 0}
    original = run_module.extract_mode_batch

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(run_module, "extract_mode_batch", interrupted)
    first = run_main("orthonet", args, capsys)
    assert first.code == 130 and "resume" in first.err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["status"] == "interrupted"
    written = list((tmp_path / "cache" / "features").rglob("*.npz"))
    assert written and all(read_checked_npz(p, p.stem) is not None for p in written)
    monkeypatch.setattr(run_module, "extract_mode_batch", original)
    again = run_main("orthonet", args, capsys)
    assert again.code == 0, again.err
    assert _reused(again.out)[0] == len(written)


@pytest.mark.slow
def test_the_course_no_ttr_probe_is_scored_on_features_with_one_zero_register(end_to_end):
    """The course code appends one zero register token in both modes, so its saved no-ttr probe is
    scored on features extracted that way, not on the model as released (our no-ttr): recomputed
    here image by image with the planted model, independently of the run."""
    from sklearn.metrics import roc_auc_score

    from common.data.images import load_rgb
    from common.demo.demo import demo_model
    from common.models.hooks import HookedViT

    course = end_to_end["course"]
    out = course["out"]
    assert course["result"].returncode == 0, course["result"].stderr[-2000:]
    splits = pd.read_csv(out / "splits.csv")
    test = splits[splits["split"] == "test"]
    backbone = demo_model("clip", seed=0).backbone
    hooked = HookedViT(backbone)
    saved = torch.load(course["course"] / "best_model_no_ttr.pth", weights_only=True)
    weight, bias = saved["fc.weight"].double().numpy(), saved["fc.bias"].double().numpy()

    def features(registers: int) -> np.ndarray:
        return torch.stack([hooked.run_with_hooks(backbone.preprocess(load_rgb(path))[None], [],
                                                  num_registers=registers)[0] for path in test["path"]]).numpy()

    def auc(pooled: np.ndarray) -> float:
        logits = pooled.astype(np.float64) @ weight.T + bias
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return roc_auc_score(test["label"], probabilities, multi_class="ovr", average="macro")

    with_register, as_released = features(1), features(0)
    assert np.abs(with_register - as_released).max() > 1e-4       # the two ways differ: the check can fail
    cached = [read_checked_npz(path, path.stem)["pooled"] for path in
              (out.parent / f"cache_{out.name}" / "features").rglob("*.npz")]
    assert any(c.shape == with_register.shape and np.allclose(c, with_register, atol=1e-5) for c in cached)
    row = pd.read_csv(out / "metrics.csv").set_index("mode").loc["no-ttr (course probe)"]
    assert row["auc_macro"] == pytest.approx(auc(with_register), abs=1e-9)
    config = json.loads((out / "config.json").read_text())
    assert "one zero register token appended in both modes" in config["course_probe_features"]
    assert config["feature_cache_hits"]["no-ttr (course)/test"] == 0
    assert "not the model as released" in (out / "summary.md").read_text()
