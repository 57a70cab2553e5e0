"""Feature extraction (docs/run.md, docs/performance.md): the features equal an independent
computation and bf16 stays close to fp32.  The image bank and the cache are tested in
tests/data/test_imagebank.py and tests/data/test_cache.py."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from common.demo.fixture import fixture_images, make_planted_model
from common.models.hooks import HookedViT
from common.registers.detection import detect_register_neurons
from common.registers.features import extract_features


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
