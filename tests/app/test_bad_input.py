"""The bad-input matrix, the parts above the data layer: flags, ``--set``, weights, neuron files,
output folders, decode errors in a run, damaged caches, reference probes, finished runs (the
harness is tests/badinput.py; the data layer's cases are in tests/data/).

Most cases stop before any model work.  The few that need a whole run (caches, decode errors,
reference probes, odd names end to end) use the demo's planted model on a small synthetic tree;
they share one clean run and copies of its cache, and are marked ``slow``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch

from badinput import (
    FAST,
    PACEMAKER_CLASSES,
    SPECS,
    TRAIN_A,
    Case,
    Ctx,
    Result,
    _offline,  # noqa: F401  (an autouse fixture, picked up by name)
    _pm,
    check_data,
    clip_run,
    code_pickle,
    corrupt_pixel_png,
    demo_on,
    dinov2_run,
    params,
    run_case,
    run_main,
    snapshot,
    trees,  # noqa: F401  (a fixture, picked up by name)
    write,
    write_png,
)
from common.app.cli import main
from common.demo.synthetic import make_synthetic


# ---------------------------------------------------------------- flags

def _cuda_device_that_does_not_exist() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


FLAG_CASES = [
    Case("flag-num-workers-minus-1-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--num_workers", "-1"), 2,
         ("num_workers", "-1"), r"use an integer >= 0"),
    Case("flag-batch-size-0-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--batch_size", "0"), 2,
         ("batch_size=0",), r"at least 1"),
    Case("flag-detect-images-0-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--detect_images", "0"), 2,
         ("detect_images=0",), r"at least 1"),
    Case("flag-unknown-model-vit-exit2", "pacemaker",
         lambda ctx: ["--model", "vit", "--image_path", str(_pm(ctx))], 2,
         ("--model", "'vit'"), r"choose from"),
    Case("flag-device-cuda-not-available-exit2", "pacemaker",
         lambda ctx: clip_run(ctx, "--device", _cuda_device_that_does_not_exist()), 2,
         ("cuda",), r"use --device cpu|pick an index"),
    Case("flag-device-tpu-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--device", "tpu"), 2,
         ("'tpu'",), r"use auto, cpu, cuda"),
    Case("flag-model-missing-exit2", "pacemaker", lambda ctx: ["--image_path", str(_pm(ctx))], 2,
         ("--model",), r"clip, dinov2"),
    Case("flag-run-without-image-path-or-manifest-exit2", "pacemaker", lambda ctx: ["--model", "clip"], 2,
         ("--image_path",), r"--manifest FILE|--demo"),
    Case("flag-seed-not-an-integer-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--seed", "one"), 2,
         ("--seed", "'one'"), r"invalid int"),
    Case("flag-seed-negative-exit2-names-the-seed", "pacemaker",
         lambda ctx: check_data(_pm(ctx)) + ["--seed", "-1"], 2, ("seed", "-1"), r"use .*0"),
    Case("flag-demo-with-weights-exit2", "pacemaker",
         lambda ctx: ["--model", "clip", "--demo", "--weights", str(ctx.inp / "w.bin")], 2,
         ("--demo", "--weights"), r"do not apply"),
    Case("flag-detect-path-not-a-folder-exit2", "pacemaker",
         lambda ctx: demo_on(ctx, _pm(ctx), "--detect_path", str(ctx.inp / "no such folder")), 2,
         ("--detect_path", "no such folder"), r"pass a folder of images"),
]


# ---------------------------------------------------------------- --set

def _set(model_run, *pairs):
    def build(ctx):
        extra = []
        for pair in pairs:
            extra += ["--set", pair]
        return model_run(ctx, *extra)
    return build


SET_CASES = [
    Case("set-unknown-key-exit2-lists-valid-keys", "pacemaker", _set(clip_run, "top_kk=3"), 2,
         ("top_kk", "unknown config key"), r"valid keys: .*top_k"),
    Case("set-top-k-not-a-number-exit2", "pacemaker", _set(clip_run, "top_k=many"), 2,
         ("top_k", "many"), r"expected an integer"),
    Case("set-batch-size-float-exit2", "pacemaker", _set(clip_run, "batch_size=2.5"), 2,
         ("batch_size", "2.5"), r"expected an integer"),
    Case("set-without-equals-sign-exit2", "pacemaker", _set(clip_run, "top_k"), 2,
         ("top_k",), r"expected KEY=VALUE"),
    Case("set-detect-outliers-layer-12-above-clip-depth-exit2", "pacemaker",
         _set(clip_run, "detect_outliers_layer=12"), 2, ("detect_outliers_layer=12", "12-layer"), r"use -12\.\.11"),
    Case("set-detect-outliers-layer-minus-13-below-clip-depth-exit2", "pacemaker",
         _set(clip_run, "detect_outliers_layer=-13"), 2, ("detect_outliers_layer=-13",), r"use -12\.\.11"),
    Case("set-highest-layer-24-above-dinov2-depth-exit2", "pacemaker", _set(dinov2_run, "highest_layer=24"), 2,
         ("highest_layer=24", "24-layer"), r"use 0\.\.23"),
    Case("set-highest-layer-minus-1-exit2", "pacemaker", _set(dinov2_run, "highest_layer=-1"), 2,
         ("highest_layer=-1",), r"use 0\.\.23"),
    Case("set-highest-layer-6-above-demo-model-depth-exit2", "pacemaker",
         lambda ctx: demo_on(ctx, _pm(ctx), "--set", "highest_layer=6"), 2,
         ("highest_layer=6", "6-layer"), r"use 0\.\.5"),
    Case("set-top-k-0-exit2", "pacemaker", _set(clip_run, "top_k=0"), 2, ("top_k=0",), r"at least 1"),
    Case("set-top-k-above-the-models-neuron-count-exit2", "pacemaker", _set(clip_run, "top_k=100000"), 2,
         ("top_k=100000",), r"use 1\.\.36864"),
    Case("set-normal-values-median-exit2", "pacemaker", _set(clip_run, "normal_values=median"), 2,
         ("normal_values", "median"), r"use one of zero, mean, only_outliers, same"),
    Case("set-extra-modes-bogus-exit2", "pacemaker", _set(clip_run, "extra_modes=bogus"), 2,
         ("extra_modes", "bogus"), r"valid: "),
    Case("set-val-fraction-1.2-exit2", "pacemaker", _set(clip_run, "val_fraction=1.2"), 2,
         ("val_fraction=1.2",), r"each must be in \(0, 1\)"),
    Case("set-val-plus-test-fraction-1-exit2", "pacemaker",
         _set(clip_run, "val_fraction=0.5", "test_fraction=0.5"), 2, ("val_fraction=0.5", "test_fraction=0.5"),
         r"sum below 1"),
    Case("set-register-norm-threshold-negative-exit2", "pacemaker",
         _set(clip_run, "register_norm_threshold=-5"), 2, ("register_norm_threshold", "-5"),
         r"expected a positive number or 'auto'"),
    Case("set-num-registers-0-exit2", "pacemaker", _set(clip_run, "num_registers=0"), 2,
         ("num_registers=0",), r"at least 1"),
    Case("set-scale-nan-exit2", "pacemaker", _set(clip_run, "scale=nan"), 2, ("scale",),
         r"expected a finite number"),
    Case("set-dinov2-backbone-size-unknown-exit2", "pacemaker", _set(dinov2_run, "backbone_size=vitx99"), 2,
         ("vitx99",), r"vitl14"),
    Case("set-precision-fp16-exit2", "pacemaker", _set(clip_run, "precision=fp16"), 2,
         ("precision", "fp16"), r"use one of auto, fp32, bf16"),
    Case("set-feature-patch-exit2", "pacemaker", _set(clip_run, "feature=patch"), 2,
         ("feature", "patch"), r"use one of cls, patch_mean"),
    Case("set-probe-seeds-text-exit2", "pacemaker", _set(clip_run, "probe_seeds=abc"), 2,
         ("probe_seeds",), r"expected integers"),
]


# ---------------------------------------------------------------- weights

def w_missing(ctx):
    return clip_run(ctx, "--weights", str(ctx.inp / "open_clip_pytorch_model.bin"))


def w_garbage(ctx):
    write(ctx.inp / "weights.bin", b"<html>Access denied</html>\n" * 10)
    return clip_run(ctx, "--weights", str(ctx.inp / "weights.bin"))


def w_other_model(ctx):
    torch.save({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, str(ctx.inp / "probe.pth"))
    return clip_run(ctx, "--weights", str(ctx.inp / "probe.pth"))


def w_code(ctx):
    code_pickle(ctx.inp / "weights.pt", ctx.marker, torch_format=True)
    return clip_run(ctx, "--weights", str(ctx.inp / "weights.pt"))


def w_code_raw(ctx):
    code_pickle(ctx.inp / "weights.bin", ctx.marker, torch_format=False)
    return clip_run(ctx, "--weights", str(ctx.inp / "weights.bin"))


def w_folder(ctx):
    (ctx.inp / "checkpoints").mkdir()
    return clip_run(ctx, "--weights", str(ctx.inp / "checkpoints"))


def w_dinov2_garbage(ctx):
    write(ctx.inp / "dinov2_vits14_pretrain.pth", b"\x00" * 4096)
    return dinov2_run(ctx, "--set", "backbone_size=vits14", "--set", "highest_layer=9",
                      "--weights", str(ctx.inp / "dinov2_vits14_pretrain.pth"))


def _no_unsafe_hint(ctx: Ctx, result: Result) -> None:
    """A file that may be untrusted: the line must not pass on torch's hint to load it unsafely."""
    assert "set to `False`" not in result.message, result.message


