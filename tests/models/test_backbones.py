"""Backbone loading (docs/models.md): checkpoints in open_clip's and Meta's DINOv2 format load through
``weights=`` and reproduce in-memory models, the DINOv2 position embedding follows Meta's
224 px rule, weight errors are user errors naming the file, device selection, preprocessing.
"""

from __future__ import annotations

import re

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_images
from PIL import Image
from timm.layers import resample_abs_pos_embed
from torchvision import transforms

import configs
from common.errors import UserError
from common.models.backbone import load_backbone
from common.models.devices import resolve_device

ARCH = {False: "vit_small_patch14_dinov2", True: "vit_small_patch14_reg4_dinov2"}
SIZE = {False: "vits14", True: "vits14_reg"}
FILE = {False: "dinov2_vits14_pretrain.pth", True: "dinov2_vits14_reg4_pretrain.pth"}


def meta_rule(patch_pos: torch.Tensor, with_registers: bool) -> torch.Tensor:
    """Meta's DINOv2 ``interpolate_pos_encoding`` at 224 px, for the 37x37 patch part ``[1, 1369, D]``."""
    dim = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, 37, 37, dim).permute(0, 3, 1, 2)
    if with_registers:   # interpolate_offset 0, antialias on
        grid = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True)
    else:                # interpolate_offset 0.1, no antialias
        grid = F.interpolate(grid, scale_factor=((16 + 0.1) / 37, (16 + 0.1) / 37), mode="bicubic",
                             antialias=False)
    assert grid.shape[-2:] == (16, 16)
    return grid.permute(0, 2, 3, 1).reshape(1, 256, dim)


@pytest.fixture(scope="module")
def meta_checkpoints(tmp_path_factory):
    """Meta-original-format ViT-S/14 checkpoints (plain and reg4) made from random 518 px timm
    models, with the 224 px timm state each should become (by Meta's rule, computed here)."""
    directory = tmp_path_factory.mktemp("meta")
    generator = torch.Generator().manual_seed(5)
    result = {}
    for reg in (False, True):
        torch.manual_seed(7)
        model518 = timm.create_model(ARCH[reg], pretrained=False, num_classes=0)
        timm_state = {k: v.clone() for k, v in model518.state_dict().items()}
        dim = timm_state["cls_token"].shape[-1]
        meta = dict(timm_state)
        meta["mask_token"] = torch.zeros(1, dim)
        if reg:
            # Meta keeps the CLS position in pos_embed[:, 0]; timm folds it into cls_token.
            meta["register_tokens"] = meta.pop("reg_token")
            meta["cls_token"] = torch.randn(1, 1, dim, generator=generator) * 0.02
            meta["pos_embed"] = torch.cat([torch.randn(1, 1, dim, generator=generator) * 0.02,
                                           timm_state["pos_embed"]], dim=1)
        assert meta["pos_embed"].shape == (1, 1 + 37 * 37, dim)
        path = directory / FILE[reg]
        torch.save(meta, path)

        expected = dict(timm_state)
        if reg:
            expected["cls_token"] = meta["cls_token"] + meta["pos_embed"][:, 0]
            expected["reg_token"] = meta["register_tokens"]
            expected["pos_embed"] = meta_rule(meta["pos_embed"][:, 1:], True)
        else:
            expected["pos_embed"] = torch.cat([meta["pos_embed"][:, :1],
                                               meta_rule(meta["pos_embed"][:, 1:], False)], dim=1)
        result[reg] = {"path": path, "meta": meta, "timm_518": timm_state, "expected": expected}
    return result


# ------------------------------------------------------------------------------------------
# 3b. position embedding at 224 px by Meta's rule


@pytest.mark.parametrize("reg", [False, True], ids=["plain", "reg4"])
def test_dinov2_pos_embed_follows_meta_rule(meta_checkpoints, reg):
    ckpt = meta_checkpoints[reg]
    bb = load_backbone("dinov2", dict(configs.DINOV2, backbone_size=SIZE[reg]), weights=ckpt["path"])
    pos = bb.model.pos_embed
    expected = ckpt["expected"]["pos_embed"]
    assert pos.shape == expected.shape == (1, (0 if reg else 1) + 256, 384)
    torch.testing.assert_close(pos, expected, rtol=0, atol=1e-6)
    # the rule matters: timm's own resampling and the other variant of Meta's rule differ
    patch = ckpt["meta"]["pos_embed"][:, 1:]
    if not reg:  # (for the reg models timm's default resampling happens to be Meta's rule)
        timm_way = resample_abs_pos_embed(patch, new_size=(16, 16), num_prefix_tokens=0)
        assert (timm_way - expected[:, -256:]).abs().max() > 1e-4
    assert (meta_rule(patch, not reg) - expected[:, -256:]).abs().max() > 1e-4
    if reg:
        assert torch.equal(bb.model.cls_token, ckpt["expected"]["cls_token"])
        assert torch.equal(bb.model.reg_token, ckpt["meta"]["register_tokens"])
    else:
        assert torch.equal(bb.model.cls_token, ckpt["meta"]["cls_token"])
        assert torch.equal(pos[:, 0], ckpt["meta"]["pos_embed"][:, 0])


# ------------------------------------------------------------------------------------------
# 6. checkpoints reproduce the in-memory models


