"""The register-neuron intervention of docs/intervention.md.

Hand-checkable tensors with the answers written out, then the same rule checked on real
architectures (random weights) through the hook manager: trained registers left alone, the
modified activations flowing on through the block, and each image of a batch on its own.
"""

from __future__ import annotations

import pytest
import torch
from conftest import names, run

from common.models.hooks import HookedViT, mlp_post, resid_post
from common.registers.intervention import Intervention, apply_intervention, signed_max

S = [1, 3]          # intervened neurons
OTHER = [0, 2, 4]   # neurons that must never change

# Three images, tokens [CLS, p1, p2, p3, p4, reg] (P = 4, R = 1), neurons n0..n4 (D = 5).
# Neurons outside S carry large values: they must play no part in the maximum.
HAND = torch.tensor([
    # image 0: largest value 7 (patch p1) beats the most negative -3 (register)  -> m = 7
    [[50., 2., -60., -1., 9.],     # CLS
     [0., 7., 0., -2., 0.],        # p1
     [1., 1., 1., 0., 1.],         # p2
     [2., 1., 2., 1., 2.],         # p3
     [3., 1., 3., 0., 3.],         # p4
     [0., 0., 0., -3., 0.]],       # reg
    # image 1: the most negative -9 (at CLS) has the larger magnitude than 4      -> m = -9
    [[0., -9., 0., 4., 0.],
     [0., 1., 0., 2., 0.],
     [0., 3., 0., 1., 100.],
     [0., -1., 0., 1., 0.],
     [0., 1., 0., 0., 0.],
     [0., 0., 0., 0., 0.]],
    # image 2: tie |5| == |-5| (the -5 sits on the register position)           -> m = -5
    [[0., 0., -70., 0., 0.],
     [0., 1., 0., 1., 0.],
     [0., 2., 0., 1., 0.],
     [0., 1., 0., 5., 0.],
     [0., 0., 0., 1., 0.],
     [0., -5., 0., 0., 0.]],
])
SIGNED_MAX = torch.tensor([7., -9., -5.])

# Patch values of the S neurons after each normal_values rule, per image: [P, |S|].
EXPECTED_PATCHES = {
    "same": HAND[:, 1:5][:, :, S].clone(),
    "zero": torch.zeros(3, 4, 2),
    # mean over the four patches, per neuron (CLS and register excluded)
    "mean": torch.tensor([
        [[2.5, -0.25]] * 4,
        [[1.0, 1.0]] * 4,
        [[1.0, 2.0]] * 4,
    ]),
    # values above mean + std (unbiased) replaced by the mean:
    # img0 n1 [7,1,1,1]: mean 2.5, std 3  -> 7 > 5.5 goes;   n3 [-2,0,1,0]: mean -0.25, std 1.258
    #      -> 1 kept (it would go with the biased std 1.090)
    # img1 n1 [1,3,-1,1]: mean 1, std 1.633 -> 3 goes;        n3 [2,1,1,0]: mean 1, std 0.816 -> 2 goes
    # img2 n1 [1,2,1,0]: mean 1, std 0.816 -> 2 goes;         n3 [1,1,5,1]: mean 2, std 2    -> 5 goes
    "only_outliers": torch.tensor([
        [[2.5, -2.], [1., 0.], [1., 1.], [1., 0.]],
        [[1., 1.], [1., 1.], [-1., 1.], [1., 0.]],
        [[1., 1.], [1., 1.], [1., 2.], [0., 1.]],
    ]),
}


def expected_hand(normal_values: str, scale: float) -> torch.Tensor:
    out = HAND.clone()
    for b in range(3):
        out[b, 5, S] = scale * SIGNED_MAX[b]
        out[b, 1:5, 1] = EXPECTED_PATCHES[normal_values][b, :, 0]
        out[b, 1:5, 3] = EXPECTED_PATCHES[normal_values][b, :, 1]
    return out