CLIP_WEIGHTS_LINE = ("the CLIP loader's line is '--weights FILE: not an open_clip ViT-B-16 checkpoint (<first line "
                     "of the library's error>)' with nothing on what to do (the DINOv2 loader ends with '; pass a "
                     ".safetensors, .pth or .bin file')")

WEIGHTS_CASES = [
    Case("weights-missing-file-exit2", "pacemaker", w_missing, 2, ("--weights", "open_clip_pytorch_model.bin"),
         r"no such file; pass the path"),
    Case("weights-garbage-file-exit2", "pacemaker", w_garbage, 2, ("--weights", "weights.bin"),
         r"; pass ", check=_no_unsafe_hint),
    Case("weights-state-dict-of-another-model-exit2", "pacemaker", w_other_model, 2,
         ("--weights", "probe.pth"), r"; pass ", check=_no_unsafe_hint),
    Case("weights-torch-file-that-would-run-code-refused-without-running-it-exit2", "pacemaker", w_code, 2,
         ("--weights", "weights.pt"), r"; pass ", check=_no_unsafe_hint),
    Case("weights-raw-pickle-refused-without-running-it-exit2", "pacemaker", w_code_raw, 2,
         ("--weights", "weights.bin"), r"; pass ", check=_no_unsafe_hint),
    Case("weights-path-is-a-folder-exit2-says-it-is-a-folder", "pacemaker", w_folder, 2,
         ("--weights", "checkpoints", "folder"), r"pass the path of a downloaded checkpoint"),
    Case("weights-none-and-hub-offline-exit2-says-what-to-fetch", "pacemaker", lambda ctx: clip_run(ctx), 2,
         ("open_clip_pytorch_model.bin", "--weights"), r"download .* and pass it with --weights", subprocess=True),
    Case("weights-dinov2-garbage-file-exit2", "pacemaker", w_dinov2_garbage, 2,
         ("--weights", "dinov2_vits14_pretrain.pth"), r"; pass a .safetensors, .pth or .bin file"),
]


