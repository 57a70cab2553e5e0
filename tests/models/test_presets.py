"""The model presets (docs/models.md): each built at full size on the meta device has the published
architecture; ``--describe`` prints it without reading weights; each preset reads the formats its hub
page ships (RAD-DINO's Hugging Face layout against a forward written from that layout itself;
BiomedCLIP's open_clip checkpoint against timm's trunk and the projection); a gated model without a
local file is one line naming its license page; ``timm:`` / ``open_clip:`` models take their
family's defaults; a model without a class token pools its patches and keeps test-time registers
out of the pool.
"""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_images
from safetensors.torch import save_file

import configs
from common.app.cli import main as cli_main
from common.app.settings import DatasetSpec
from common.errors import UserError
from common.models.backbone import backbone_from_module, load_backbone
from common.models.families import FAMILIES, get_family
from common.models.family import SmallDims
from common.models.hooks import FINAL, HookedViT, attn_cls_pattern
from common.models.presets import model_slug, resolve_model

# The architectures as published (model cards and the libraries' configs), written out here:
# layers, width, MLP width (neurons: the width fed to the output projection), heads, patch, input
# size, trained registers, class token.
PUBLISHED = {
    "clip": (12, 768, 3072, 12, 16, 224, 0, True),
    "dinov2": (24, 1024, 4096, 16, 14, 224, 0, True),
    "dinov3": (24, 1024, 4096, 16, 16, 224, 4, True),
    "biomedclip": (12, 768, 3072, 12, 16, 224, 0, True),
    "rad-dino": (12, 768, 3072, 12, 14, 518, 0, True),
    "uni": (24, 1024, 4096, 16, 16, 224, 0, True),
    "virchow2": (32, 1280, 3416, 16, 14, 224, 4, True),
}