@pytest.mark.parametrize("scale", [1.0, 2.0])
@pytest.mark.parametrize("normal_values", ["zero", "mean", "only_outliers", "same"])
def test_hand_checked_tensor(normal_values, scale):
    activations = HAND.clone()
    out = apply_intervention(activations, S, num_prefix_tokens=1, num_registers=1,
                             scale=scale, normal_values=normal_values)
    assert torch.equal(activations, HAND), "the input tensor was modified"
    torch.testing.assert_close(out, expected_hand(normal_values, scale), rtol=0, atol=1e-6)
    # spelled out: CLS untouched, neurons outside S untouched, registers = scale * own max
    assert torch.equal(out[:, 0], HAND[:, 0])
    assert torch.equal(out[:, :, OTHER], HAND[:, :, OTHER])
    assert out[:, 5, S].tolist() == [[scale * 7] * 2, [scale * -9] * 2, [scale * -5] * 2]


def test_each_image_uses_its_own_maximum():
    """One image's outlier must not leak into another image's registers."""
    out = apply_intervention(HAND, S, num_prefix_tokens=1, num_registers=1)
    for b in range(3):
        alone = apply_intervention(HAND[b:b + 1], S, num_prefix_tokens=1, num_registers=1)
        assert torch.equal(out[b:b + 1], alone)
        assert out[b, 5, 1].item() == SIGNED_MAX[b].item()


def test_signed_max_rule():
    values = torch.tensor([[3., -1., 2.], [1., -4., 2.], [2., -2., 1.], [-7., -1., -2.]])
    # largest if strictly larger in magnitude, else the most negative (ties -> most negative)
    assert signed_max(values, dims=(1,)).tolist() == [3., -4., -2., -7.]


def test_several_registers_and_trained_registers_left_alone():
    """num_prefix_tokens = 5 (CLS + 4 trained registers), P = 3, R = 2."""
    tokens = torch.tensor([
        [0., 1., 0.],     # CLS
        [9., 3., 9.],     # trained registers: large-ish, and must not count as patches
        [9., 3., 9.],
        [9., -2., 9.],
        [9., 3., 9.],
        [1., 8., 1.],     # p1
        [1., 2., 1.],     # p2
        [1., 2., 1.],     # p3
        [0., 0., 0.],     # reg 1
        [0., 0., 0.],     # reg 2
    ])[None]
    for normal_values, patches in (("zero", [0., 0., 0.]), ("mean", [4., 4., 4.]),
                                   # [8,2,2]: mean 4, std sqrt(12) = 3.46 -> 8 > 7.46 goes
                                   ("only_outliers", [4., 2., 2.]), ("same", [8., 2., 2.])):
        out = apply_intervention(tokens, [1], num_prefix_tokens=5, num_registers=2,
                                 scale=0.5, normal_values=normal_values)
        assert torch.equal(out[0, :5], tokens[0, :5]), "CLS or a trained register was changed"
        assert out[0, 5:8, 1].tolist() == patches, normal_values
        assert out[0, 8:, 1].tolist() == [4.0, 4.0]  # 0.5 * 8
        assert torch.equal(out[0, :, [0, 2]], tokens[0, :, [0, 2]])


def test_per_neuron_max_option():
    out = apply_intervention(HAND, S, num_prefix_tokens=1, num_registers=1, per_neuron_max=True)
    # per neuron over all 6 positions: img0 n1 max 7 / n3 [-1..2, -3] -> -3;
    # img1 n1 -9 / n3 4; img2 n1 [-5..2] -> -5 / n3 5
    assert out[:, 5, S].tolist() == [[7., -3.], [-9., 4.], [-5., 5.]]


def test_unknown_normal_values_is_a_programmers_error():
    """A user's normal_values is checked where it enters (tests/app/test_settings.py); the library
    refuses an unknown rule instead of leaving the patches as they are."""
    with pytest.raises(ValueError, match="normal_values"):
        apply_intervention(HAND, S, num_prefix_tokens=1, num_registers=1, normal_values="median")


# ------------------------------------------------------------------------------------------
# On real architectures (random weights)


def own_signed_max(values: torch.Tensor) -> torch.Tensor:
    """Per image, over every token and neuron of ``values`` [B, N, S]: written independently."""
    result = []
    for image in values:
        largest, most_negative = image.max(), image.min()
        result.append(largest if largest.abs() > most_negative.abs() else most_negative)
    return torch.stack(result)