# ---------------------------------------------------------------- neuron files

def _neurons(ctx, name, data: bytes | None = None) -> str:
    path = ctx.inp / name
    if data is not None:
        write(path, data)
    return str(path)


def _json_ranking(identity: dict | None, ranked) -> bytes:
    return json.dumps({"format": "ttr-register-neurons/2", "source": "detected", "model": identity,
                       "register_norm_threshold": 150, "detect_outliers_layer": -2,
                       "ranked": ranked}).encode()


DINOV2_L = {"family": "dinov2", "architecture": "vit_large_patch14_dinov2", "layers": 24, "mlp_width": 4096,
            "weights": "vit_large_patch14_dinov2.lvd142m"}


def n_torch(ctx, name, obj):
    torch.save(obj, str(ctx.inp / name))
    return clip_run(ctx, "--neurons", str(ctx.inp / name))


def n_code(torch_format):
    def build(ctx):
        code_pickle(ctx.inp / "register_neurons.pt", ctx.marker, torch_format=torch_format)
        return clip_run(ctx, "--neurons", str(ctx.inp / "register_neurons.pt"))
    return build


def n_claims_demo_model(ctx):
    from common.demo.demo import demo_model

    identity = demo_model("clip", 0).backbone.identity.as_dict()
    path = _neurons(ctx, "edited_neurons.json", _json_ranking(identity, [[2, 999, 5.0], [2, 1, 4.0]]))
    return demo_on(ctx, _pm(ctx), "--neurons", path)