def meta_adapter(model: str):
    choice = resolve_model(model)
    family = get_family(choice.family)
    with torch.device("meta"):
        return family.wrap(family.create(choice.config, seed=0))


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_every_preset_has_its_published_architecture_at_full_size(model):
    adapter = meta_adapter(model)
    layers, width, mlp_width, heads, patch, size, registers, cls = PUBLISHED[model]
    assert (len(adapter.blocks), adapter.width, adapter.mlp_width, adapter.num_heads, adapter.patch_size,
            adapter.input_size, adapter.trained_registers, adapter.has_cls) == PUBLISHED[model]
    assert adapter.grid_size == (size // patch, size // patch)
    assert adapter.num_prefix_tokens == registers + 1
    # the pooled feature's width: CLIP-style projections, the residual width elsewhere
    pooled = adapter.project(torch.zeros(1, width, device="meta")).shape[-1]
    assert pooled == {"clip": 512, "biomedclip": 512}.get(model, width)
    assert set(configs.PRESETS) == set(PUBLISHED)


def test_the_medical_presets_details():
    """What a mere shape would not show: LayerScale, SwiGLU, dynamic input size, position embeddings."""
    virchow = meta_adapter("virchow2")
    block = virchow.blocks[0]
    assert type(block.mlp).__name__ == "GluMlp" and not block.mlp.gate_last          # SwiGLUPacked
    assert isinstance(block.mlp.act, torch.nn.SiLU) and block.mlp.fc1.out_features == 2 * 3416
    assert virchow.tower.dynamic_img_size and not virchow.tower.no_embed_class
    assert virchow.tower.pos_embed.shape == (1, 5 + 256, 1280)      # CLS and the 4 registers have positions
    assert virchow.tower.global_pool == "token" and virchow.activation == "GluMlp(SiLU)"
    uni = meta_adapter("uni")
    assert type(uni.blocks[0].ls1).__name__ == "LayerScale" and uni.tower.dynamic_img_size
    assert type(uni.blocks[0].mlp).__name__ == "Mlp" and uni.activation == "GELU"
    rad = meta_adapter("rad-dino")
    assert type(rad.blocks[0].ls1).__name__ == "LayerScale" and rad.tower.pos_embed.shape == (1, 1 + 37 * 37, 768)
    biomed = meta_adapter("biomedclip")
    assert type(biomed.model).__name__ == "TimmModel" and type(biomed.tower).__name__ == "VisionTransformer"
    assert type(biomed.blocks[0].ls1).__name__ == "Identity"          # vit_base_patch16_224: no layer scale
    assert biomed.model.head.proj.weight.shape == (512, 768) and biomed.model.head.proj.bias is None


def test_preprocessing_follows_the_model_cards():
    from torchvision import transforms

    def steps(model):
        choice = resolve_model(model)
        found = get_family(choice.family).preprocess(choice.config).transforms
        resize, crop, normalize = found[0], found[1], found[-1]
        return (resize.size, str(resize.interpolation.value), tuple(crop.size), tuple(normalize.mean),
                tuple(normalize.std))

    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    clip_stats = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert steps("rad-dino") == (518, "bicubic", (518, 518), (0.5307,) * 3, (0.2583,) * 3)
    assert steps("uni") == (224, "bilinear", (224, 224), *imagenet)
    assert steps("virchow2") == (224, "bicubic", (224, 224), *imagenet)
    assert steps("dinov2") == (256, "bicubic", (224, 224), *imagenet)
    biomed = steps("biomedclip")
    assert biomed[1:] == ("bicubic", (224, 224), *clip_stats)
    for model in PUBLISHED:
        choice = resolve_model(model)
        compose = get_family(choice.family).preprocess(choice.config)
        assert isinstance(compose, transforms.Compose)
        assert [type(s).__name__ for s in compose.transforms][-2:] in (["ToTensor", "Normalize"],
                                                                        ["MaybeToTensor", "Normalize"])


@pytest.mark.parametrize("model", ["virchow2", "rad-dino", "timm:vit_small_patch16_224"])
def test_describe_prints_the_identity_without_weights(model, capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli_main(DatasetSpec("aptos", "APTOS 2019", qwk=True), ["--model", model, "--describe"])
    assert code == 0
    described = json.loads(capsys.readouterr().out)
    if model in PUBLISHED:
        layers, width, mlp_width, _, patch, size, registers, cls = PUBLISHED[model]
        assert (described["layers"], described["width"], described["mlp_width"], described["patch_size"],
                described["image_size"], described["trained_registers"], described["has_cls"]) == \
               (layers, width, mlp_width, patch, size, registers, cls)
    assert described["family"] == resolve_model(model).family and described["model"] == model
    assert described["weights"]["cached"] is None and described["weights"]["pass"] == "--weights PATH"
    if model == "virchow2":
        assert described["weights"]["gated"] and described["weights"]["hub"].endswith("/paige-ai/Virchow2")
        assert described["feature"] == "cls+patch_mean" and described["architecture"] == "vit_huge_patch14_224"
    if model == "rad-dino":
        assert described["weights"]["file"] == "model.safetensors" and not described["weights"]["gated"]


@pytest.mark.parametrize("model, page", [("uni", "MahmoodLab/uni"), ("virchow2", "paige-ai/Virchow2")])
def test_a_gated_model_without_a_file_names_its_license_page(model, page, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as caught:
        load_backbone(model, configs.MODEL_CONFIGS[model])
    message = str(caught.value)
    assert "\n" not in message and "accept the license" in message and "--weights PATH" in message
    assert f"/{page}" in message and "pytorch_model.bin" in message


# ------------------------------------------------------------------------------------------
# RAD-DINO: a checkpoint in the Hugging Face Dinov2Model layout


def hf_dinov2_state(generator: torch.Generator, layers=12, width=768, grid=37, patch=14) -> dict[str, torch.Tensor]:
    """Random weights under the real key names and shapes of ``transformers``' Dinov2Model."""
    def rand(*shape, std=0.02):
        return torch.randn(*shape, generator=generator) * std

    state = {"embeddings.cls_token": rand(1, 1, width), "embeddings.mask_token": torch.zeros(1, width),
             "embeddings.position_embeddings": rand(1, 1 + grid * grid, width),
             "embeddings.patch_embeddings.projection.weight": rand(width, 3, patch, patch),
             "embeddings.patch_embeddings.projection.bias": rand(width),
             "layernorm.weight": 1 + rand(width), "layernorm.bias": rand(width)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            state[p + f"attention.attention.{name}.weight"] = rand(width, width)
            state[p + f"attention.attention.{name}.bias"] = rand(width)
        state.update({p + "attention.output.dense.weight": rand(width, width),
                      p + "attention.output.dense.bias": rand(width),
                      p + "norm1.weight": 1 + rand(width), p + "norm1.bias": rand(width),
                      p + "norm2.weight": 1 + rand(width), p + "norm2.bias": rand(width),
                      p + "layer_scale1.lambda1": 0.5 + rand(width), p + "layer_scale2.lambda1": 0.5 + rand(width),
                      p + "mlp.fc1.weight": rand(4 * width, width), p + "mlp.fc1.bias": rand(4 * width),
                      p + "mlp.fc2.weight": rand(width, 4 * width), p + "mlp.fc2.bias": rand(width)})
    return state


@torch.no_grad()
def hf_dinov2_forward(state: dict[str, torch.Tensor], x: torch.Tensor, heads=12, patch=14) -> torch.Tensor:
    """Dinov2Model's pooled output (final-norm CLS) written from the Hugging Face layout itself."""
    width = state["embeddings.cls_token"].shape[-1]
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    tokens = F.conv2d(x, state["embeddings.patch_embeddings.projection.weight"],
                      state["embeddings.patch_embeddings.projection.bias"], stride=patch).flatten(2).transpose(1, 2)
    h = torch.cat([state["embeddings.cls_token"].expand(x.shape[0], -1, -1), tokens], 1)
    h = h + state["embeddings.position_embeddings"]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        y = F.layer_norm(h, (width,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
        q, k, v = (F.linear(y, state[p + f"attention.attention.{n}.weight"], state[p + f"attention.attention.{n}.bias"])
                   .reshape(*y.shape[:2], heads, -1).transpose(1, 2) for n in ("query", "key", "value"))
        attention = ((q @ k.transpose(-2, -1)) / (width // heads) ** 0.5).softmax(-1) @ v
        out = F.linear(attention.transpose(1, 2).flatten(2), state[p + "attention.output.dense.weight"],
                       state[p + "attention.output.dense.bias"])
        h = h + out * state[p + "layer_scale1.lambda1"]
        y = F.layer_norm(h, (width,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                     state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        h = h + y * state[p + "layer_scale2.lambda1"]
    return F.layer_norm(h, (width,), state["layernorm.weight"], state["layernorm.bias"], eps=1e-6)[:, 0]


def test_rad_dino_hub_files_load_and_give_the_hugging_face_model(tmp_path):
    """model.safetensors (Hugging Face layout) and backbone_compatible.safetensors (DINOv2 repository
    layout) of a full-size RAD-DINO load into the same network, which at 518 px gives what a forward
    written from the Hugging Face layout gives."""
    from common.models.hf_dinov2 import to_timm

    state = hf_dinov2_state(torch.Generator().manual_seed(3))
    hf_file = tmp_path / "model.safetensors"
    save_file(state, str(hf_file))
    meta_layout = {**to_timm(state), "mask_token": state["embeddings.mask_token"]}
    assert "blocks.11.attn.qkv.weight" in meta_layout and "blocks.0.ls1.gamma" in meta_layout
    meta_file = tmp_path / "backbone_compatible.safetensors"
    save_file(meta_layout, str(meta_file))
    bb = load_backbone("rad-dino", configs.RAD_DINO, weights=hf_file)
    again = load_backbone("rad-dino", configs.RAD_DINO, weights=meta_file)
    assert bb.input_size == 518 and bb.grid_size == (37, 37) and str(hf_file) in bb.weights_id
    weights, other = bb.model.state_dict(), again.model.state_dict()
    assert weights.keys() == other.keys() and all(torch.equal(weights[k], other[k]) for k in weights)
    x = make_images(1, seed=4, size=518)
    pooled, cache = HookedViT(bb).run_with_cache(x, [FINAL])
    torch.testing.assert_close(pooled, hf_dinov2_forward(state, x), rtol=0, atol=2e-4)
    assert cache[FINAL].shape == (1, 1 + 37 * 37, 768)
    broken = dict(state)
    del broken["encoder.layer.3.attention.attention.key.bias"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "broken.safetensors"))):
        load_backbone("rad-dino", configs.RAD_DINO, weights=tmp_path / "broken.safetensors")


# ------------------------------------------------------------------------------------------
# BiomedCLIP: open_clip's checkpoint, image tower without transformers


def test_biomedclip_checkpoint_gives_timm_trunk_and_projection(tmp_path, monkeypatch):
    torch.manual_seed(11)
    trunk = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    projection = torch.randn(512, 768) * 0.02
    checkpoint = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    checkpoint["visual.head.proj.weight"] = projection
    checkpoint.update({"text.transformer.embeddings.word_embeddings.weight": torch.zeros(8, 4),
                       "logit_scale": torch.tensor(4.6)})        # the text tower's part is not read
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(checkpoint, path)
    bb = load_backbone("biomedclip", configs.BIOMEDCLIP, weights=path)
    x = make_images(2, seed=9)
    with torch.no_grad():
        expected = trunk(x) @ projection.T              # final-norm CLS token, then the linear projection
    torch.testing.assert_close(bb.stock_forward(x), expected, rtol=0, atol=1e-5)
    assert bb.family == "clip" and bb.activation == "GELU" and bb.pooled_width == 512
    with pytest.raises(UserError, match="visual|open_clip"):
        torch.save({"visual.trunk.cls_token": torch.zeros(1, 1, 768)}, tmp_path / "partial.bin")
        load_backbone("biomedclip", configs.BIOMEDCLIP, weights=tmp_path / "partial.bin")

    # zero-shot needs the PubMedBERT text tower, i.e. transformers: one line naming the extra
    import importlib.util

    real = importlib.util.find_spec          # (whether or not transformers is installed here)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(UserError) as caught:
        load_backbone("biomedclip", dict(configs.BIOMEDCLIP, zero_shot=True), weights=path)
    assert "transformers" in str(caught.value) and "requirements-zeroshot.txt" in str(caught.value)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------
# UNI and Virchow2: timm checkpoints (small configurations of the same architecture)


@pytest.mark.parametrize("model, suffix", [("uni", ".bin"), ("virchow2", ".safetensors"), ("virchow2", ".bin")])
def test_timm_checkpoints_of_the_pathology_presets_reload(model, suffix, tmp_path):
    small = {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0}
    config = dict(configs.MODEL_CONFIGS[model], model_args={**configs.MODEL_CONFIGS[model]["model_args"], **small})
    source = get_family("timm").create(config, seed=5)
    for block in source.blocks:          # live layer scale: the blocks must matter
        block.ls1.gamma.data.fill_(0.5)
        block.ls2.gamma.data.fill_(0.5)
    path = tmp_path / f"pytorch_model{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    bb = load_backbone(model, config, weights=path)
    x = make_images(2, seed=2)
    with torch.no_grad():
        expected = source.eval()(x)
    assert torch.equal(bb.stock_forward(x), expected)
    assert bb.num_prefix_tokens == (5 if model == "virchow2" else 1)
    with pytest.raises(UserError, match=re.escape(str(path))):
        load_backbone(model, dict(config, model_args={**config["model_args"], "depth": 3}), weights=path)


# ------------------------------------------------------------------------------------------
# any timm / open_clip ViT by name


def test_generic_models_take_their_family_defaults():
    timm_model = resolve_model("timm:vit_small_patch16_224")
    assert timm_model.family == "timm" and timm_model.config["model_name"] == "vit_small_patch16_224"
    assert timm_model.config["register_norm_threshold"] == "auto"
    assert (timm_model.config["detect_outliers_layer"], timm_model.config["highest_layer"],
            timm_model.config["top_k"]) == (-2, 9, 50)        # 12 blocks x 5/6 -> layers 0..9
    open_clip_model = resolve_model("open_clip:ViT-B-32:laion2b_s34b_b79k")
    assert open_clip_model.family == "clip"
    assert (open_clip_model.config["detect_outliers_layer"], open_clip_model.config["highest_layer"],
            open_clip_model.config["top_k"]) == (-1, 5, 20)    # CLIP ViT-B/16's choices
    assert model_slug("timm:vit_small_patch16_224") == "timm-vit_small_patch16_224"
    for bad, needle in (("timm:no_such_vit", "no_such_vit"), ("open_clip:ViT-B-32", "open_clip:<architecture>"),
                        ("open_clip:ViT-B-32:no_tag", "no_tag"), ("resnet50", "timm:<name>"), ("timm:", "timm:<name>")):
        with pytest.raises(UserError, match=re.escape(needle)):
            resolve_model(bad)
    assert set(FAMILIES) == {"clip", "timm", "dinov2", "dinov3"}


def test_a_model_without_a_class_token_pools_its_patches_without_the_registers():
    """timm ViT with class_token=False, average pooling: the layout has no CLS (detection's
    candidates are the patches), no-ttr is the stock forward, ttr's pooled feature is the mean of
    the final patch tokens (the register left out), and there is no CLS attention."""
    config = dict(resolve_model("timm:vit_small_patch16_224").config,
                  model_args={"class_token": False, "global_pool": "avg", "reg_tokens": 2})
    family = get_family("timm")
    dims = SmallDims(image_size=64, patch_size=8, width=64, depth=3, heads=4, mlp_ratio=4.0)
    module = family.create(config, seed=1, dims=dims)
    bb = backbone_from_module("timm:vit_small_patch16_224", module, preprocess=family.preprocess(config, 64),
                              description="no class token", weights_id="x")
    hooked = HookedViT(bb)
    layout = hooked.token_layout(1)
    assert not bb.has_cls and bb.num_prefix_tokens == 2 and layout.cls == slice(0, 0)
    candidates = layout.candidates()
    assert candidates.tolist() == [False, False] + [True] * 64 + [False]
    x = make_images(2, seed=6, size=64)
    with torch.no_grad():
        stock = module(x)
    assert attn_cls_pattern(1) not in hooked.hook_names()
    plain, _ = hooked.run_with_cache(x, hooked.hook_names())          # every point it has
    assert torch.equal(plain, stock)
    pooled, cache = hooked.run_with_cache(x, [FINAL], num_registers=1)
    assert cache[FINAL].shape == (2, 2 + 64 + 1, 64)                 # the final-norm point sees the register
    expected = module.fc_norm(cache[FINAL][:, 2:2 + 64].mean(dim=1))  # the pool does not
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no class token"):
        hooked.run_with_cache(x, [attn_cls_pattern(1)])
