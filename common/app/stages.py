"""What every stage of a run shares (docs/run.md): announcing a stage, the cache keys of the
model and of files, the one cached-stage helper, the batches of a rank, and the schedule of
every image the run decodes (each image once, :class:`common.data.imagebank.ImageBank`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from common.app.runstate import RunState
from common.data.cache import cache_key
from common.data.images import check_image, is_ignored, is_image_file
from common.errors import UserError

log = logging.getLogger("common.app.run")     # the stages speak as the run
T = TypeVar("T")

STAGES = ("load backbone", "load dataset and split", "register neurons", "extract features",
          "train probes", "score", "figures and outlier statistics", "summary")


def announce(state: RunState, name: str) -> None:
    if state.main:
        log.info("[%d/%d] %s", STAGES.index(name) + 1, len(STAGES), name)


def fingerprints(paths: list[str]) -> list[list]:
    """``[path, size, mtime_ns]`` per file: a changed file changes every key it is part of."""
    stats = [(os.path.abspath(p), os.stat(p)) for p in paths]
    return [[path, stat.st_size, stat.st_mtime_ns] for path, stat in stats]


def model_description(state: RunState) -> dict:
    """What identifies the model's computation in every cache key."""
    backbone, bank = state.backbone, state.bank
    return {
        "model": backbone.identity.as_dict(),
        "weights": backbone.weights_id,
        "activation": backbone.activation,
        "preprocess": [bank.preprocess_id, bank.mean.tolist(), bank.std.tolist()],
        "precision": backbone.precision,
        "device_type": backbone.device.type,
    }


def cached_stage(state: RunState, kind: str, description: dict, compute: Callable[[], T | None], *,
                 encode: Callable[[T], dict[str, np.ndarray]], decode: Callable[[dict[str, np.ndarray]], T],
                 usable: Callable[[dict[str, np.ndarray]], bool] = lambda arrays: True,
                 shared: bool = True) -> tuple[T | None, bool]:
    """One cached step of a run: (its result, whether it came from the cache).

    Rank 0 reads the ``kind`` entry under the key of ``description`` (everything that changes the
    result); a ``shared`` step (one that every rank runs) hands it to every rank, so that all of
    them agree on a hit.  A usable hit is ``decode``d.  Otherwise every rank calls ``compute``
    (which splits its batches over the ranks, :func:`my_batches`, and gathers or reduces the
    result; it may return None on the other ranks) and rank 0 saves ``encode`` of the result.
    """
    key = cache_key(description)
    arrays = state.cache.load(kind, key) if state.main else None
    if shared:
        arrays = state.dist.broadcast(arrays)
    if arrays is not None and usable(arrays):
        return decode(arrays), True
    result = compute()
    if state.main and result is not None:
        state.cache.save(kind, key, encode(result))
    return result, False


def my_batches(state: RunState, paths: list[str], batch_size: int) -> tuple[int, list[int]]:
    """(the number of batches of ``paths``, the indices of those this rank computes: batch ``i`` on
    rank ``i % N``); every image of the run is scheduled for decoding first."""
    _images_ready(state)
    count = (len(paths) + batch_size - 1) // batch_size
    return count, state.dist.my_batches(count)


# --------------------------------------------------------------------------------------------
# the images of a run


def detection_paths(state: RunState) -> list[str]:
    """A seeded random sample of ``detect_images`` training images, or of ``--detect_path``
    (chosen once per run)."""
    if state.detection_paths is None:
        state.detection_paths = _choose_detection_paths(state)
    return state.detection_paths


def _choose_detection_paths(state: RunState) -> list[str]:
    count = state.config["detect_images"]
    rng = np.random.default_rng(state.config["seed"])
    if state.options.detect_path:
        folder = Path(state.options.detect_path)
        if not folder.is_dir():
            raise UserError(f"--detect_path {folder}: not a folder; pass a folder of images")
        candidates = sorted(str(p) for p in folder.rglob("*")
                            if p.is_file() and not is_ignored(p) and is_image_file(p))
        bad = {p for p in candidates if check_image(p) is not None}
        if bad:
            log.warning("--detect_path: skipping %d unreadable image(s), e.g. %s", len(bad), ", ".join(sorted(bad)[:3]))
        candidates = [p for p in candidates if p not in bad]
        if not candidates:
            raise UserError(f"--detect_path {folder}: no readable images found; pass a folder of images")
    else:
        candidates = sorted(state.split_paths("train"))
    if len(candidates) > count:
        candidates = sorted(rng.choice(candidates, size=count, replace=False).tolist())
    return candidates


def _all_image_paths(state: RunState) -> list[str]:
    paths = list(state.dataset.table["path"])
    if state.options.detect_path:
        paths += detection_paths(state)
    return paths


def _images_ready(state: RunState) -> None:
    """Schedule every image the run may need, once: decoding threads fill the bank in the order
    of the dataset while the first pass consumes them (idempotent)."""
    scheduled = state.bank.prepare(_all_image_paths(state))
    if scheduled and state.main:
        log.info("%d images: from the image cache or decoded by %d thread(s), alongside the first pass",
                 scheduled, max(state.bank.num_workers, 1))
