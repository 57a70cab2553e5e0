"""DICOM images (common/data/dicom.py, through common/data/images.py): files written here with pydicom,
their 8-bit pixels computed by hand from the DICOM rules (modality LUT, then the VOI LUT or the
first window, else min-max; MONOCHROME1 inverted), and DICOM files counted as images in every
layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset as DicomDataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEGLSLossless, RLELossless

from common.data.images import check_image, is_image_file, load_rgb
from common.data.registry import load_dataset
from common.errors import UserError
from datatrees import class_tree, one_line_error, write_dicom


def grey(path: Path) -> np.ndarray:
    """The decoded image's one grey channel (asserting the three are equal)."""
    rgb = np.asarray(load_rgb(path))
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


def row(*values: int, dtype=np.uint16) -> np.ndarray:
    return np.array([values], dtype=dtype)


def linear_window(x: float, center: float, width: float) -> int:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255, written out by hand."""
    if x <= center - 0.5 - (width - 1) / 2:
        return 0
    if x > center - 0.5 + (width - 1) / 2:
        return 255
    return int(np.rint(((x - (center - 0.5)) / (width - 1) + 0.5) * 255))


def test_monochrome2_without_a_window_is_min_max_scaled(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", row(0, 1000, 3000, 4000))
    # (v - 0) / 4000 * 255: 0, 63.75, 191.25, 255
    assert grey(path).tolist() == [[0, 64, 191, 255]]


def test_monochrome1_is_inverted(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", row(0, 1000, 3000, 4000), photometric="MONOCHROME1")
    assert grey(path).tolist() == [[255, 191, 64, 0]]


def test_rescale_then_window(tmp_path):
    stored = [312, 462, 512, 612, 712]
    path = write_dicom(tmp_path / "ct.dcm", row(*stored), RescaleSlope=2, RescaleIntercept=-1024,
                       WindowCenter=0, WindowWidth=401)
    hounsfield = [2 * s - 1024 for s in stored]                 # -400, -100, 0, 200, 400
    expected = [linear_window(h, 0, 401) for h in hounsfield]
    assert expected == [0, 64, 128, 255, 255]                   # clipped outside the window
    assert grey(path).tolist() == [expected]


def test_a_multi_valued_window_uses_its_first_pair(tmp_path):
    stored = [312, 462, 512, 612, 712]
    path = write_dicom(tmp_path / "ct.dcm", row(*stored), RescaleSlope=2, RescaleIntercept=-1024,
                       WindowCenter=[0, 300], WindowWidth=[401, 50])
    assert grey(path).tolist() == [[0, 64, 128, 255, 255]]


def _voi_lut(first_mapped: int, bits: int, data: list[int]) -> Sequence:
    item = DicomDataset()
    item.add(DataElement(0x00283002, "US", [len(data), first_mapped, bits]))    # LUT Descriptor
    item.add(DataElement(0x00283006, "US", data))                                # LUT Data
    return Sequence([item])


def test_voi_lut_sequence_comes_before_the_window(tmp_path):
    path = write_dicom(tmp_path / "lut.dcm", row(5, 10, 11, 12, 13, 50),
                       VOILUTSequence=_voi_lut(10, 8, [0, 50, 100, 255]),
                       WindowCenter=1000, WindowWidth=10)
    # below the first mapped value: the first entry; beyond the table: the last (8-bit LUT: as is)
    assert grey(path).tolist() == [[0, 0, 50, 100, 255, 255]]


def test_a_16_bit_voi_lut_is_scaled_by_its_bit_depth(tmp_path):
    path = write_dicom(tmp_path / "lut16.dcm", row(0, 1, 2, 3), VOILUTSequence=_voi_lut(0, 16, [0, 1000, 30000, 65535]))
    assert grey(path).tolist() == [[0, round(1000 * 255 / 65535), round(30000 * 255 / 65535), 255]]


def test_16_bit_stored_values_are_not_clipped(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", row(0, 1365, 2730, 4095), bits_stored=12)
    assert grey(path).tolist() == [[0, 85, 170, 255]]


def test_signed_pixels_min_max_and_window(tmp_path):
    values = row(-1000, -500, 200, 1000, dtype=np.int16)
    path = write_dicom(tmp_path / "signed.dcm", values, signed=True)
    # (v + 1000) / 2000 * 255: 0, 63.75, 153, 255
    assert grey(path).tolist() == [[0, 64, 153, 255]]
    stored = [-1000, -250, 0, 250, 1000]
    path = write_dicom(tmp_path / "signed_window.dcm", row(*stored, dtype=np.int16), signed=True,
                       WindowCenter=0, WindowWidth=1001)
    assert grey(path).tolist() == [[linear_window(v, 0, 1001) for v in stored]] == [[0, 64, 128, 191, 255]]


def test_rgb_dicom_keeps_its_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "colour.dcm", pixels, photometric="RGB")
    assert np.array_equal(np.asarray(load_rgb(path)), pixels)


def test_a_dicom_without_suffix_is_found_by_its_magic(tmp_path):
    path = write_dicom(tmp_path / "IM000001", row(0, 4000))
    text = tmp_path / "notes"
    text.write_text("x" * 200)
    assert is_image_file(path) and not is_image_file(text)
    assert check_image(path) is None and grey(path).tolist() == [[0, 255]]


def test_a_dcm_written_without_the_preamble_is_read(tmp_path):
    path = write_dicom(tmp_path / "raw.dcm", row(0, 4000), preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert check_image(path) is None and grey(path).tolist() == [[0, 255]]


def test_a_compressed_syntax_without_its_decoder_names_the_file_and_what_to_install(tmp_path):
    path = write_dicom(tmp_path / "ls.dcm", row(0, 200, dtype=np.uint8), syntax=JPEGLSLossless)
    for call in (check_image, load_rgb):
        with pytest.raises(UserError) as err:
            call(path)
        message = one_line_error(err)
        assert "ls.dcm" in message and "JPEG-LS" in message and "pip install pylibjpeg pylibjpeg-libjpeg" in message


def test_a_compressed_syntax_with_its_decoder_passes_the_check(tmp_path):
    # RLE has a decoder in pydicom itself: the cheap check lets it through.
    path = write_dicom(tmp_path / "rle.dcm", row(0, 4000), syntax=RLELossless)
    assert check_image(path) is None


def test_truncated_dicom_says_so(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    data = path.read_bytes()
    path.write_bytes(data[:-40])                         # cut inside the pixel data
    assert "truncated" in check_image(path) and "download it again" in check_image(path)
    with pytest.raises(UserError) as err:
        load_rgb(path)
    assert "cut.dcm" in one_line_error(err) and "download it again" in one_line_error(err)
    header_only = tmp_path / "head.dcm"
    header_only.write_bytes(data[:300])                  # cut before the pixel data
    assert "truncated" in check_image(header_only)


def test_multi_frame_dicom_is_skipped_with_its_reason(tmp_path):
    path = write_dicom(tmp_path / "cine.dcm", np.zeros((4, 4), np.uint8), NumberOfFrames=2)
    assert "multi-frame" in check_image(path)
    with pytest.raises(UserError) as err:
        load_rgb(path)
    assert "cine.dcm" in one_line_error(err) and "multi-frame" in one_line_error(err)


def test_dicom_files_are_images_in_every_layout(tmp_path):
    # folders: .dcm and a file without suffix in class folders
    root = class_tree(tmp_path / "pm", {"MDT - Adapta": 6, "STJ - Assurity": 6}, "Train")
    write_dicom(root / "Train" / "MDT - Adapta" / "scan.dcm", row(0, 9))
    write_dicom(root / "Train" / "STJ - Assurity" / "1.2.840.10008.5", row(0, 7))
    ds = load_dataset("pacemaker", root)
    names = {Path(p).name for p in ds.table["path"]}
    assert {"scan.dcm", "1.2.840.10008.5"} <= names and len(ds.table) == 14 and not ds.unused
    # a manifest naming .dcm files
    rows = [(str(write_dicom(tmp_path / "m" / f"{c}{i}.dcm", row(i, 99 - i))), c) for c in "ab" for i in range(6)]
    csv = tmp_path / "m" / "labels.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(csv, index=False)
    assert len(load_dataset("manifest", manifest=csv).table) == 12
    # APTOS: <id_code>.dcm beside the CSV's ids
    aptos = tmp_path / "aptos"
    ids = [f"id{i:03d}" for i in range(12)]
    for i, ident in enumerate(ids):
        write_dicom(aptos / "train_images" / f"{ident}.dcm", row(i, 50 + i))
    pd.DataFrame({"id_code": ids, "diagnosis": [i % 2 for i in range(12)]}).to_csv(aptos / "train.csv", index=False)
    assert sorted(Path(p).name for p in load_dataset("aptos", aptos).table["path"]) == [f"{i}.dcm" for i in ids]