def test_reg_model_intervention_flows_on_and_spares_trained_registers(dinov2_s14_reg, images):
    bb = dinov2_s14_reg
    hooked = HookedViT(bb)
    layer, neurons, scale = 3, [5, 77, 300, 1000], 2.0
    prefix, num_patches, R = 5, 256, 2
    assert bb.num_prefix_tokens == prefix
    x = images[:2]
    block = bb.blocks[layer]
    mid = {}
    handle = block.norm2.register_forward_hook(lambda m, args, out: mid.__setitem__("x", args[0]))
    try:
        plain, base = run(hooked, x, num_registers=R, capture=names(neurons=(layer,)))
        iv = Intervention(neurons={layer: neurons}, scale=scale, normal_values="mean")
        moved, cache = run(hooked, x, num_registers=R, intervention=iv,
                                  capture=names(neurons=(layer,), residual=(layer,)))
    finally:
        handle.remove()
    before, after = base[mlp_post(layer)], cache[mlp_post(layer)]
    assert after.shape == (2, prefix + num_patches + R, bb.mlp_width)
    # CLS and the 4 trained registers: exactly what they are without the intervention
    assert torch.equal(after[:, :prefix], before[:, :prefix])
    # neurons outside S untouched everywhere
    others = [i for i in range(bb.mlp_width) if i not in neurons]
    assert torch.equal(after[:, :, others], before[:, :, others])
    # registers: scale * signed max over all positions and S of the unmodified activations
    m = own_signed_max(before[:, :, neurons])
    torch.testing.assert_close(after[:, -R:, neurons], (scale * m)[:, None, None].expand(2, R, len(neurons)),
                               rtol=0, atol=1e-6)
    # patches: the mean over patches (trained registers excluded), per neuron
    patch_mean = before[:, prefix:prefix + num_patches, neurons].mean(dim=1, keepdim=True)
    torch.testing.assert_close(after[:, prefix:prefix + num_patches, neurons],
                               patch_mean.expand(2, num_patches, len(neurons)), rtol=0, atol=1e-6)
    # the modified activations are what flows on: block output = mid + ls2(fc2(modified))
    with torch.no_grad():
        expected_residual = mid["x"] + block.ls2(block.mlp.fc2(after))
    torch.testing.assert_close(cache[resid_post(layer)], expected_residual, rtol=0, atol=1e-5)
    assert (moved - plain).abs().max() > 1e-4, "the intervention changed nothing downstream"


def test_interventions_on_two_layers_compose(clip_b16, images):
    """Layer 4 is intervened on the activations it gets after layer 2's intervention."""
    hooked = HookedViT(clip_b16)
    x = images[:1]
    first = Intervention(neurons={2: [10, 20]}, scale=1.5)
    both = Intervention(neurons={2: [10, 20], 4: [7, 2000, 3000]}, scale=1.5, normal_values="zero")
    _, base = run(hooked, x, num_registers=1, intervention=first, capture=names(neurons=(4,)))
    _, cache = run(hooked, x, num_registers=1, intervention=both, capture=names(neurons=(4,)))
    before, after = base[mlp_post(4)], cache[mlp_post(4)]
    S4 = [7, 2000, 3000]
    m = own_signed_max(before[:, :, S4])
    torch.testing.assert_close(after[:, -1, S4], (1.5 * m)[:, None].expand(1, 3), rtol=0, atol=1e-6)
    assert torch.equal(after[:, 1:-1, S4], torch.zeros(1, 196, 3))
    assert torch.equal(after[:, 0], before[:, 0])


@pytest.mark.parametrize("fixture", ["dinov2_s14", "dinov2_s14_reg"])  # ViT-S: cheap on a CPU
def test_batch_equals_images_alone(fixture, request, images):
    bb = request.getfixturevalue(fixture)
    hooked = HookedViT(bb)
    iv = Intervention(neurons={2: [0, 11, 222], 5: [3, 4]}, scale=1.0, normal_values="zero")
    capture = names(residual=(6,))
    pooled, cache = run(hooked, images, num_registers=1, intervention=iv, capture=capture)
    assert pooled.shape[0] == 3
    for b in range(3):
        alone, alone_cache = run(hooked, images[b:b + 1], num_registers=1, intervention=iv, capture=capture)
        torch.testing.assert_close(pooled[b:b + 1], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(cache[resid_post(6)][b:b + 1], alone_cache[resid_post(6)],
                                   rtol=0, atol=1e-5)
    # the three images do differ (otherwise the check above proves nothing)
    assert (pooled[0] - pooled[1]).abs().max() > 1e-2
