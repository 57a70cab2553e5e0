"""Object masks: binary images marking a region of interest per image, for the attention
localization of docs/localization.md (a ``mask`` column in a manifest, the demo's synthetic masks).

A mask is an image file of its image's size (after the image's EXIF orientation, which is applied
to the mask too).  Its values decide what is inside:

* values within {0, 1} (a mode-``1`` image, a palette of indices 0 and 1): 1 is inside;
* values within {0, 255}: 255 is inside;
* any other two values (or one): values above 127 are inside.

A mask with more than two distinct values (a greyscale map, a JPEG's ringing, a photograph) is not
binary: a :class:`UserError` naming it, as is a mask of another size than its image.

Colour masks count their brightest colour channel (alpha dropped); palette masks their palette
indices; 16-bit and float masks their raw values.

A mask then goes through the image's own PIL preprocessing (resize, crop) with every
interpolation set to nearest-neighbour, so that it stays binary and lines up with the image the
model sees pixel for pixel (:func:`preprocess_mask`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.data.dicom import is_dicom
from common.data.images import load_rgb
from common.errors import UserError

# EXIF orientations that swap width and height (transposed or rotated by 90 degrees).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112
_READ_ERRORS = (OSError, SyntaxError, EOFError, ValueError, IndexError, UnidentifiedImageError,
                Image.DecompressionBombError)
FIX = "give a binary mask image (PNG, 0/255 or 0/1) of the image's size"


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of ``im`` after its EXIF orientation, from the header alone."""
    width, height = im.size
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        orientation = None            # a malformed EXIF block: the image is kept as stored
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _image_size(path: str) -> tuple[int, int] | None:
    """(width, height) of an image as the loaders decode it; None when it cannot be read (the
    image check reports that)."""
    try:
        if is_dicom(path):
            return load_rgb(path).size
        with Image.open(path) as im:
            return _oriented_size(im)
    except (UserError, *_READ_ERRORS):
        return None


def _checked(mask: str, image: str, shown: Callable[[str], str]) -> tuple[np.ndarray | None, str | None]:
    """``(bool [H, W], None)`` for a good mask, ``(None, one-line error)`` for a bad one."""
    if not Path(mask).is_file():
        return None, f"mask {shown(mask)} (of image {shown(image)}) not found; fix the mask column"
    try:
        values = read_mask(mask, shown(mask))
    except UserError as exc:
        return None, str(exc)
    expected = _image_size(image)
    height, width = values.shape
    if expected is not None and (width, height) != expected:
        return None, (f"mask {shown(mask)} is {width}x{height} px but its image {shown(image)} is "
                      f"{expected[0]}x{expected[1]}; {FIX}")
    return values, None


def check_mask(mask: str, image: str, shown: Callable[[str], str] = str) -> str | None:
    """None when ``mask`` can be read, is binary and has ``image``'s size; else a one-line error
    naming the mask (through ``shown``) and what to do.  Decodes the mask (small: one channel of
    two values), only the image's header."""
    return _checked(mask, image, shown)[1]


def inside(values: np.ndarray) -> np.ndarray:
    """``bool`` array of what is inside a mask with these pixel values (the module's rule; the
    caller has checked that there are at most two distinct values)."""
    if ((values == 0) | (values == 1)).all():
        return values == 1
    if ((values == 0) | (values == 255)).all():
        return values == 255
    return values > 127


def read_mask(path: str, shown: str | None = None) -> np.ndarray:
    """``bool [H, W]``: the mask at ``path`` at its own size, EXIF orientation applied.  A file that
    cannot be decoded is a :class:`UserError` naming it (as ``shown``)."""
    try:
        with Image.open(path) as im:
            im.load()
            try:
                oriented = ImageOps.exif_transpose(im)
            except (OSError, SyntaxError, ValueError, KeyError, TypeError):
                oriented = None
            im = oriented if oriented is not None else im.copy()
    except _READ_ERRORS as exc:
        raise UserError(f"mask {shown or path} cannot be read ({' '.join(str(exc).split())}); {FIX}") from None
    if im.mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(im)
    else:                                                   # LA, RGB, RGBA, CMYK, ...: the brightest channel
        values = np.asarray(im.convert("RGB")).max(axis=-1)
    distinct = np.unique(values)
    if distinct.size > 2:
        raise UserError(f"mask {shown or path} is not binary ({distinct.size} distinct values, e.g. "
                        f"{', '.join(f'{v:g}' for v in distinct[:4])}); {FIX}")
    return inside(values)


def _nearest(interpolation):
    """The nearest-neighbour counterpart of an interpolation setting (torchvision's enum, a PIL
    resampling code, or a name)."""
    from torchvision.transforms import InterpolationMode

    if isinstance(interpolation, InterpolationMode):
        return InterpolationMode.NEAREST
    if isinstance(interpolation, str):
        return "nearest"
    return Image.Resampling.NEAREST


def mask_steps(pil_steps: Callable) -> Callable:
    """The image's PIL steps (a ``Compose``) with every interpolation set to nearest-neighbour:
    geometry (resize, crop, pad) unchanged, so a mask lands where its image's pixels land."""
    steps = copy.deepcopy(pil_steps)
    for step in getattr(steps, "transforms", [steps]):
        if hasattr(step, "interpolation"):
            step.interpolation = _nearest(step.interpolation)
    return steps


def preprocess_mask(mask: np.ndarray, steps: Callable) -> np.ndarray:
    """``bool [h, w]``: ``mask`` (``bool [H, W]``) through ``steps`` (from :func:`mask_steps`), at the
    model's input size."""
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    out = np.asarray(steps(image))
    if out.ndim == 3:                                       # a step converted it to RGB
        out = out[..., 0]
    return out > 127


def mask_at_input(mask: str, image: str, steps: Callable, shown: Callable[[str], str] = str) -> np.ndarray:
    """``bool [h, w]``: the mask of ``image`` checked against the image's size, read and brought to
    the model's input by ``steps`` (:func:`mask_steps`); a bad mask is a :class:`UserError` naming it."""
    values, problem = _checked(mask, image, shown)
    if problem:
        raise UserError(problem)
    return preprocess_mask(values, steps)
