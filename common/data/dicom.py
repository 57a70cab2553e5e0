"""DICOM images (``.dcm``, or any file with the ``DICM`` magic at byte 128), read with pydicom.

Grey images go to 8 bits the way a DICOM viewer shows them by default:

1. the modality LUT (Rescale Slope/Intercept, or a Modality LUT Sequence) turns stored values
   into modality values (e.g. Hounsfield units);
2. the VOI LUT Sequence, else the first window (Window Center/Width, multi-valued: the first
   pair) - pydicom's ``apply_voi_lut``, which clips outside the window as the standard defines -
   and its output range (``0..2^n-1`` for a LUT of n bits; for a window the range pydicom maps
   it onto) is scaled linearly onto 0..255;
3. with neither, min-max over the image's modality values onto 0..255;
4. MONOCHROME1 (0 is white) inverted: ``255 - v``.

RGB and YBR images come out of pydicom as RGB; more than 8 bits are rescaled by their bit depth
(Bits Stored), as for 16-bit PNGs.  PALETTE COLOR goes through its colour LUT.  A multi-frame
file is not one image: it is skipped with its reason.

A compressed transfer syntax whose decoder is not installed is a :class:`UserError` naming the
file and what to ``pip install`` (an environment problem every file of that syntax shares, so the
run stops at the first).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from common.errors import UserError

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

_MAGIC_OFFSET = 128
_MAGIC = b"DICM"
# pydicom names plugins by module; the pip package is not always that name.
_PIP_NAMES = {"gdcm": "python-gdcm"}
# The plugin suggested first: plain wheels on every platform.
_PREFERRED = ("pylibjpeg", "pyjpegls", "gdcm")


def has_dicom_magic(path: Path | str) -> bool:
    """True if the file holds ``DICM`` at byte 128 (the DICOM Part 10 preamble)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_MAGIC_OFFSET + len(_MAGIC))
    except OSError:
        return False
    return head[_MAGIC_OFFSET:] == _MAGIC