NEURON_CASES = [
    Case("neurons-json-with-a-text-layer-exit2", "pacemaker",
         lambda ctx: clip_run(ctx, "--neurons", _neurons(ctx, "register_neurons.json",
                                                        _json_ranking(None, [["fourteen", 2110, 9.0]]))), 2,
         ("--neurons", "register_neurons.json", "fourteen"), r"pass a register_neurons.json written by a run"),
    Case("neurons-json-of-this-model-with-an-entry-beyond-its-mlp-width-exit2", "pacemaker", n_claims_demo_model, 2,
         ("--neurons", "edited_neurons.json", "(2, 999)"), r"another model|pass|detect"),
    Case("neurons-missing-file-exit2", "pacemaker",
         lambda ctx: clip_run(ctx, "--neurons", _neurons(ctx, "register_neurons.json")), 2,
         ("--neurons", "register_neurons.json", "no such file"), r"pass a register_neurons.json"),
    Case("neurons-malformed-json-exit2", "pacemaker",
         lambda ctx: clip_run(ctx, "--neurons", _neurons(ctx, "register_neurons.json", b'{"ranked": [[1, 2,')), 2,
         ("--neurons", "register_neurons.json"), r"pass a register_neurons.json written by a run"),
    Case("neurons-json-of-another-model-exit2-names-both-models", "pacemaker",
         lambda ctx: clip_run(ctx, "--neurons", _neurons(ctx, "dinov2_neurons.json",
                                                        _json_ranking(DINOV2_L, [[14, 2110, 9.0], [15, 1714, 8.0]]))),
         2, ("--neurons", "dinov2_neurons.json", "vit_large_patch14_dinov2", "ViT-B-16"),
         r"detect on this model or pass its own"),
    Case("neurons-json-with-empty-ranking-exit2", "pacemaker",
         lambda ctx: clip_run(ctx, "--neurons", _neurons(ctx, "empty.json", _json_ranking(None, []))), 2,
         ("--neurons", "empty.json", "empty"), r"detect|pass"),
    Case("neurons-pt-holding-a-dict-not-a-ranking-exit2", "pacemaker",
         lambda ctx: n_torch(ctx, "best_model_ttr.pth", {"fc.weight": torch.zeros(2, 3)}), 2,
         ("--neurons", "best_model_ttr.pth", "dict"), r"pass the course project's register_neurons.pt"),
    Case("neurons-pt-ranking-layer-out-of-bounds-exit2", "pacemaker",
         lambda ctx: n_torch(ctx, "register_neurons.pt", [(30, 5, 2.0), (3, 7, 1.0)]), 2,
         ("--neurons", "register_neurons.pt", "(30, 5)"), r"belongs to another model"),
    Case("neurons-pt-ranking-neuron-beyond-mlp-width-exit2", "pacemaker",
         lambda ctx: n_torch(ctx, "register_neurons.pt", [(3, 5000, 2.0)]), 2,
         ("--neurons", "register_neurons.pt", "(3, 5000)"), r"belongs to another model"),
    Case("neurons-raw-pickle-that-would-run-code-refused-exit2", "pacemaker", n_code(False), 2,
         ("--neurons", "register_neurons.pt"), r"pass a course register_neurons.pt"),
    Case("neurons-torch-save-that-would-run-code-refused-exit2", "pacemaker", n_code(True), 2,
         ("--neurons", "register_neurons.pt"), r"pass a course register_neurons.pt"),
    Case("neurons-paper-with-clip-exit2", "pacemaker", lambda ctx: clip_run(ctx, "--neurons", "paper"), 2,
         ("--neurons paper", "DINOv2 ViT-L/14"), r"detect instead or pass a JSON"),
    Case("neurons-paper-with-demo-exit2", "pacemaker",
         lambda ctx: ["--model", "dinov2", "--demo", "--neurons", "paper"], 2,
         ("--demo", "--neurons paper"), r"do not apply"),
    Case("neurons-path-is-a-folder-exit2", "pacemaker",
         lambda ctx: (ctx.inp / "neurons").mkdir() or clip_run(ctx, "--neurons", str(ctx.inp / "neurons")), 2,
         ("--neurons", "neurons"), r"pass a register_neurons.json"),
]


# ---------------------------------------------------------------- output folders

def _finished(folder: Path, dataset: str, model: str) -> None:
    write(folder / "config.json", json.dumps({"dataset": dataset, "model": model, "status": "done"}).encode())
    write(folder / "metrics.csv", b"mode,top1\nno-ttr,0.9\nttr,0.91\n")