@pytest.mark.parametrize("reg", [False, True], ids=["plain", "reg4"])
def test_dinov2_meta_checkpoint_reproduces_in_memory_model(meta_checkpoints, reg, tmp_path):
    ckpt = meta_checkpoints[reg]
    x = make_images(2, seed=11)
    with torch.device("meta"):  # no random init: every tensor comes from the state below
        reference = timm.create_model(ARCH[reg], pretrained=False, num_classes=0, img_size=224)
    reference.load_state_dict({k: v.clone() for k, v in ckpt["expected"].items()}, strict=True, assign=True)
    reference.eval().requires_grad_(False)
    for block in reference.blocks:  # make the blocks matter (timm inits LayerScale to 1e-5)
        block.ls1.gamma.fill_(0.5)
        block.ls2.gamma.fill_(0.5)
    config = dict(configs.DINOV2, backbone_size=SIZE[reg])

    # Meta's original file
    bb = load_backbone("dinov2", config, weights=ckpt["path"])
    for block in bb.blocks:
        block.ls1.gamma.fill_(0.5)
        block.ls2.gamma.fill_(0.5)
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(bb.stock_forward(x), expected, rtol=0, atol=1e-6)
    assert str(ckpt["path"]) in bb.weights_id

    # the same weights as a timm-format 518 px checkpoint give the same model
    if reg:
        return
    timm_path = tmp_path / "model.pth"
    torch.save(ckpt["timm_518"], timm_path)
    bb_timm = load_backbone("dinov2", config, weights=timm_path)
    torch.testing.assert_close(bb_timm.model.pos_embed, ckpt["expected"]["pos_embed"], rtol=0, atol=1e-6)
    state = bb_timm.model.state_dict()
    assert state.keys() == ckpt["expected"].keys()
    for key, value in ckpt["expected"].items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)


def test_clip_checkpoint_reproduces_in_memory_model(tmp_path):
    torch.manual_seed(123)
    full = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(full.state_dict(), path)
    bb = load_backbone("clip", configs.CLIP, weights=path)
    x = make_images(2, seed=3)
    with torch.no_grad():
        expected = full.encode_image(x)
    assert torch.equal(bb.model.conv1.weight, full.visual.conv1.weight)
    torch.testing.assert_close(bb.stock_forward(x), expected, rtol=0, atol=1e-6)
    assert str(path) in bb.weights_id
    assert bb.activation == "GELU"


@pytest.mark.parametrize("family,config", [("clip", configs.CLIP),
                                           ("dinov2", dict(configs.DINOV2, backbone_size="vits14"))])
def test_bad_weights_file_is_a_user_error_naming_it(family, config, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        load_backbone(family, config, weights=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(UserError, match=re.escape(str(garbage))):
        load_backbone(family, config, weights=garbage)


def test_wrong_dinov2_checkpoint_is_a_user_error(meta_checkpoints):
    """A ViT-S/14 file passed for ViT-S/14-reg4 does not fit: a user error naming the file."""
    path = meta_checkpoints[False]["path"]
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_backbone("dinov2", dict(configs.DINOV2, backbone_size="vits14_reg"), weights=path)


def test_loader_argument_errors():
    with pytest.raises(UserError, match="resnet"):
        load_backbone("resnet", {}, random_init=True)
    with pytest.raises(UserError, match="vitx14"):
        load_backbone("dinov2", dict(configs.DINOV2, backbone_size="vitx14"), random_init=True)
    with pytest.raises(ValueError):
        load_backbone("dinov2", configs.DINOV2, random_init=True, weights="x.pth")


# ------------------------------------------------------------------------------------------
# devices and preprocessing


def test_resolve_device():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="cuda"):
            resolve_device("cuda")
        with pytest.raises(UserError, match="cuda"):
            resolve_device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    for name in ("tpu", "foo"):
        with pytest.raises(UserError, match=name):
            resolve_device(name)


def test_dinov2_preprocess(dinov2_s14):
    preprocess = dinov2_s14.preprocess
    steps = preprocess.transforms
    assert [type(step) for step in steps] == [transforms.Resize, transforms.CenterCrop,
                                              transforms.ToTensor, transforms.Normalize]
    resize, crop, _, normalize = steps
    assert resize.size in (256, [256], (256,))
    assert resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert tuple(crop.size) == (224, 224)
    assert tuple(normalize.mean) == pytest.approx((0.485, 0.456, 0.406))
    assert tuple(normalize.std) == pytest.approx((0.229, 0.224, 0.225))
    image = Image.new("RGB", (400, 300), (120, 30, 200))
    assert preprocess(image).shape == (3, 224, 224)


# ------------------------------------------------------------------------------------------
# the global RNG, DINOv3 checkpoints


def test_loading_weights_leaves_the_global_rng_alone(meta_checkpoints, tmp_path):
    """Building a model draws its random initialisation; loading real weights over it must not
    reseed or advance the caller's torch RNG (a run's later draws would change with the backbone)."""
    path = meta_checkpoints[False]["path"]
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    load_backbone("dinov2", dict(configs.DINOV2, backbone_size="vits14"), weights=path)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(1234)
    load_backbone("dinov2", dict(configs.DINOV2, backbone_size="vits14"), random_init=True, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_dinov3_checkpoint_reproduces_in_memory_model(tmp_path):
    """A timm-format DINOv3 checkpoint (safetensors, as on the hub) loads into the 224 px model and
    gives the model it was saved from, pooled on the final-norm CLS token."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, img_size=224,
                               global_pool="token").eval()
    for block in source.blocks:
        block.gamma_1.data.fill_(0.5)
        block.gamma_2.data.fill_(0.5)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    bb = load_backbone("dinov3", dict(configs.DINOV3, backbone_size="vits16"), weights=path)
    x = make_images(2, seed=8)
    with torch.no_grad():
        expected = source(x)
    assert torch.equal(bb.stock_forward(x), expected)
    assert bb.num_prefix_tokens == 5 and bb.grid_size == (14, 14)
    assert str(path) in bb.weights_id
    with pytest.raises(UserError, match="vitb16"):
        load_backbone("dinov3", dict(configs.DINOV3, backbone_size="vitb16"), weights=path)
