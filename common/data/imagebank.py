"""Decoded, preprocessed images: every image of a run is decoded once (docs/run.md, docs/performance.md).

A backbone's preprocess is ``[PIL steps (resize, crop, ...)] -> ToTensor -> Normalize``.  The
PIL steps produce 8-bit pixels, so their output stored as ``uint8 [3, H, W]`` loses nothing:
``ToTensor`` and ``Normalize`` are applied per batch on the device, with the same elementwise
operations, and give bit-identical input tensors (tested).

:class:`ImageBank` holds the decoded images of a run in memory and keeps each one in the
preprocessed-image cache (one checksummed file per image, keyed by the file's path, size and
mtime and by the PIL steps), so a re-run - also one with new ttr settings - decodes nothing.
:meth:`ImageBank.prepare` only *schedules* the work: a pool of decoding threads (PIL releases
the GIL while it decodes and resizes; threads start at once and pass arrays without copying)
fills the bank in the background, in the order the images were asked for, while the first pass
over them (detection or extraction) consumes batches as they become ready - on a GPU the model
then never waits for the whole dataset to be decoded.  Under torchrun each rank decodes its share
of the missing images and the cache is how the ranks share them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from common.data.cache import Cache
from common.data.images import load_rgb
from common.runtime.distributed import Dist

log = logging.getLogger(__name__)

IMAGE_CACHE_VERSION = 1


def split_preprocess(preprocess: Callable) -> tuple[Callable, torch.Tensor, torch.Tensor, str]:
    """``(PIL steps, mean [3], std [3], id of the PIL steps)`` of a ``Compose`` ending in
    ``ToTensor`` (open_clip: ``MaybeToTensor``) and ``Normalize``."""
    from torchvision import transforms

    steps = list(getattr(preprocess, "transforms", []))
    names = [type(step).__name__ for step in steps]
    cut = next((i for i, name in enumerate(names) if name.endswith("ToTensor")), None)
    if cut is None or names[cut + 1:] != ["Normalize"]:
        raise ValueError(f"unsupported preprocess (expected ... ToTensor, Normalize): {names}")
    normalize = steps[-1]
    pil_steps = transforms.Compose(steps[:cut])
    mean = torch.as_tensor(normalize.mean, dtype=torch.float32)
    std = torch.as_tensor(normalize.std, dtype=torch.float32)
    return pil_steps, mean, std, " ".join(str(pil_steps).split())


class ImageBank:
    """The decoded images of a run, by path (``uint8 [3, H, W]`` each).

    ``num_workers`` decoding threads (0: decode in the calling thread, when asked for).
    ``decodes`` counts the images decoded by this process (the benchmark's ``decodes_per_image``).
    Use as a context manager, or call :meth:`close`, to stop the threads.
    """

    def __init__(self, preprocess: Callable, *, cache: Cache, num_workers: int = 0,
                 device: torch.device | str = "cpu", dist: Dist | None = None,
                 display: Callable[[str], str] = str):
        self.pil_steps, self.mean, self.std, self.preprocess_id = split_preprocess(preprocess)
        self.display = display      # how messages name a file (relative to the dataset)
        self.cache = cache
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.dist = dist or Dist()
        self.decodes = 0
        self._images: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> "ImageBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the decoding threads (images not started yet are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ---------------------------------------------------------------- keys
    def key(self, path: str) -> str:
        stat = os.stat(path)
        text = f"{IMAGE_CACHE_VERSION}|{self.preprocess_id}|{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    # ---------------------------------------------------------------- filling
    def _load(self, path: str, decode: bool) -> torch.Tensor:
        """One image: the image cache, else decoded and cached (``decode`` False: another rank
        decoded it, so it is decoded here only when the shared cache lacks it)."""
        arrays = self.cache.load("images", self.key(path), what="cached image")
        if arrays is not None:
            return torch.from_numpy(arrays["pixels"])
        if not decode:
            # Another rank decoded it, but its write to the shared cache failed (a full disk: that
            # rank warned): decode it here too rather than stop the run.
            log.debug("image %s is not in the shared cache; decoding it on this rank", self.display(path))
        image = self.pil_steps(load_rgb(path, shown=self.display(path)))
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        array = np.ascontiguousarray(array.transpose(2, 0, 1))
        self.cache.save("images", self.key(path), {"pixels": array})
        with self._lock:
            self.decodes += 1
        return torch.from_numpy(array)

    def _submit(self, path: str, decode: bool) -> Future:
        if self.num_workers > 0:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="decode")
            return self._pool.submit(self._load, path, decode)
        future: Future = Future()          # no threads: decoded now, in this thread
        try:
            future.set_result(self._load(path, decode))
        except BaseException as error:  # noqa: BLE001 - handed to whoever reads the image
            future.set_exception(error)
        return future

    def prepare(self, paths: Sequence[str]) -> int:
        """Schedule every image of ``paths`` not in the bank yet (the image cache, else a decode);
        returns how many were new.

        Returns at once, except under torchrun, where each rank decodes its share of the images
        before the ranks read the others' from the cache.
        """
        wanted = [p for p in dict.fromkeys(paths) if p not in self._images]
        if not wanted:
            return 0
        if self.dist.world == 1:
            for path in wanted:
                self._images[path] = self._submit(path, decode=True)
            return len(wanted)
        mine = set(wanted[self.dist.rank::self.dist.world])
        own = {path: self._submit(path, decode=True) for path in wanted if path in mine}
        for future in own.values():
            future.result()                # decoded and in the cache before the others look
        self.dist.barrier()
        for path in wanted:
            self._images[path] = own[path] if path in own else self._submit(path, decode=False)
        return len(wanted)

    # ---------------------------------------------------------------- reading
    def image(self, path: str) -> torch.Tensor:
        """``uint8 [3, H, W]`` of one image (waits for its decode)."""
        self.prepare([path])
        return self._images[path].result()

    def pixels(self, paths: Sequence[str]) -> torch.Tensor:
        """``uint8 [N, 3, H, W]`` of ``paths``."""
        self.prepare(paths)
        return torch.stack([self.image(p) for p in paths]) if paths else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, 3, H, W]`` -> the model's input ``float32 [B, 3, H, W]`` on the bank's device,
        computed exactly as ``ToTensor`` + ``Normalize`` do."""
        x = pixels.to(self.device, non_blocking=True).to(torch.float32).div(255)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(mean[:, None, None]).div_(std[:, None, None])

    def batches(self, paths: Sequence[str], batch_size: int, *,
                indices: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """Model inputs for ``paths`` in order, ``batch_size`` at a time, each as soon as its
        images are decoded; ``indices`` keeps only those batches (torchrun sharding)."""
        starts = list(range(0, len(paths), batch_size))
        numbers = list(range(len(starts)) if indices is None else indices)
        self.prepare([p for n in numbers for p in paths[starts[n]:starts[n] + batch_size]])
        for number in numbers:
            pixels = torch.stack([self.image(p) for p in paths[starts[number]:starts[number] + batch_size]])
            if self.device.type == "cuda":
                pixels = pixels.pin_memory()
            yield self.normalise(pixels)