def out_file(ctx):
    write(ctx.inp / "results.txt", b"my notes\n")
    return clip_run(ctx, "--out", str(ctx.inp / "results.txt"))


def out_file_check(ctx):
    write(ctx.inp / "results.txt", b"my notes\n")
    return check_data(_pm(ctx)) + ["--out", str(ctx.inp / "results.txt")]


def out_below_file(ctx):
    write(ctx.inp / "results.txt", b"my notes\n")
    return clip_run(ctx, "--out", str(ctx.inp / "results.txt" / "run1"))


def out_unwritable(ctx):
    folder = ctx.inp / "readonly"
    folder.mkdir()
    os.chmod(folder, 0o500)
    try:
        probe = folder / "probe"
        probe.write_bytes(b"")
    except OSError:
        return clip_run(ctx, "--out", str(folder / "run1"))
    probe.unlink()
    os.chmod(folder, 0o700)
    pytest.skip("chmod 0o500 does not stop this user (root) from writing: cannot build the case")


def out_other_dataset(ctx):
    _finished(ctx.inp / "run_aptos", "aptos", "clip")
    return clip_run(ctx, "--out", str(ctx.inp / "run_aptos"))


def out_other_model(ctx):
    _finished(ctx.inp / "run_dinov2", "pacemaker", "dinov2")
    return clip_run(ctx, "--out", str(ctx.inp / "run_dinov2"))


def out_check_data_finished(ctx):
    _finished(ctx.inp / "run_pacemaker", "pacemaker", "clip")
    return check_data(_pm(ctx)) + ["--out", str(ctx.inp / "run_pacemaker")]


def out_is_dataset(ctx):
    root = ctx.data("orthonet_folders")
    return check_data(root) + ["--out", str(root)]


def out_users_own_file(ctx):
    write(ctx.inp / "project" / "splits.csv", b"path,label,split\nmy/own/split.png,1,train\n")
    return check_data(_pm(ctx)) + ["--out", str(ctx.inp / "project")]


OUT_CASES = [
    Case("out-is-the-dataset-folder-exit2-dataset-untouched", "orthonet", out_is_dataset, 2,
         ("--out", "data"), r"pass another --out|outside"),
    Case("out-folder-holding-the-users-own-splits-csv-exit2-file-untouched", "pacemaker", out_users_own_file, 2,
         ("--out", "project", "splits.csv"), r"pass another --out|move"),
    Case("out-is-an-existing-file-exit2", "pacemaker", out_file, 2, ("--out", "results.txt", "is a file"),
         r"pass a folder"),
    Case("out-is-an-existing-file-with-check-data-exit2", "pacemaker", out_file_check, 2,
         ("--out", "results.txt", "is a file"), r"pass a folder"),
    Case("out-below-an-existing-file-exit2", "pacemaker", out_below_file, 2, ("--out", "results.txt"),
         r"pass a writable folder"),
    Case("out-in-an-unwritable-folder-exit2", "pacemaker", out_unwritable, 2, ("--out", "readonly"),
         r"pass a writable folder"),
    Case("out-holds-a-finished-run-of-another-dataset-exit2", "pacemaker", out_other_dataset, 2,
         ("--out", "run_aptos", "aptos"), r"pass another --out"),
    Case("out-holds-a-finished-run-of-another-model-exit2", "pacemaker", out_other_model, 2,
         ("--out", "run_dinov2", "dinov2"), r"pass another --out"),
    Case("check-data-into-a-finished-run-exit2-files-untouched", "pacemaker", out_check_data_finished, 2,
         ("--out", "run_pacemaker", "finished run"), r"pass another --out"),
]


# ---------------------------------------------------------------- the reference probes flag (fast part)

def rp_missing(ctx):
    return clip_run(ctx, "--reference_probes", str(ctx.inp / "Trained_Models" / "pacemaker_clip"))


FAST_MISC_CASES = [
    Case("reference-probes-folder-does-not-exist-exit2", "pacemaker", rp_missing, 2,
         ("--reference_probes", "pacemaker_clip"), r"pass the course project's"),
]


# ---------------------------------------------------------------- decode errors

def dec_worker(ctx):
    root = _pm(ctx)
    corrupt_pixel_png(root / TRAIN_A / "0002.png")
    return demo_on(ctx, root, "--set", "num_workers=1")


def _decode_named(ctx, result):
    if result.code == 0:
        assert re.search(r"skipped 1 file", result.err), result.err


