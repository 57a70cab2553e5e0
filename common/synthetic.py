"""Synthetic datasets in each dataset's *real* layout, for ``--demo`` and the tests.

:func:`make_synthetic` writes a small tree that the real loader in :mod:`common.datasets`
reads unchanged:

* pacemaker: ``Train/<class>/NNNN.png`` and ``Test/<class>/NNNN.png``; class names such as
  ``MDT - Adapta`` (two or more share a manufacturer, so manufacturer accuracy differs from
  top-1);
* orthonet: flat files ``<code>_NNNN.png`` with real class codes (01-08 hip, 21-24 knee);
* aptos: ``train.csv`` (``id_code,diagnosis``) + ``train_images/<id_code>.png`` with hex ids,
  and an unlabelled ``test.csv`` + ``test_images/``.

Every image is 8-bit RGB PNG: a perfectly uniform background (one exact value, no noise,
well over half of the image; the planted register neurons of the demo model fire on such
patches) and a class-dependent foreground object (brightness, shape, size and aspect by
class; seeded jitter of position, size and texture inside the object only), which a linear
probe on random-ViT features separates easily.  Content is deterministic for ``seed``: each
image draws from its own ``numpy.random.Generator`` seeded with (seed, dataset, class, index).

A finished tree carries a hidden marker file recording its parameters (the loaders ignore
hidden files); calling again with the same parameters returns the tree untouched (same
mtimes, so feature caches stay valid).  Any other non-empty folder is refused: we never write
into a folder we did not create.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from common.datasets import APTOS_CLASSES, ORTHONET_CLASSES
from common.errors import UserError

logger = logging.getLogger(__name__)

_MARKER = ".synthetic.json"

# Real device names; the first two share a manufacturer.
PACEMAKER_NAMES = (
    "MDT - Adapta", "MDT - Advisa", "STJ - Assurity", "BOS - Accolade", "BIO - Evia",
    "STJ - Endurity", "BOS - Altrua", "BIO - Entovis", "MDT - Sensia", "STJ - Accent",
    "BOS - Essentio", "BIO - Effecta", "SOR - Reply", "MDT - Azure", "STJ - Zephyr",
)
# Hip and knee codes interleaved, so a small demo has both kinds.
_ORTHONET_ORDER = ("01", "21", "02", "22", "03", "23", "04", "24", "05", "06", "07", "08")

_DEFAULT_CLASSES = {"pacemaker": 4, "orthonet": 4, "aptos": 5}
_MAX_CLASSES = {"pacemaker": 45, "orthonet": len(ORTHONET_CLASSES), "aptos": len(APTOS_CLASSES)}
_DATASET_IDS = {"pacemaker": 1, "orthonet": 2, "aptos": 3}


def _pacemaker_names(classes: int) -> list[str]:
    names = list(PACEMAKER_NAMES[:classes])
    names += [f"GEN - Model {i:02d}" for i in range(len(names), classes)]
    return names


def _object_image(rng: np.random.Generator, size: int, k: int, n_classes: int, style: str
                  ) -> np.ndarray:
    """One HxWx3 uint8 image: uniform background plus the class-``k`` object."""
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
    return img


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="RGB").save(path, format="PNG", compress_level=1)


def make_synthetic(name: str, root: str | Path, *, classes: int | None = None, per_class: int = 12,
                   image_size: int = 96, seed: int = 0) -> Path:
    """Write a small synthetic ``name`` dataset in its real layout under ``root``.

    ``per_class`` images per class in all (pacemaker: about a fifth of them go to ``Test/``).
    Returns the folder to pass as ``--image_path`` (``root`` itself).
    """
    name = str(name).lower()
    if name not in _DEFAULT_CLASSES:
        raise UserError(f"no synthetic generator for {name!r}; choose pacemaker, orthonet or aptos")
    classes = _DEFAULT_CLASSES[name] if classes is None else int(classes)
    if not 2 <= classes <= _MAX_CLASSES[name]:
        raise UserError(f"classes={classes} for synthetic {name}; use 2..{_MAX_CLASSES[name]}")
    if per_class < 3:
        raise UserError(f"per_class={per_class}; use at least 3 so every split gets an image")
    if image_size < 16:
        raise UserError(f"image_size={image_size}; use at least 16 pixels")

    root = Path(root)
    params = {"name": name, "classes": classes, "per_class": per_class,
              "image_size": image_size, "seed": seed, "version": 1}
    marker = root / _MARKER
    if root.exists():
        if marker.is_file() and json.loads(marker.read_text()) == params:
            return root
        if any(root.iterdir()):
            raise UserError(f"{root} is not empty; pass an empty or new folder for the synthetic "
                            f"{name} dataset")
    root.mkdir(parents=True, exist_ok=True)

    def image(k: int, n: int, style: str) -> np.ndarray:
        rng = np.random.default_rng([seed, _DATASET_IDS[name], k, n])
        return _object_image(rng, image_size, k, classes, style)

    if name == "pacemaker":
        n_test = max(1, round(per_class * 0.2))
        for k, cls in enumerate(_pacemaker_names(classes)):
            for n in range(per_class):
                split = "Test" if n < n_test else "Train"
                _save(image(k, n, "pacemaker"), root / split / cls / f"{n:04d}.png")
    elif name == "orthonet":
        codes = sorted(_ORTHONET_ORDER[:classes])
        for k, code in enumerate(codes):
            for n in range(per_class):
                _save(image(k, n, "implant"), root / f"{code}_{n:04d}.png")
    else:
        ids_rng = np.random.default_rng([seed, _DATASET_IDS[name]])
        used: set[str] = set()

        def new_id() -> str:
            while True:
                ident = ids_rng.bytes(6).hex()
                if ident not in used:
                    used.add(ident)
                    return ident

        rows = []
        for n in range(per_class):
            for k in range(classes):
                ident = new_id()
                _save(image(k, n, "fundus"), root / "train_images" / f"{ident}.png")
                rows.append((ident, k))
        pd.DataFrame(rows, columns=["id_code", "diagnosis"]).to_csv(root / "train.csv", index=False)
        test_ids = []
        for n in range(max(2, per_class // 2)):
            ident = new_id()
            # Unlabelled, as on Kaggle; drawn from every grade in turn.
            _save(image(n % classes, per_class + n, "fundus"), root / "test_images" / f"{ident}.png")
            test_ids.append(ident)
        pd.DataFrame({"id_code": test_ids}).to_csv(root / "test.csv", index=False)

    marker.write_text(json.dumps(params))
    logger.info("wrote synthetic %s dataset (%d classes x %d images) to %s",
                name, classes, per_class, root)
    return root
