"""Decoded images, feature extraction and the caches (docs/run.md, docs/performance.md): the decode-once path gives the
model bit-identical inputs, each image is decoded once and never again from a warm cache, the
features equal an independent computation, bf16 stays close to fp32, and a cache file that is
truncated, altered or foreign is reported and recomputed, never used."""

from __future__ import annotations

import logging

import numpy as np
import PIL.Image
import pytest
import torch

from common.data.cache import Cache, cache_key
from common.data.imagebank import ImageBank
from common.demo.fixture import fixture_images, make_planted_model
from common.io import read_checked_npz, write_checked_npz
from common.models.hooks import HookedViT
from common.registers.detection import detect_register_neurons
from common.registers.features import FeatureSet, extract_features


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
    from common.data.images import load_rgb

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


def test_clip_patch_mean_is_projected_like_cls(clip_b16, images):
    """``cls+patch_mean`` joins two halves of one 512-d space: the patch mean of the final-norm
    image-patch tokens goes through CLIP's projection, as the CLS token does."""
    visual = clip_b16.model
    tokens = {}
    handle = visual.ln_post.register_forward_hook(lambda m, a, out: tokens.__setitem__("final", out))
    try:
        with torch.no_grad():
            pooled = visual(images[:2])
    finally:
        handle.remove()
    features = extract_features(HookedViT(clip_b16), [images[:2]])
    expected_mean = tokens["final"][:, 1:].mean(dim=1) @ visual.proj
    torch.testing.assert_close(torch.from_numpy(features.patch_mean), expected_mean, rtol=0, atol=1e-5)
    assert torch.equal(torch.from_numpy(features.pooled), pooled)
    assert features.select("cls+patch_mean").shape == (2, 1024)


def test_bf16_features_stay_close_and_planted_neurons_still_rank_first():
    """bf16 autocast (what CUDA runs by default), checked on the CPU: features within 3% of fp32
    (relative L2 per image) and detection still ranks the planted neurons first."""
    fp32 = make_planted_model("dinov2", seed=0)
    bf16 = make_planted_model("dinov2", seed=0, precision="bf16")
    assert bf16.backbone.precision == "bf16"
    x = torch.stack([fp32.backbone.preprocess(PIL.Image.fromarray(im)) for im in fixture_images(6, seed=2)])
    a = extract_features(HookedViT(fp32.backbone), [x])
    b = extract_features(HookedViT(bf16.backbone), [x])
    relative = np.linalg.norm(a.pooled - b.pooled, axis=1) / np.linalg.norm(a.pooled, axis=1)
    assert relative.max() < 0.03, relative
    assert relative.max() > 0              # bf16 really ran
    result = detect_register_neurons(HookedViT(bf16.backbone), [x], detect_layer=-2, threshold=60)
    assert {(l, n) for l, n, _ in result.ranked[:3]} == set(bf16.planted)


def test_checked_cache_files(tmp_path, caplog):
    cache = Cache(tmp_path)
    key = cache_key({"kind": "features", "x": 1})
    features = FeatureSet(np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((3, 4), np.float32))
    cache.save("features", key, features.arrays())
    path = cache.path("features", key)
    assert read_checked_npz(path, key)["pooled"].tolist() == features.pooled.tolist()
    assert cache.load("features", key) is not None

    # zeroed arrays written back under the same name (a silently altered file): refused
    write_checked_npz(path, {"pooled": np.zeros((3, 4), np.float32), "patch_mean": np.ones((3, 4), np.float32)},
                      "another key")
    with caplog.at_level(logging.WARNING):
        assert cache.load("features", key) is None
    assert "written for another key" in caplog.text and str(path) in caplog.text
    # the arrays zeroed but key and checksum kept (altered in place): the checksum refuses it
    cache.save("features", key, features.arrays())
    with np.load(path) as data:
        content = {name: data[name] for name in data.files}
    content["pooled"] = np.zeros_like(content["pooled"])
    with open(path, "wb") as stream:
        np.savez(stream, **content)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cache.load("features", key) is None
    assert "checksum" in caplog.text
    # truncated
    cache.save("features", key, features.arrays())
    path.write_bytes(path.read_bytes()[:200])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cache.load("features", key) is None
    assert "unreadable" in caplog.text
    # a disabled cache (--no_cache) reads and writes nothing
    off = Cache(tmp_path / "off", enabled=False)
    off.save("features", key, features.arrays())
    assert off.load("features", key) is None and not (tmp_path / "off").exists()