DECODE_CASES = [
    Case("pacemaker-png-with-corrupt-pixel-data-in-a-loader-worker-exit2-or-skipped-names-file-no-worker-traceback",
         "pacemaker", dec_worker, (0, 2), ("Train/MDT - Adapta/0002.png",), r"replace or remove|skipped",
         check=_decode_named, slow=True),
]


ALL_FAST_CASES = FLAG_CASES + SET_CASES + WEIGHTS_CASES + NEURON_CASES + OUT_CASES + FAST_MISC_CASES + DECODE_CASES


@pytest.mark.parametrize("case", params(ALL_FAST_CASES))
def test_bad_input(case: Case, tmp_path, trees, capsys):
    problems = run_case(case, tmp_path, trees, capsys)
    assert not problems, "\n".join(problems)


# ============================================================================================
# cases that need a whole (demo-sized) run: caches, reference probes, finished runs, odd names


@dataclass
class Clean:
    """One clean demo run on a small Pacemaker tree, and its cache (copied per case)."""

    data: Path
    out: Path
    cache: Path


@pytest.fixture(scope="session")
def clean(tmp_path_factory) -> Clean:
    base = tmp_path_factory.mktemp("bad_input_clean")
    data = make_synthetic("pacemaker", base / "data", classes=3, per_class=12, image_size=64, seed=0)
    run = Clean(data, base / "out", base / "cache")
    code = main(SPECS["pacemaker"], ["--model", "clip", "--demo", "--image_path", str(data), "--out", str(run.out),
                                     "--cache_dir", str(run.cache), *FAST])
    assert code == 0, "the clean demo run every cache case compares with failed"
    return run


def _cache_files(cache: Path, kind: str) -> list[Path]:
    return sorted((cache / kind).rglob("*.npz"))


def _features_of_length(cache: Path, length: int) -> Path:
    for path in _cache_files(cache, "features"):
        with np.load(path, allow_pickle=False) as data:
            if len(data["pooled"]) == length:
                return path
    raise AssertionError(f"no features cache file with {length} rows")


def _rewrite_npz(path: Path, change: Callable[[dict], None]) -> None:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    change(arrays)
    stream = io.BytesIO()
    np.savez(stream, **arrays)
    path.write_bytes(stream.getvalue())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_features(path: Path) -> None:
    def change(arrays):
        arrays["pooled"] = np.zeros_like(arrays["pooled"])
        arrays["patch_mean"] = np.zeros_like(arrays["patch_mean"])
    _rewrite_npz(path, change)


def strip_key_and_checksum(path: Path) -> None:
    """What an older version or another tool would leave: the arrays alone, right names and shapes,
    different values."""
    def change(arrays):
        for name in list(arrays):
            if name.startswith("__"):
                del arrays[name]
        arrays["pooled"] = arrays["pooled"][::-1].copy()
    _rewrite_npz(path, change)


def reverse_ranking(path: Path) -> None:
    def change(arrays):
        for name in ("layers", "neurons", "scores"):
            arrays[name] = arrays[name][::-1].copy()
    _rewrite_npz(path, change)


def _numeric_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        if pd.api.types.is_numeric_dtype(a[column]):
            np.testing.assert_allclose(a[column].to_numpy(float), b[column].to_numpy(float), rtol=1e-6, atol=1e-9,
                                       err_msg=column, equal_nan=True)
        else:
            assert list(a[column]) == list(b[column]), column


def _same_results(clean: Clean, out: Path) -> None:
    for name in ("metrics.csv", "predictions_no-ttr.csv", "predictions_ttr.csv"):
        _numeric_equal(pd.read_csv(clean.out / name), pd.read_csv(out / name))
    ranked = json.loads((out / "register_neurons.json").read_text())["ranked"]
    assert ranked == json.loads((clean.out / "register_neurons.json").read_text())["ranked"]


@dataclass
class CacheCase:
    id: str
    kind: str                              # cache folder: features | images | detection
    pick: Callable[[Path], list[Path]]     # the entries to damage, from the case's cache copy
    damage: Callable[[Path], None] | None  # None: another entry's valid file copied over it
    reused: int | None                     # feature sets expected from the cache (of 6)
    xfail: str | None = None


