"""The run's cached-stage helper and batch sharding (common.app.stages).

The whole run (cache reuse and invalidation, interrupt and resume, two gloo ranks against one
process) is exercised end to end in tests/app/test_end_to_end.py; here the helper on its own, on one
process and as rank 1 of 2 (a stand-in for the process group that records what it is asked)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from common.app.stages import cached_stage, my_batches
from common.app.runstate import RunState
from common.app.settings import DatasetSpec, RunOptions
from common.data.cache import Cache, cache_key
from common.runtime.distributed import Dist


@dataclass(frozen=True)
class OtherRank(Dist):
    """Rank 1 of 2: ``broadcast`` returns what rank 0 sends (``sent``) and records the call."""

    sent: object = None
    calls: list = field(default_factory=list)

    def broadcast(self, value):
        self.calls.append(value)
        return self.sent


def _state(tmp_path, dist=Dist(), enabled=True) -> RunState:
    return RunState(spec=DatasetSpec("aptos", "APTOS"), options=RunOptions("clip", None, tmp_path / "out"), config={},
                    dist=dist, modes=("no-ttr",), cache=Cache(tmp_path / "cache", enabled=enabled))


def _stage(state, compute, description=None, **options):
    return cached_stage(state, "features", description or {"kind": "test", "n": 3}, compute,
                        encode=lambda value: {"x": value}, decode=lambda arrays: arrays["x"], **options)


def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def test_computed_once_then_read_back(tmp_path):
    state = _state(tmp_path)
    compute, calls = _counting(np.arange(3.0))
    value, hit = _stage(state, compute)
    assert not hit and calls == [1] and value.tolist() == [0.0, 1.0, 2.0]
    key = cache_key({"kind": "test", "n": 3})
    assert state.cache.path("features", key).is_file()
    value, hit = _stage(state, compute)
    assert hit and calls == [1] and value.tolist() == [0.0, 1.0, 2.0]
    # another description is another entry
    _, hit = _stage(state, _counting(np.zeros(1))[0], description={"kind": "test", "n": 4})
    assert not hit


def test_an_unusable_entry_is_recomputed_and_replaced(tmp_path):
    state = _state(tmp_path)
    _stage(state, lambda: np.arange(2.0))
    compute, calls = _counting(np.arange(3.0))
    value, hit = _stage(state, compute, usable=lambda arrays: len(arrays["x"]) == 3)
    assert not hit and calls == [1] and len(value) == 3
    value, hit = _stage(state, compute, usable=lambda arrays: len(arrays["x"]) == 3)
    assert hit and calls == [1] and len(value) == 3


def test_a_disabled_cache_computes_every_time_and_writes_nothing(tmp_path):
    state = _state(tmp_path, enabled=False)
    compute, calls = _counting(np.arange(3.0))
    for _ in range(2):
        assert _stage(state, compute)[1] is False
    assert calls == [1, 1] and not (tmp_path / "cache").exists()


def test_another_rank_takes_rank_0s_entry_and_never_writes(tmp_path):
    # rank 0 found the entry: rank 1 uses what it was sent, without reading the cache itself
    sent = {"x": np.arange(4.0)}
    dist = OtherRank(rank=1, world=2, sent=sent)
    state = _state(tmp_path, dist)
    compute, calls = _counting(None)
    value, hit = _stage(state, compute)
    assert hit and calls == [] and value is sent["x"] and dist.calls == [None]
    # rank 0 found nothing: rank 1 computes its share (here: None, the result is gathered on rank 0)
    dist = OtherRank(rank=1, world=2, sent=None)
    state = _state(tmp_path, dist)
    compute, calls = _counting(np.arange(2.0))
    value, hit = _stage(state, compute)
    assert not hit and calls == [1] and dist.calls == [None]
    assert not (tmp_path / "cache").exists()          # only rank 0 writes


def test_a_rank_0_only_stage_is_not_broadcast(tmp_path):
    class NoCollectives(Dist):
        def broadcast(self, value):
            raise AssertionError("a rank-0 stage must not wait for the other ranks")

    state = _state(tmp_path, NoCollectives(rank=0, world=2))
    assert _stage(state, lambda: np.ones(2), shared=False)[1] is False
    assert _stage(state, lambda: np.ones(2), shared=False)[1] is True


@pytest.mark.parametrize("images, batch, world", [(10, 3, 2), (10, 3, 3), (4, 8, 2), (0, 4, 2), (9, 3, 1)])
def test_my_batches_split_whole_batches_round_robin(tmp_path, images, batch, world):
    paths = [f"/d/{i}.png" for i in range(images)]
    scheduled = []
    shares = []
    for rank in range(world):
        state = _state(tmp_path, Dist(rank=rank, world=world))
        state.dataset = SimpleNamespace(table=pd.DataFrame({"path": paths}))
        state.bank = SimpleNamespace(prepare=lambda every: scheduled.append(list(every)) or 0, num_workers=0)
        count, mine = my_batches(state, paths, batch)
        assert count == -(-images // batch)
        shares.append(mine)
    assert sorted(i for share in shares for i in share) == list(range(count))     # every batch once
    assert all(i % world == rank for rank, share in enumerate(shares) for i in share)
    assert scheduled == [paths] * world          # every image scheduled for decoding first
