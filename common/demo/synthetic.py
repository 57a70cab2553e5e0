"""Synthetic datasets in each dataset's *real* layout, for ``--demo`` and the tests.

:func:`make_synthetic` writes a small tree that the real loader in :mod:`common.data.registry` reads
unchanged.  Where the files go is each dataset module's business (its ``SyntheticSpec``: the
layouts it can write, the first being the one most users have: Pacemaker ``Train/``/``Test/``
class folders, the OrthoNet Kaggle CSVs with image and mask files under
``orthonet data/orthonet data/``, the APTOS three-way release with doubled image folders); this
module draws the images.

Every image is 8-bit RGB PNG: a perfectly uniform background (one exact value, no noise,
well over half of the image; the planted register neurons of the demo model fire on such
patches) and a class-dependent foreground object (brightness, shape, size and aspect by
class; seeded jitter of position, size and texture inside the object only), which a linear
probe on random-ViT features separates easily.  Content is deterministic for ``seed``: each
image draws from its own ``numpy.random.Generator`` seeded with (seed, dataset, class, index).

Every image carries its known object mask (the object's silhouette, 8-bit grey, 0 or 255): in
every layout it is written to the hidden folder ``.masks/`` under the root, at the image's
relative path (:func:`synthetic_masks` finds them; the loaders ignore hidden folders), so the
demo measures attention localization (docs/demo.md).  The OrthoNet Kaggle layout also writes the
release's own mask files beside its training images, listed in train.csv's ``masks`` column.

A finished tree carries a hidden marker file recording its parameters (the loaders ignore
hidden files); calling again with the same parameters returns the tree untouched (same
mtimes, so feature caches stay valid).  Any other non-empty folder is refused: we never write
into a folder we did not create.  The tree is generated in a hidden sibling folder
(``.<name>.partial-<pid>-<random>``) and renamed into place when complete, so a run killed half-way
leaves no half-written dataset behind; the next call removes such a leftover, recognised by the
marker file inside it that names the process that wrote it (never any folder without it).
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.registry import dataset_kind
from common.errors import UserError
from common.io import write_bytes, write_json

logger = logging.getLogger(__name__)

_MARKER = ".synthetic.json"
_PARTIAL = ".synthetic-partial.json"
_VERSION = 3
MASK_FOLDER = ".masks"
_STYLES = ("pacemaker", "implant", "fundus")


def _object_image(rng: np.random.Generator, size: int, k: int, n_classes: int, style: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One HxWx3 uint8 image, uniform background plus the class-``k`` object, and the object's
    mask (``bool [H, W]``)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Class signal: brightness ramps with the class; shape, scale and aspect cycle with it.
    level = 95.0 + 140.0 * k / max(n_classes - 1, 1)
    shape = k % 3
    scale = (0.16, 0.24)[(k // 3) % 2] * size * (1.0 + rng.uniform(-0.05, 0.05))
    aspect = (1.0, 1.35)[k % 2]
    cx = size * (0.5 + rng.uniform(-0.08, 0.08))
    cy = size * (0.5 + rng.uniform(-0.08, 0.08))
    background = 0 if style == "fundus" else 24

    if style == "fundus":
        # The fundus disk itself is the object (dark surround as in real fundus photos).
        radius = size * (0.30 + 0.015 * k) * (1.0 + rng.uniform(-0.03, 0.03))
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        grey = np.full((size, size), level * 0.7, np.float32)
        # Lesion-like bright spots, more with a higher grade.
        for _ in range(2 * k):
            sx, sy = cx + rng.uniform(-0.6, 0.6) * radius, cy + rng.uniform(-0.6, 0.6) * radius
            grey[(xx - sx) ** 2 + (yy - sy) ** 2 <= (0.04 * size) ** 2] = 250.0
        tint = np.array([1.0, 0.62, 0.38], np.float32)
    else:
        rx, ry = scale, scale * aspect
        dx, dy = (xx - cx) / rx, (yy - cy) / ry
        if shape == 0:
            mask = dx ** 2 + dy ** 2 <= 1.0
        elif shape == 1:
            mask = (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
        else:
            r2 = dx ** 2 + dy ** 2
            mask = (r2 <= 1.0) & (r2 >= 0.3)
        if style == "pacemaker":
            # A lead wire leaving the device upwards.
            wire_x = cx + 0.15 * size * np.sin((yy / size) * 6.0 + rng.uniform(0, 6.3))
            mask |= (np.abs(xx - wire_x) <= 1.0) & (yy <= cy)
        grey = np.full((size, size), level, np.float32)
        tint = np.ones(3, np.float32)

    grey = grey + rng.normal(0.0, 6.0, (size, size)).astype(np.float32)
    img = np.full((size, size, 3), background, np.uint8)
    img[mask] = np.clip(grey[mask, None] * tint, 1, 255).astype(np.uint8)
    return img, mask


def _png(img: np.ndarray, path: Path) -> None:
    stream = io.BytesIO()
    Image.fromarray(img).save(stream, format="PNG", compress_level=1)
    write_bytes(path, stream.getvalue())


class _Painter:
    """Draws the images of one synthetic dataset (see :class:`common.data.dataset.Painter`) under
    ``root``, each with its object mask under ``root/.masks/``."""

    def __init__(self, name: str, classes: int, image_size: int, seed: int, style: str, root: Path) -> None:
        self.seed = seed
        self._dataset = zlib.crc32(name.encode())  # stable per dataset, no table to keep
        self._classes, self._size, self._style, self._root = classes, image_size, style, Path(root)

    def _draw(self, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self._dataset, k, n])
        return _object_image(rng, self._size, k, self._classes, self._style)

    def image(self, k: int, n: int, path: Path) -> None:
        image, mask = self._draw(k, n)
        _png(image, path)
        _png(_silhouette(mask), self._root / MASK_FOLDER / Path(path).relative_to(self._root))

    def mask(self, k: int, n: int, path: Path) -> None:
        _png(_silhouette(self._draw(k, n)[1]), path)


def _silhouette(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 255, 0).astype(np.uint8)


def synthetic_masks(root: str | Path, images: list[str]) -> dict[str, str]:
    """``{image: mask}`` for the ``images`` under a synthetic tree ``root`` whose object mask is
    there (under ``root/.masks/``); empty for any other folder."""
    root = Path(root)
    masks = {}
    for image in images:
        try:
            mask = root / MASK_FOLDER / Path(image).relative_to(root)
        except ValueError:                      # not under root
            continue
        if mask.is_file():
            masks[image] = str(mask)
    return masks


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _running(pid: object) -> bool:
    """True if another live process has this pid (then its folder is not a leftover)."""
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if os.name != "posix":
        return False  # no harmless liveness probe there; a leftover is the likely case
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(root: Path) -> None:
    """Remove temporary folders of killed generations for ``root`` (ours by their marker)."""
    if not root.parent.is_dir():
        return
    prefix = f".{root.name}.partial-"
    for entry in os.scandir(root.parent):
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        marker = _read_marker(Path(entry.path) / _PARTIAL)
        if marker is None or marker.get("target") != root.name or _running(marker.get("pid")):
            continue
        logger.info("removing %s, left over by an interrupted synthetic-data run", entry.path)
        shutil.rmtree(entry.path)


def _move_into_place(temporary: Path, root: Path, params: dict) -> None:
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()  # an empty folder the caller made: the finished tree takes its place
    try:
        os.rename(temporary, root)
    except OSError:
        # Another process finished the same tree first: use it, drop ours.
        if _read_marker(root / _MARKER) != params:
            raise
        shutil.rmtree(temporary)


def make_synthetic(name: str, root: str | Path, *, classes: int | None = None, per_class: int = 12,
                   image_size: int = 96, seed: int = 0, layout: str | None = None) -> Path:
    """Write a small synthetic ``name`` dataset in a real layout under ``root``.

    ``classes`` classes (the dataset's default when None) with ``per_class`` images each, in
    all splits together.  ``layout`` is one of the dataset module's synthetic layouts (None:
    the one most users have; e.g. aptos ``three_way``, ``three_way_single``, ``competition``,
    ``competition_doubled``; orthonet ``kaggle``, ``folders``, ``flat``; pacemaker ``folders``).
    Returns the folder to pass as ``--image_path`` (``root`` itself).
    """
    kind = dataset_kind(name)
    spec = kind.synthetic
    if spec is None:
        raise UserError(f"no synthetic generator for {kind.name!r}")
    layout = spec.layouts[0] if layout is None else str(layout)
    if layout not in spec.layouts:
        raise UserError(f"layout={layout!r} for synthetic {kind.name}; use one of {', '.join(spec.layouts)}")
    if spec.style not in _STYLES:
        raise ValueError(f"unknown synthetic style {spec.style!r} in the {kind.name} module")
    classes = spec.default_classes if classes is None else int(classes)
    if not 2 <= classes <= spec.max_classes:
        raise UserError(f"classes={classes} for synthetic {kind.name}; use 2..{spec.max_classes}")
    if per_class < 3:
        raise UserError(f"per_class={per_class}; use at least 3 so every split gets an image")
    if image_size < 16:
        raise UserError(f"image_size={image_size}; use at least 16 pixels")

    root = Path(root)
    params = {"name": kind.name, "layout": layout, "classes": classes, "per_class": per_class,
              "image_size": image_size, "seed": seed, "version": _VERSION}
    if root.exists():
        if _read_marker(root / _MARKER) == params:
            return root
        if not root.is_dir() or any(root.iterdir()):
            made = " (a synthetic dataset made with other parameters)" if (root / _MARKER).exists() else ""
            raise UserError(f"{root} is not empty{made}; pass an empty or new folder for the synthetic "
                            f"{kind.name} dataset")
    _remove_leftovers(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    temporary = root.parent / f".{root.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    temporary.mkdir()
    try:
        write_json(temporary / _PARTIAL, {"pid": os.getpid(), "target": root.name})
        spec.write(temporary, classes, per_class, layout,
                   _Painter(kind.name, classes, image_size, seed, spec.style, temporary))
        write_json(temporary / _MARKER, params)
        (temporary / _PARTIAL).unlink()
        _move_into_place(temporary, root, params)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info("wrote synthetic %s dataset (%s layout, %d classes x %d images) to %s",
                kind.name, layout, classes, per_class, root)
    return root
