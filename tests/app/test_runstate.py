"""What the stages of a run hand each other and what config.json records of it
(common.app.runstate); the complete record of a finished run is checked end to end in
tests/app/test_end_to_end.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd

from common.app.runstate import RECORDED_LIBRARIES, RunState, write_config
from common.app.settings import DatasetSpec, RunOptions, resolve_config
from common.runtime.distributed import Dist


def _state(tmp_path, dist=Dist()) -> RunState:
    options = RunOptions("clip", "/data/aptos", tmp_path, command_line=["test_aptos.py", "--model", "clip"])
    return RunState(spec=DatasetSpec("aptos", "APTOS 2019", qwk=True), options=options,
                    config=resolve_config("clip"), dist=dist, modes=("no-ttr", "ttr"))


def test_config_json_of_a_run_that_failed_early(tmp_path):
    """Before the backbone and the dataset are loaded config.json records what was asked and
    nothing that was not computed."""
    write_config(_state(tmp_path), "failed")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["status"] == "failed" and data["dataset"] == "aptos" and data["model"] == "clip"
    assert data["command_line"] == ["test_aptos.py", "--model", "clip"] and data["image_path"] == "/data/aptos"
    assert data["config"] == json.loads(json.dumps(resolve_config("clip")))
    assert data["modes"] == ["no-ttr", "ttr"] and data["processes"] == 1
    assert set(RECORDED_LIBRARIES) <= set(data["library_versions"])
    for absent in ("device", "backbone", "layout", "neurons_source", "selected_neurons", "feature_cache_hits",
                   "probe_hyperparameters", "images_decoded", "stage_seconds", "planted"):
        assert absent not in data, absent


def test_only_rank_0_writes(tmp_path):
    write_config(_state(tmp_path, Dist(rank=1, world=2)), "running")
    assert not (tmp_path / "config.json").exists()


def test_split_paths_keep_the_dataset_order(tmp_path):
    state = _state(tmp_path)
    state.dataset = SimpleNamespace(table=pd.DataFrame({"path": ["/a", "/b", "/c", "/d"],
                                                        "split": ["train", "test", "train", "val"]}))
    assert state.split_paths("train") == ["/a", "/c"]
    assert state.split_paths("test") == ["/b"] and state.split_paths("val") == ["/d"]