CACHE_CASES = [
    CacheCase("cache-truncated-feature-npz-warns-once-naming-it-and-recomputes-same-results", "features",
              lambda cache: [_features_of_length(cache, 5)], truncate, 5),
    CacheCase("cache-zeroed-train-features-warns-once-naming-it-and-recomputes-same-results", "features",
              lambda cache: [_features_of_length(cache, 25)], zero_features, 5),
    CacheCase("cache-foreign-npz-without-key-or-checksum-warns-once-and-recomputes-same-results", "features",
              lambda cache: [_features_of_length(cache, 25)], strip_key_and_checksum, 5),
    CacheCase("cache-entry-of-another-key-copied-over-warns-once-and-recomputes-same-results", "features",
              lambda cache: [_features_of_length(cache, 6)], None, 5),
    # Every decoded-image entry damaged: a cached re-run reads only those its analysis pass needs.
    CacheCase("cache-truncated-decoded-images-each-read-one-warned-once-and-redecoded-same-results", "images",
              lambda cache: _cache_files(cache, "images"), truncate, 6),
    CacheCase("cache-altered-detection-ranking-warns-once-and-redetects-same-neurons", "detection",
              lambda cache: _cache_files(cache, "detection")[:1], reverse_ranking, 6),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                                               if c.xfail else []) for c in CACHE_CASES])
def test_damaged_cache(case: CacheCase, clean: Clean, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(clean.cache, cache)
    victims = case.pick(cache)
    assert victims
    for victim in victims:
        if case.damage is None:        # another entry's (valid, checksummed) file at this entry's path
            other = next(p for p in _cache_files(cache, case.kind) if p != victim)
            shutil.copyfile(other, victim)
        else:
            case.damage(victim)
    out = tmp_path / "out"
    before = snapshot(clean.data)
    result = run_main("pacemaker", ["--model", "clip", "--demo", "--image_path", str(clean.data), "--out", str(out),
                                    "--cache_dir", str(cache), *FAST], capsys)
    shown = f"exit {result.code}\n{result.err[-5000:]}"
    assert result.code == 0, shown
    assert "Traceback" not in result.text, shown
    assert snapshot(clean.data) == before
    warned = []
    for victim in victims:
        lines = [line for line in result.err.splitlines() if str(victim) in line]
        assert len(lines) <= 1, f"{victim} warned about {len(lines)} times:\n{shown}"
        assert all(re.search(r"recomput|ignor", line) for line in lines), lines
        warned += lines
    expected = len(victims) if case.kind != "images" else None
    assert len(warned) == (expected or len(warned)) and warned, f"expected one warning per damaged file:\n{shown}"
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "done"
    if case.reused is not None:
        assert sum(config["feature_cache_hits"].values()) == case.reused, config["feature_cache_hits"]
    if case.kind == "images":
        assert config["images_decoded"] == len(warned), (config.get("images_decoded"), warned)
    _same_results(clean, out)
    # The entry was rewritten whole: a run now reads it without a word.
    again = run_main("pacemaker", ["--model", "clip", "--demo", "--image_path", str(clean.data),
                                   "--out", str(tmp_path / "out2"), "--cache_dir", str(cache), *FAST], capsys)
    assert again.code == 0 and not any(str(v) in again.err for v in victims), again.err[-3000:]


def _probe_folder(folder: Path, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]] | None]) -> None:
    folder.mkdir(parents=True)
    for name, shape in shapes.items():
        if shape is not None:
            weight, bias = shape
            torch.save({"fc.weight": torch.zeros(weight), "fc.bias": torch.zeros(bias)}, str(folder / name))


# The planted CLIP fixture's pooled feature is 32-d; the clean tree has 3 classes.
PROBE_CASES = [
    ("reference-probes-wrong-feature-width-exit2-names-file-and-shapes",
     {"best_model_no_ttr.pth": ((3, 7), (3,)), "best_model_ttr.pth": ((3, 7), (3,))},
     ("--reference_probes", "best_model_no_ttr.pth", "[3, 7]"), r"use the probes saved for this backbone"),
    ("reference-probes-wrong-class-count-exit2-names-file-and-classes",
     {"best_model_no_ttr.pth": ((5, 32), (5,)), "best_model_ttr.pth": ((5, 32), (5,))},
     ("--reference_probes", "best_model_no_ttr.pth", "5 classes"), r"use the probes saved for this dataset"),
    ("reference-probes-folder-without-the-ttr-probe-exit2",
     {"best_model_no_ttr.pth": ((3, 32), (3,)), "best_model_ttr.pth": None},
     ("--reference_probes", "best_model_ttr.pth", "not found"), r"the folder must hold"),
]


