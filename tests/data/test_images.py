"""Image decoding: validity checks and conversion of every mode to oriented 8-bit RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.images import IMAGE_SUFFIXES, check_image, is_ignored, load_rgb
from common.errors import UserError


def _noise_rgb(seed: int = 0, size: int = 48) -> Image.Image:
    # Noise compresses badly, so the file is long enough to cut in meaningful places.
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def _write(tmp_path: Path, name: str, im: Image.Image, **kw) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_image_suffixes_are_lowercase_and_complete():
    assert IMAGE_SUFFIXES == {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm", ".dicom"}


@pytest.mark.parametrize("name", [".hidden.png", ".DS_Store", "Thumbs.db", "thumbs.db",
                                  "desktop.ini", "__MACOSX"])
def test_litter_is_ignored(name):
    assert is_ignored(Path("/data") / name)


@pytest.mark.parametrize("name", ["._scan.png", "scan.png", "MDT - Adapta", "notes.txt"])
def test_real_files_and_appledouble_are_not_ignored(name):
    # ._* files must reach check_image so they are *reported*, not silently dropped.
    assert not is_ignored(Path("/data") / name)


def test_check_image_accepts_valid_files(tmp_path):
    for name in ("a.png", "a.jpg", "a.bmp", "a.tif", "a.gif", "a.webp"):
        assert check_image(_write(tmp_path, name, _noise_rgb())) is None, name


def test_check_image_flags_truncated_png_and_jpeg(tmp_path):
    for name in ("cut.png", "cut.jpg"):
        path = _write(tmp_path, name, _noise_rgb())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        assert check_image(path) == "truncated (incomplete download: download it again)", name


def test_check_image_allows_zero_padding_after_jpeg_eoi(tmp_path):
    path = _write(tmp_path, "padded.jpg", _noise_rgb())
    path.write_bytes(path.read_bytes() + b"\x00" * 100)
    assert check_image(path) is None


def test_check_image_flags_empty_appledouble_and_non_images(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    apple = _write(tmp_path, "._scan.png", _noise_rgb())  # even a valid PNG body
    text = tmp_path / "fake.png"
    text.write_text("not an image at all")
    assert check_image(empty) == "empty file"
    assert check_image(apple) == "AppleDouble metadata file"
    assert check_image(text) == "not an image"


def test_16bit_keeps_relative_intensities(tmp_path):
    arr = np.array([[0, 30000], [60000, 65535]], dtype=np.uint16)
    path = _write(tmp_path, "x16.png", Image.fromarray(arr))
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    out = np.asarray(load_rgb(path))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    grey = out[..., 0]
    assert grey[1, 0] > grey[0, 1] > grey[0, 0]            # 60000 brighter than 30000
    assert grey[1, 0] < 255 and grey[0, 1] < 255            # neither clipped
    assert grey[0, 1] == round(30000 * 255 / 65535)         # rescaled by bit depth
    assert grey[1, 0] == round(60000 * 255 / 65535)
    assert grey[1, 1] == 255


def test_16bit_big_endian_tiff(tmp_path):
    raw = np.array([60000, 30000], dtype=">u2").tobytes()
    path = _write(tmp_path, "x16.tif", Image.frombytes("I;16B", (2, 1), raw))
    grey = np.asarray(load_rgb(path))[0, :, 0]
    assert list(grey) == [round(60000 * 255 / 65535), round(30000 * 255 / 65535)]


def test_32bit_int_and_float_modes_are_not_clipped(tmp_path):
    big = np.array([[0, 100000, 200000]], dtype=np.int32)   # beyond 16 bits: min-max
    grey = np.asarray(load_rgb(_write(tmp_path, "i.tif", Image.fromarray(big))))[0, :, 0]
    assert list(grey) == [0, 128, 255]
    flt = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)     # unit floats: x255
    grey = np.asarray(load_rgb(_write(tmp_path, "f.tif", Image.fromarray(flt))))[0, :, 0]
    assert list(grey) == [0, 128, 255]


def test_cmyk_palette_rgba_grey_become_rgb(tmp_path):
    cmyk = _write(tmp_path, "c.tif", Image.new("CMYK", (4, 4), (0, 255, 255, 0)))
    assert tuple(np.asarray(load_rgb(cmyk))[0, 0]) == (255, 0, 0)

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert tuple(np.asarray(load_rgb(_write(tmp_path, "p.png", pal)))[0, 0]) == (10, 200, 30)

    # Alpha is dropped (the stored colour is kept), as documented in common.data.images.
    rgba = _write(tmp_path, "a.png", Image.new("RGBA", (4, 4), (10, 20, 30, 0)))
    out = load_rgb(rgba)
    assert out.mode == "RGB" and tuple(np.asarray(out)[0, 0]) == (10, 20, 30)

    grey = _write(tmp_path, "l.png", Image.new("L", (4, 4), 77))
    assert tuple(np.asarray(load_rgb(grey))[0, 0]) == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high with a red top-left corner; Orientation 6 means "rotate 90
    # degrees clockwise to display", which puts the stored top-left at the top-right.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:6, :6] = (255, 0, 0)
    im = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)                      # width, height swapped
    px = np.asarray(out).astype(int)
    assert px[2, 17, 0] > 200 and px[2, 17, 1] < 60   # top-right is red
    assert px[2, 2, 0] < 60                           # top-left is not


def test_load_rgb_raises_one_line_user_error_naming_the_path(tmp_path):
    path = _write(tmp_path, "cut.png", _noise_rgb())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError) as err:
        load_rgb(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_rgb_does_not_modify_the_file(tmp_path):
    path = _write(tmp_path, "x.png", Image.new("L", (8, 8), 5))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    load_rgb(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before



@pytest.mark.parametrize("name, fmt", [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.gif", "GIF"), ("a.bmp", "BMP"),
                                       ("a.tif", "TIFF"), ("a.webp", "WEBP")])
def test_a_download_cut_inside_the_header_is_truncated_not_another_type(tmp_path, name, fmt):
    path = _write(tmp_path, name, _noise_rgb(), format=fmt)
    path.write_bytes(path.read_bytes()[:12])
    assert check_image(path) == "truncated (incomplete download: download it again)"


def test_a_web_page_saved_as_an_image_says_so(tmp_path):
    path = tmp_path / "scan.png"
    path.write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    assert check_image(path).startswith("not an image (a web page or error message")


def test_load_rgb_of_a_cut_file_says_download_it_again(tmp_path):
    path = _write(tmp_path, "cut.png", _noise_rgb())
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(UserError) as err:
        load_rgb(path)
    assert "cut.png" in str(err.value) and "download it again" in str(err.value)
