"""Decoded, preprocessed images: every image of a run is decoded once (SPEC §7, §9).

A backbone's preprocess is ``[PIL steps (resize, crop, ...)] -> ToTensor -> Normalize``.  The
PIL steps produce 8-bit pixels, so their output stored as ``uint8 [3, H, W]`` loses nothing:
``ToTensor`` and ``Normalize`` are applied per batch on the device, with the same elementwise
operations, and give bit-identical input tensors (tested).

:class:`ImageBank` holds the decoded images of a run in memory, fills itself in one parallel pass
(``DataLoader`` workers decode), and keeps each image in the preprocessed-image cache (one
checksummed file per image, keyed by the file's path, size and mtime and by the PIL steps), so a
re-run - also one with new ttr settings - decodes nothing.  Under torchrun each rank decodes its
share of the missing images and the cache is how the ranks share them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.cache import Cache
from common.distributed import Dist
from common.errors import UserError
from common.images import load_rgb

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


class _Decode(Dataset):
    """Item ``i``: the file ``paths[i]`` decoded and put through the PIL steps, ``uint8 [3, H, W]``."""

    def __init__(self, paths: Sequence[str], pil_steps: Callable, shown: Sequence[str]):
        self.paths = list(paths)
        self.pil_steps = pil_steps
        self.shown = list(shown)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | str]:
        try:
            image = self.pil_steps(load_rgb(self.paths[index], shown=self.shown[index]))
        except UserError as error:
            # Returned, not raised: an error raised in a worker would come back wrapped in the
            # worker's traceback; the main process raises it as the one-line message it is.
            return index, str(error)
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        return index, np.ascontiguousarray(array.transpose(2, 0, 1))


def _collate(items):
    return items


class ImageBank:
    """The decoded images of a run, by path (``uint8 [3, H, W]`` each).

    ``decodes`` counts the images decoded by this process (the benchmark's ``decodes_per_image``).
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
        self.images: dict[str, torch.Tensor] = {}
        self.decodes = 0

    # ---------------------------------------------------------------- keys
    def key(self, path: str) -> str:
        stat = os.stat(path)
        text = f"{IMAGE_CACHE_VERSION}|{self.preprocess_id}|{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    # ---------------------------------------------------------------- filling
    def prepare(self, paths: Sequence[str], desc: str = "decode images") -> None:
        """Make every image of ``paths`` available: memory, else the image cache, else decode
        (in parallel; under torchrun each rank decodes its share and the cache carries it over)."""
        wanted = [p for p in dict.fromkeys(paths) if p not in self.images]
        if not wanted:
            return
        missing = []
        for path in tqdm(wanted, desc="read image cache", unit="img", leave=False, disable=None):
            arrays = self.cache.load("images", self.key(path), what="cached image")
            if arrays is not None:
                self.images[path] = torch.from_numpy(arrays["pixels"])
            else:
                missing.append(path)
        if missing:
            mine = missing[self.dist.rank::self.dist.world] if self.dist.world > 1 else missing
            self._decode(mine, desc)
        if self.dist.world > 1:
            self.dist.barrier()
            for path in missing:
                if path not in self.images:
                    arrays = self.cache.load("images", self.key(path), what="cached image")
                    if arrays is None:
                        raise RuntimeError(f"image {path} was decoded by another rank but is not in the cache")
                    self.images[path] = torch.from_numpy(arrays["pixels"])

    def _decode(self, paths: list[str], desc: str) -> None:
        if not paths:
            return
        workers = min(self.num_workers, len(paths))
        loader = DataLoader(_Decode(paths, self.pil_steps, [self.display(p) for p in paths]), batch_size=1, shuffle=False, num_workers=workers,
                            collate_fn=_collate)
        with tqdm(total=len(paths), desc=desc, unit="img", disable=None) as progress:
            for ((index, result),) in loader:
                if isinstance(result, str):
                    raise UserError(result)
                path = paths[index]
                self.decodes += 1
                self.images[path] = torch.from_numpy(result)
                self.cache.save("images", self.key(path), {"pixels": result})
                progress.update(1)

    # ---------------------------------------------------------------- reading
    def pixels(self, paths: Sequence[str]) -> torch.Tensor:
        """``uint8 [N, 3, H, W]`` of ``paths`` (prepared on demand)."""
        self.prepare(paths)
        return torch.stack([self.images[p] for p in paths]) if paths else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, 3, H, W]`` -> the model's input ``float32 [B, 3, H, W]`` on the bank's device,
        computed exactly as ``ToTensor`` + ``Normalize`` do."""
        x = pixels.to(self.device, non_blocking=True).to(torch.float32).div(255)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(mean[:, None, None]).div_(std[:, None, None])

    def batches(self, paths: Sequence[str], batch_size: int, *,
                indices: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """Model inputs for ``paths`` in order, ``batch_size`` at a time; ``indices`` keeps only those
        batches (torchrun sharding)."""
        self.prepare(paths)
        starts = list(range(0, len(paths), batch_size))
        for number in (range(len(starts)) if indices is None else indices):
            chunk = paths[starts[number]:starts[number] + batch_size]
            pixels = torch.stack([self.images[p] for p in chunk])
            if self.device.type == "cuda":
                pixels = pixels.pin_memory()
            yield self.normalise(pixels)