@pytest.mark.slow
@pytest.mark.parametrize("shapes, names, advice", [pytest.param(s, n, a, id=i) for i, s, n, a in PROBE_CASES])
def test_reference_probes_of_wrong_shape(shapes, names, advice, clean: Clean, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(clean.cache, cache)
    probes = tmp_path / "in" / "Trained_Models" / "pacemaker_clip"
    _probe_folder(probes, shapes)
    before = snapshot(tmp_path / "in"), snapshot(clean.data)
    result = run_main("pacemaker", ["--model", "clip", "--demo", "--image_path", str(clean.data),
                                    "--out", str(tmp_path / "out"), "--cache_dir", str(cache),
                                    "--reference_probes", str(probes), *FAST], capsys)
    shown = f"exit {result.code}\n{result.err[-5000:]}"
    assert result.code == 2, shown
    assert "Traceback" not in result.text, shown
    assert len(result.errors) == 1, shown
    for name in names:
        assert name in result.message, result.message
    assert re.search(advice, result.message), result.message
    assert (snapshot(tmp_path / "in"), snapshot(clean.data)) == before


@pytest.mark.slow
@pytest.mark.parametrize("model, check_data_flag", [
    pytest.param("dinov2", False, id="out-holds-a-real-finished-demo-run-of-another-model-exit2-files-untouched"),
    pytest.param(None, True, id="check-data-into-a-real-finished-run-exit2-files-untouched"),
])
def test_finished_run_folder_is_not_overwritten(model, check_data_flag, clean: Clean, tmp_path, capsys):
    out = tmp_path / "finished"
    shutil.copytree(clean.out, out)
    before = snapshot(out)
    if check_data_flag:
        argv = ["--check_data", "--image_path", str(clean.data), "--out", str(out)]
    else:
        argv = ["--model", model, "--demo", "--image_path", str(clean.data), "--out", str(out),
                "--cache_dir", str(tmp_path / "cache"), *FAST]
    result = run_main("pacemaker", argv, capsys)
    assert result.code == 2, result.err[-3000:]
    assert "Traceback" not in result.text
    assert len(result.errors) == 1 and str(out) in result.message and "pass another --out" in result.message, \
        result.message
    assert snapshot(out) == before


@pytest.mark.slow
def test_odd_file_names_go_through_a_whole_run_into_every_csv(trees, tmp_path, capsys):
    """pacemaker-spaces-unicode-and-non-utf8-names-through-a-whole-run-exit0: every stage, every CSV,
    the names byte-exact."""
    root = tmp_path / "in" / "data"
    shutil.copytree(trees["pacemaker"], root)
    odd = [b"scan 1 \xc3\xbc.png", b"\xe4\xb8\xad\xe6\x96\x87.png", b"bad-\xff\xfe.png"]
    for k, name in enumerate(odd):
        folder = os.fsencode(root / "Test" / PACEMAKER_CLASSES[k])
        write_png(folder + b"/" + name)
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out"
    result = run_main("pacemaker", ["--model", "clip", "--demo", "--image_path", str(root), "--out", str(out),
                                    "--cache_dir", str(tmp_path / "cache"), *FAST], capsys)
    assert result.code == 0, result.err[-5000:]
    assert "Traceback" not in result.text
    assert snapshot(tmp_path / "in") == before
    for csv in ("splits.csv", "predictions_no-ttr.csv", "predictions_ttr.csv"):
        data = (out / csv).read_bytes()
        for name in odd:
            assert name in data, f"{name!r} not byte-exact in {csv}"


@pytest.mark.slow
def test_cache_dir_that_is_a_file_exit2(trees, tmp_path, capsys):
    """cache-dir-is-an-existing-file-exit2: --cache_dir names a file; the run says so up front."""
    root = tmp_path / "in" / "data"
    shutil.copytree(trees["pacemaker"], root)
    write(tmp_path / "in" / "cache.txt", b"not a folder\n")
    before = snapshot(tmp_path / "in")
    result = run_main("pacemaker", ["--model", "clip", "--demo", "--image_path", str(root),
                                    "--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "in" / "cache.txt"),
                                    *FAST], capsys)
    shown = f"exit {result.code}\n{result.err[-5000:]}"
    assert result.code == 2, shown
    assert "Traceback" not in result.text, shown
    assert len(result.errors) == 1 and "--cache_dir" in result.message and "cache.txt" in result.message, shown
    assert snapshot(tmp_path / "in") == before
