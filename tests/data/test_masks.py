"""Object masks (common/data/masks.py): what counts as inside, and that a mask goes through its
image's resize and crop exactly (checked against crops computed by hand), at every preset's input
size; bad masks are one-line errors naming the file."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from common.data.imagebank import split_preprocess
from common.data.masks import check_mask, inside, mask_at_input, mask_steps, preprocess_mask, read_mask
from common.errors import UserError
from common.models.families import get_family
from common.models.presets import resolve_model


def _save(array: np.ndarray, path, mode: str | None = None) -> str:
    PIL.Image.fromarray(array, mode=mode).save(path)
    return str(path)


def _pil_steps(model: str):
    choice = resolve_model(model)
    return split_preprocess(get_family(choice.family).preprocess(choice.config))[0]


def _checker(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width)) < 0.5


# ------------------------------------------------------------------------- what is inside


@pytest.mark.parametrize("values, expected", [
    ([0, 1, 1, 0], [False, True, True, False]),             # {0, 1}: 1 is inside
    ([0, 255, 0, 255], [False, True, False, True]),         # {0, 255}: 255 is inside
    ([0, 128, 128, 0], [False, True, True, False]),         # two other values: > 127
    ([38, 200, 38, 38], [False, True, False, False]),
    ([1, 1, 1, 1], [True, True, True, True]),               # all 1 within {0, 1}: everything inside
    ([0, 0, 0, 0], [False, False, False, False]),
])
def test_what_is_inside(values, expected):
    assert inside(np.array(values)).tolist() == expected


def test_read_mask_modes(tmp_path):
    truth = _checker(0, 6, 9)
    grey = _save(np.where(truth, 255, 0).astype(np.uint8), tmp_path / "grey.png")
    ones = _save(truth.astype(np.uint8), tmp_path / "ones.png")                       # values 0 / 1
    bilevel = tmp_path / "bilevel.png"
    PIL.Image.fromarray(truth).save(bilevel)                                             # mode "1"
    colour = np.zeros((6, 9, 3), np.uint8)
    colour[truth] = (200, 30, 30)                                                        # a red mask
    red = _save(colour, tmp_path / "red.png")
    palette = PIL.Image.fromarray(truth.astype(np.uint8), mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)                                 # index 1 drawn red
    palette.save(tmp_path / "palette.png")
    sixteen = PIL.Image.fromarray(np.where(truth, 65535, 0).astype(np.uint16))
    sixteen.save(tmp_path / "sixteen.png")
    for path in (grey, ones, bilevel, red, tmp_path / "palette.png", tmp_path / "sixteen.png"):
        assert np.array_equal(read_mask(str(path)), truth), path


def test_exif_orientation_applies_to_the_mask(tmp_path):
    truth = _checker(1, 4, 7)
    image = PIL.Image.fromarray(np.where(truth, 255, 0).astype(np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6                                      # rotate 90 degrees clockwise to display
    image.save(tmp_path / "m.png", exif=exif)                # PNG: a JPEG mask would not be binary
    assert read_mask(str(tmp_path / "m.png")).shape == (7, 4)
    photo = PIL.Image.fromarray(np.zeros((4, 7, 3), np.uint8))
    photo.save(tmp_path / "photo.jpg", exif=exif)
    _save(np.zeros((7, 4), np.uint8), tmp_path / "displayed.png")                       # the displayed size
    assert check_mask(str(tmp_path / "displayed.png"), str(tmp_path / "photo.jpg")) is None


# ------------------------------------------------------------------------- the image's preprocessing


def test_mask_follows_resize_and_centre_crop_by_hand(tmp_path):
    """CLIP's steps (resize the short side to 224 bicubic, centre crop 224) on a 448 x 896 image:
    nearest-neighbour halves it to 224 x 448, taking source pixel 2i + 1 (PIL samples the centre of
    each target pixel, (i + 0.5) * 2); the crop starts at column round((448 - 224) / 2) = 112."""
    mask = _checker(2, 448, 896)
    out = preprocess_mask(mask, mask_steps(_pil_steps("clip")))
    by_hand = mask[1::2, 1::2][:, 112:112 + 224]
    assert out.shape == (224, 224) and out.dtype == bool
    assert np.array_equal(out, by_hand)


def test_mask_follows_rad_dino_at_518_by_hand():
    """RAD-DINO: resize the short side to 518, centre crop 518, on a 401 x 601 image: target row i
    samples source row floor((i + 0.5) * 401 / 518), columns of the 776-wide resize likewise (odd
    source sizes: no sample falls exactly on a pixel border, where rounding could go either way), and
    the crop starts at column round((776 - 518) / 2) = 129."""
    mask = _checker(3, 401, 601)
    out = preprocess_mask(mask, mask_steps(_pil_steps("rad-dino")))
    rows = np.floor((np.arange(518) + 0.5) * 401 / 518).astype(int)
    width = int(518 * 601 / 401)
    cols = np.floor((np.arange(width) + 0.5) * 601 / width).astype(int)
    left = int(round((width - 518) / 2.0))
    assert (width, left) == (776, 129)
    assert out.shape == (518, 518)
    assert np.array_equal(out, mask[rows][:, cols][:, left:left + 518])


@pytest.mark.parametrize("model", ["clip", "dinov2", "rad-dino", "uni"])
def test_mask_lines_up_with_the_preprocessed_image(model):
    """A white rectangle drawn into an image and into its mask: after each preset's own preprocessing
    the image is bright exactly where the mask is inside, up to one pixel at the rectangle's edge
    (where the image's bicubic or bilinear resize blends)."""
    image = np.zeros((300, 500), np.uint8)
    image[60:200, 150:420] = 255
    steps = _pil_steps(model)
    seen = np.asarray(steps(PIL.Image.fromarray(image).convert("RGB")))[..., 0] > 127
    mask = preprocess_mask(image > 0, mask_steps(steps))
    assert mask.shape == seen.shape and mask.any() and not mask.all()
    differ = mask != seen
    assert differ.mean() < 0.02
    edges = np.zeros_like(mask)
    edges[1:] |= mask[1:] != mask[:-1]
    edges[:-1] |= mask[1:] != mask[:-1]
    edges[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edges[:, :-1] |= mask[:, 1:] != mask[:, :-1]
    assert not (differ & ~edges).any()


def test_the_image_steps_are_not_changed():
    steps = _pil_steps("clip")
    before = str(steps)
    mask_steps(steps)
    assert str(steps) == before and "bicubic" in before


def test_mask_at_input_checks_size_and_names_the_file(tmp_path):
    image = _save(np.zeros((40, 60, 3), np.uint8), tmp_path / "image.png")
    good = _save(np.zeros((40, 60), np.uint8), tmp_path / "good.png")
    small = _save(np.zeros((40, 59), np.uint8), tmp_path / "small.png")
    (tmp_path / "text.png").write_text("not an image")
    steps = mask_steps(_pil_steps("clip"))
    assert mask_at_input(good, image, steps).shape == (224, 224)
    with pytest.raises(UserError, match=r"mask .*small\.png is 59x40 px but its image .*image\.png is 60x40"):
        mask_at_input(small, image, steps)
    with pytest.raises(UserError, match=r"mask .*text\.png cannot be read .*binary mask image"):
        mask_at_input(str(tmp_path / "text.png"), image, steps)
    assert "not found" in check_mask(str(tmp_path / "absent.png"), image)


def test_a_mask_with_more_than_two_values_is_not_binary(tmp_path):
    image = _save(np.zeros((4, 5, 3), np.uint8), tmp_path / "image.png")
    grey = _save(np.arange(20, dtype=np.uint8).reshape(4, 5) * 12, tmp_path / "grey.png")     # 20 grey levels
    two = _save(np.where(_checker(1, 4, 5), 200, 10).astype(np.uint8), tmp_path / "two.png")
    assert check_mask(two, image) is None
    assert read_mask(two).tolist() == _checker(1, 4, 5).tolist()
    problem = check_mask(grey, image)
    assert problem.startswith(f"mask {grey} is not binary (20 distinct values") and "\n" not in problem
    with pytest.raises(UserError, match=r"grey\.png is not binary .*give a binary mask image"):
        mask_at_input(grey, image, mask_steps(_pil_steps("clip")))
