"""Several processes under PyTorch's own launcher (docs/run.md).

``torchrun --nproc_per_node=N test_aptos.py ...`` starts N copies; each calls :func:`setup`,
which joins the process group (NCCL on GPUs, gloo on CPU) and gives each rank its GPU.  Work is
split by whole batches (batch ``i`` on rank ``i % N``), so every batch is computed exactly as in
one process; results are gathered on rank 0 in dataset order, and only rank 0 writes outputs.
A single process (no ``WORLD_SIZE``) is a :class:`Dist` of one, and every helper is then a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

TIMEOUT_HOURS = 6


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_batches(self, count: int) -> list[int]:
        """Indices of the batches (of ``count``) this rank computes."""
        return list(range(self.rank, count, self.world))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather_batches(self, mine: dict[int, Any], count: int) -> list[Any] | None:
        """On rank 0 the per-batch results of every rank in batch order; None elsewhere."""
        if self.world == 1:
            return [mine[i] for i in range(count)]
        gathered: list[dict[int, Any]] = [{} for _ in range(self.world)]
        torch.distributed.all_gather_object(gathered, mine)
        if not self.is_main:
            return None
        merged: dict[int, Any] = {}
        for part in gathered:
            merged.update(part)
        return [merged[i] for i in range(count)]

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_max(self, value: float) -> float:
        if self.world == 1:
            return value
        values: list[float] = [0.0] * self.world
        torch.distributed.all_gather_object(values, value)
        return max(values)

    def all_gather_list(self, items: Sequence[Any]) -> list[Any]:
        """Every rank's ``items`` concatenated in rank order (the same list on every rank)."""
        if self.world == 1:
            return list(items)
        parts: list[list[Any]] = [[] for _ in range(self.world)]
        torch.distributed.all_gather_object(parts, list(items))
        return [item for part in parts for item in part]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a torchrun launch."""
    return int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """True when started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[tuple[Dist, torch.device]]:
    """``with session(device) as (dist, device):`` the process group for the body; it is left
    when the body ends if this call joined it (a study joins once for all its runs)."""
    joined = launched() and not torch.distributed.is_initialized()
    try:
        yield setup(device)
    finally:
        if joined:
            teardown()


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun; returns (Dist, this rank's device)."""
    if not launched():
        return Dist(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        # Ranks wait at the next collective while rank 0 trains probes and draws figures (and, in a
        # study, between cells): the default 10-minute timeout would end a long run.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=TIMEOUT_HOURS))
    return Dist(rank=rank, world=world), device


def teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
