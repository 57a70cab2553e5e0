"""Image decoding that survives what real downloads contain.

Two entry points:

* :func:`check_image` is the cheap validity check the dataset loaders run on every file
  (header parse + ``verify()``; for JPEG also the end-of-image marker), so truncated, empty and
  AppleDouble ``._*`` files are skipped and reported before any model runs.
* :func:`load_rgb` is the full decode used for feature extraction: EXIF orientation applied,
  every mode converted to 8-bit RGB, 16-bit images rescaled by their bit depth (never clipped).

DICOM files (``.dcm``, or the ``DICM`` magic whatever the name) go through :mod:`.dicom`;
:func:`is_image_file` is how the loaders tell an image from other files.

Choices where the contract is silent:

* Alpha channels (LA, PA, RGBA, P with transparency) are *dropped* (PIL ``convert("RGB")``),
  not composited: the colour under a transparent pixel is kept as stored.  Medical images
  rarely carry meaningful alpha, and compositing would change pixel values wherever alpha is
  partial.
* 16-bit grey (``I;16``, ``I;16B``, ``I;16L``) -> ``round(v * 255 / 65535)``.  PIL opens 16-bit
  RGB / grey+alpha PNGs and TIFFs as 8-bit ``RGB``/``RGBA`` already, keeping the high byte
  (``v >> 8``): that too is a rescale by bit depth, so it is accepted as is.
* 32-bit int ``I``: values within 0..65535 are treated as 16-bit data (some PIL versions open
  16-bit PNG/TIFF as ``I``); anything outside that range has no known bit depth and is
  min-max scaled to 0..255 (keeps order, never clips).
* Float ``F``: within [0, 1] -> x255; within [0, 255] -> as is; within [0, 65535] -> 16-bit
  rescale; otherwise min-max.  NaN becomes 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.data.dicom import DICOM_SUFFIXES, check_dicom, dicom_rgb, has_dicom_magic, is_dicom
from common.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
) | DICOM_SUFFIXES

TRUNCATED = "truncated (incomplete download: download it again)"

# The first bytes of the formats PIL reads here: a file that starts like one but does not
# parse was cut short, not "not an image".
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

# Operating-system litter, ignored without a word (compared lower-case).  ``__MACOSX`` is the
# folder macOS zip archives put their metadata in: a directory, never a class.
_IGNORED_NAMES = frozenset({"thumbs.db", ".ds_store", "desktop.ini", "__macosx"})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})

# How many bytes from the end of a JPEG we look at for the EOI marker.
_JPEG_TAIL_BYTES = 4096


def is_ignored(path: Path | str) -> bool:
    """True for files (and folders) to ignore silently: hidden names, Thumbs.db, .DS_Store,
    desktop.ini, __MACOSX.

    AppleDouble files (``._name``) are *not* ignored: they look like images (``._scan.png``)
    and must be reported as skipped, so a user learns that a copy brought them along.
    """
    name = Path(path).name
    if name.startswith("._"):
        return False
    return name.startswith(".") or name.lower() in _IGNORED_NAMES


def is_image_file(path: Path | str) -> bool:
    """True for a file the loaders take for an image: an image suffix (DICOM's included), or the
    DICOM magic whatever its name (DICOM files often have none, or a UID for a name)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES or has_dicom_magic(path)


def _not_an_image(path: Path) -> str:
    """Why a file PIL cannot identify is no image: cut short, a web page, or something else."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return TRUNCATED
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"{")):
        return "not an image (a web page or error message saved under an image name: download it again)"
    return "not an image"


def _jpeg_has_eoi(path: Path) -> bool:
    """True if the file ends with the JPEG end-of-image marker FF D9 (zero padding allowed)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - _JPEG_TAIL_BYTES))
        tail = fh.read()
    return tail.rstrip(b"\x00").endswith(b"\xff\xd9")


def check_image(path: Path | str) -> str | None:
    """Cheap validity check: None if the file looks like a whole image, else a short reason.

    No full decode: ``Image.open`` parses the header, ``verify()`` walks PNG chunks and their
    CRCs (so a cut PNG fails); ``verify()`` does nothing for JPEG, so there we check the
    end-of-image marker instead.  Formats whose ``verify()`` is a no-op and that we cannot
    check cheaply (TIFF, BMP, GIF, WebP: rare in these datasets) are fully loaded.
    """
    path = Path(path)
    if path.name.startswith("._"):
        return "AppleDouble metadata file"
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if is_dicom(path):
        return check_dicom(path)
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt == "JPEG":
            if not _jpeg_has_eoi(path):
                return TRUNCATED
        elif fmt != "PNG":
            # verify() checks nothing for these formats; a full load is the only check.
            with Image.open(path) as im:
                im.load()
    except UnidentifiedImageError:
        return _not_an_image(path)
    except Image.DecompressionBombError:
        return "too large to decode safely"
    except (OSError, SyntaxError, EOFError, ValueError, IndexError) as exc:
        text = " ".join(str(exc).split()).lower()
        if "truncat" in text or isinstance(exc, EOFError):
            return TRUNCATED
        return f"corrupt ({' '.join(str(exc).split())})"
    return None


def _rescale(arr: np.ndarray, top: float) -> np.ndarray:
    """Map 0..top linearly onto 0..255 (rounded) as uint8."""
    return np.rint(arr.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def _min_max(arr: np.ndarray) -> np.ndarray:
    """Min-max scale to 0..255: for data whose bit depth is unknown (keeps order, no clipping)."""
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT_MODES:
        grey = _rescale(np.asarray(im), 65535.0)
    elif mode == "I":
        arr = np.asarray(im)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            grey = _rescale(arr, 65535.0)
        else:
            grey = _min_max(arr)
    elif mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0:
            grey = _min_max(arr)
        elif hi <= 1.0:
            grey = _rescale(arr, 1.0)
        elif hi <= 255.0:
            grey = np.rint(arr).astype(np.uint8)
        elif hi <= 65535.0:
            grey = _rescale(arr, 65535.0)
        else:
            grey = _min_max(arr)
    else:
        # L, 1, P, LA, PA, RGBA, CMYK, YCbCr, ...: PIL's conversion (alpha dropped).
        return im.convert("RGB")
    return Image.fromarray(grey, mode="L").convert("RGB")


def load_rgb(path: str | Path, shown: str | None = None) -> Image.Image:
    """Decode an image fully: EXIF orientation applied, converted to 8-bit RGB.

    Raises :class:`UserError` naming the file (as ``shown``, e.g. relative to the dataset, else
    its path) if it cannot be decoded.  (The loaders' cheap check reads headers, PNG CRCs and the
    JPEG end marker; a pixel stream that is damaged inside can only fail here.)
    """
    path = Path(path)
    if is_dicom(path):
        return Image.fromarray(dicom_rgb(path, shown or str(path)))
    try:
        with Image.open(path) as im:
            im.load()
            try:
                oriented = ImageOps.exif_transpose(im)
            except (OSError, SyntaxError, ValueError, KeyError, TypeError) as exc:
                # A malformed EXIF block should not cost the image: keep it as stored.
                logger.warning("ignoring unreadable EXIF orientation in %s (%s)", path, exc)
                oriented = None
            return _to_rgb(oriented if oriented is not None else im.copy())
    except (OSError, SyntaxError, EOFError, ValueError, IndexError,
            Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if "truncat" in reason.lower() or isinstance(exc, EOFError):
            raise UserError(f"cannot decode image {shown or path}: it is {TRUNCATED}, or remove it and run "
                            "again") from None
        raise UserError(
            f"cannot decode image {shown or path}: {reason}; replace or remove the file and run again"
        ) from None
