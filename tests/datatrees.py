"""Building dataset trees by hand for the data-layer tests: small images with unique content,
class folders, CSVs, OS litter, and DICOM files written with pydicom."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

_counter = itertools.count()


def png(path: Path, fmt: str = "PNG") -> Path:
    """A small valid image with unique content (so no accidental leaks or duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(next(_counter)).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path, format=fmt)
    return path


def raw_png(path: bytes) -> None:
    """A PNG at a bytes path (a name that need not be valid UTF-8)."""
    arr = np.random.default_rng(next(_counter)).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with open(path, "wb") as fh:
        Image.fromarray(arr, "RGB").save(fh, format="PNG")


def class_tree(root: Path, sizes: dict[str, int], split_dir: str | None = None) -> Path:
    """``sizes[class]`` PNGs ``NNN.png`` in ``root[/split_dir]/<class>/``."""
    for cls, n in sizes.items():
        folder = root / split_dir / cls if split_dir else root / cls
        for i in range(n):
            png(folder / f"{i:03d}.png")
    return root


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of everything under ``root`` (to show nothing was changed)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def litter(folder: Path) -> None:
    """What copies from a Mac or Windows leave behind."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"junk")


def apple_double(path: Path) -> Path:
    """A ``._name`` AppleDouble file beside ``path`` (looks like an image, is not one)."""
    double = path.with_name("._" + path.name)
    double.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    return double


def write_csv(path: Path, frame: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def one_line_error(excinfo) -> str:
    """The message of a raised ``UserError``, asserted to be one non-empty line."""
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def split_counts(ds) -> dict[str, int]:
    return ds.table["split"].value_counts().to_dict()


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                signed: bool = False, syntax: str | None = None, preamble: bool = True, **elements) -> Path:
    """A DICOM file holding ``pixels`` (``[H, W]`` grey or ``[H, W, 3]`` RGB; uint8/uint16/int16), written
    with pydicom; ``elements`` are set as they are (``WindowCenter=...``, ``RescaleSlope=...``).  ``syntax``:
    a transfer syntax UID (default explicit VR little endian); a compressed one gets a dummy fragment.
    ``preamble=False`` writes the dataset without the 128-byte preamble and ``DICM`` magic."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in elements.items():
        setattr(ds, key, value)
    if pydicom.uid.UID(meta.TransferSyntaxUID).is_compressed:
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7\x00\x0b" + b"\x00" * 10])
    else:
        ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble)
    return path
