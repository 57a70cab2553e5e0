"""The image bank (common/data/imagebank.py): the decode-once path gives the model bit-identical inputs,
each image is decoded once and never again from a warm cache, a damaged cache entry is decoded
again."""

from __future__ import annotations

import logging

import numpy as np
import PIL.Image
import pytest
import torch

from common.data.cache import Cache
from common.data.imagebank import ImageBank
from common.data.images import load_rgb


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(5):
        size = (int(rng.integers(60, 300)), int(rng.integers(60, 300)))
        array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        mode = "RGB" if index % 2 else "L"
        image = PIL.Image.fromarray(array).convert(mode)
        path = folder / f"image {index}.png"
        image.save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("fixture", ["clip_b16", "dinov2_s14"])
def test_bank_inputs_are_bit_identical_to_the_preprocess(fixture, request, image_files, tmp_path):
    backbone = request.getfixturevalue(fixture)
    bank = ImageBank(backbone.preprocess, cache=Cache(tmp_path / "cache"))
    got = torch.cat(list(bank.batches(image_files, 2)))
    expected = torch.stack([backbone.preprocess(load_rgb(p)) for p in image_files])
    assert torch.equal(got, expected)
    assert bank.decodes == len(image_files)

    # a second bank (a re-run) reads the image cache: nothing decoded, the same pixels
    again = ImageBank(backbone.preprocess, cache=Cache(tmp_path / "cache"))
    assert torch.equal(torch.cat(list(again.batches(image_files, 3))), expected)
    assert again.decodes == 0


def test_damaged_image_cache_entry_is_decoded_again(clip_b16, image_files, tmp_path, caplog):
    cache = Cache(tmp_path / "cache")
    bank = ImageBank(clip_b16.preprocess, cache=cache)
    bank.prepare(image_files)
    entry = cache.path("images", bank.key(image_files[2]))
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF                    # one flipped byte inside the pixels
    entry.write_bytes(bytes(data))
    fresh = ImageBank(clip_b16.preprocess, cache=cache)
    with caplog.at_level(logging.WARNING):
        pixels = fresh.pixels(image_files)
    assert fresh.decodes == 1
    assert str(entry) in caplog.text
    assert torch.equal(pixels, bank.pixels(image_files))