def is_dicom(path: Path | str) -> bool:
    """A ``.dcm``/``.dicom`` file, or one with the DICOM magic whatever its name."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES or has_dicom_magic(path)


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (the decoders and LUT functions)
    except ImportError:
        raise UserError("reading DICOM files needs pydicom; install it: pip install pydicom==3.0.2") from None
    return pydicom


def _read(path: Path):
    """The dataset of ``path`` (pixel data read, not decoded)."""
    pydicom = _pydicom()
    # force: a .dcm written without the 128-byte preamble is still DICOM.
    return pydicom.dcmread(path, force=True)


def _install_hint(missing: list[str]) -> str:
    """``pip install a b`` for the first plugin pydicom names, the others as alternatives."""
    commands = []
    missing = sorted(missing, key=lambda line: next(
        (i for i, name in enumerate(_PREFERRED) if line.startswith(name)), len(_PREFERRED)))
    for line in missing:      # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
        needs = line.split(" - requires ", 1)[-1].split(" and ")
        names = [re.split(r"[<>=!~ ]", need.strip())[0] for need in needs]
        commands.append("pip install " + " ".join(_PIP_NAMES.get(n, n) for n in names if n and n != "numpy"))
    if not commands:
        return "pydicom names no plugin for it; convert the files to uncompressed DICOM or PNG"
    return commands[0] + (f" (or {'; or '.join(commands[1:])})" if len(commands) > 1 else "")


def _check_decoder(ds, shown: str) -> None:
    """A :class:`UserError` if the pixel data is compressed in a syntax no installed plugin decodes."""
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UserError(f"cannot decode DICOM {shown}: pydicom has no decoder for its transfer syntax "
                        f"{syntax.name}; convert the file to an uncompressed DICOM or a PNG") from None
    if not decoder.is_available:
        raise UserError(f"cannot decode DICOM {shown}: its pixel data is compressed as {syntax.name}, and no "
                        f"decoder for it is installed; install one: {_install_hint(decoder.missing_dependencies)}")


def check_dicom(path: Path | str) -> str | None:
    """Cheap validity check of a DICOM file: None if it holds one whole image, else a short reason.

    Reads the file (no decode); a missing decoder is a :class:`UserError`.
    """
    path = Path(path)
    pydicom = _pydicom()
    if path.name.upper() == "DICOMDIR":
        return "DICOMDIR index, not an image"
    try:
        ds = _read(path)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        return f"not a readable DICOM file ({' '.join(str(exc).split())[:120]})"
    if "PixelData" not in ds:
        # pydicom stops quietly where a file ends: a cut download looks like this.
        return "no pixel data (truncated: download it again; or a DICOM that holds no image)"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame DICOM ({frames} frames), not one image; export the frame to use"
    _check_decoder(ds, str(path))
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not syntax.is_compressed:
        from pydicom.pixels.utils import get_expected_length

        try:
            expected = get_expected_length(ds)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            return f"corrupt DICOM image header ({' '.join(str(exc).split())[:120]})"
        if len(ds.PixelData) < expected:
            return "truncated (incomplete pixel data: download it again)"
    return None


def _window_range(ds, arr: np.ndarray) -> tuple[float, float]:
    """The output range of the VOI step pydicom applied: a LUT's nominal ``0..2^n-1``, or what a
    window maps values far below and far above it onto."""
    from pydicom.pixels import apply_voi_lut

    if ds.get("VOILUTSequence") and ds.VOILUTSequence[0].get("LUTDescriptor") is not None \
            and ds.VOILUTSequence[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    with np.errstate(over="ignore"):
        ends = apply_voi_lut(np.array([-1e300, 1e300]), ds, index=0)
    return float(ends[0]), float(ends[1])


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi == lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint(np.clip((values - lo) * (255.0 / (hi - lo)), 0, 255)).astype(np.uint8)


def _grey(ds, arr: np.ndarray) -> np.ndarray:
    """Stored values -> 8-bit grey (modality LUT, VOI LUT or first window else min-max, MONOCHROME1)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds)
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if has_lut or has_window:
        if has_lut and np.issubdtype(values.dtype, np.floating):
            values = np.rint(values).astype(np.int64)   # a LUT is indexed by integers
        lo, hi = _window_range(ds, values)
        grey = _scale(np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64), lo, hi)
    else:
        values = values.astype(np.float64)
        grey = _scale(values, float(values.min()), float(values.max())) if values.size else values.astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _colour(ds, arr: np.ndarray) -> np.ndarray:
    """RGB (YBR already converted by pydicom) or PALETTE COLOR -> 8-bit RGB ``[H, W, 3]``."""
    from pydicom.pixels import apply_color_lut

    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)[..., :3]
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        bits = int(ds.BitsStored)
    if bits <= 8:
        return arr.astype(np.uint8)
    return np.rint(arr.astype(np.float64) * (255.0 / (2 ** bits - 1))).astype(np.uint8)


def dicom_rgb(path: Path | str, shown: str) -> np.ndarray:
    """The 8-bit RGB pixels ``uint8 [H, W, 3]`` of a DICOM image (see the module docstring).

    Raises :class:`UserError` naming the file as ``shown`` if it cannot be decoded.
    """
    pydicom = _pydicom()
    try:
        ds = _read(Path(path))
        if "PixelData" not in ds:
            raise ValueError("no pixel data (truncated: download it again)")
        _check_decoder(ds, shown)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(f"multi-frame DICOM ({ds.NumberOfFrames} frames); export the frame to use")
        arr = ds.pixel_array
        photometric = str(ds.get("PhotometricInterpretation", "")).upper()
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            return np.repeat(_grey(ds, arr)[:, :, None], 3, axis=2)
        if photometric in ("RGB", "PALETTE COLOR") or photometric.startswith("YBR"):
            return _colour(ds, arr)
        raise ValueError(f"unsupported Photometric Interpretation {photometric!r}")
    except UserError:
        raise
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, KeyError, AttributeError,
            TypeError, RuntimeError, NotImplementedError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if "less than expected" in reason:
            reason = "truncated (incomplete pixel data: download it again)"
        raise UserError(f"cannot decode DICOM image {shown}: {reason}; replace or remove the file and run "
                        "again") from None
