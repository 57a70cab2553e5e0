"""Register-neuron rankings as files (docs/detection.md, docs/datasets.md): our JSON carries the model's identity, the
course project's ``register_neurons.pt`` is read safely and checked by bounds, and loading a
ranking into another model is a user error naming both."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import configs
from common.errors import UserError
from common.models.families import ModelIdentity, get_family
from common.registers.neurons import NeuronRanking, paper_neurons

CLIP_B16 = ModelIdentity("clip", "ViT-B-16", 12, 3072, "laion2b_s34b_b88k")
DINO_L14 = ModelIdentity("dinov2", "vit_large_patch14_dinov2", 24, 4096, "vit_large_patch14_dinov2.lvd142m")


def course_ranking(layers: int, width: int) -> list[tuple[int, int, float]]:
    """A full ranking in the course format: every (layer, neuron), best first."""
    entries = [(l, n, float((l * 7919 + n * 104729) % 1000) / 10.0) for l in range(layers) for n in range(width)]
    return sorted(entries, key=lambda e: (-e[2], e[0], e[1]))


def test_identity_of_configured_models_without_weights():
    clip = get_family("clip").identity(configs.CLIP)
    assert clip.same_model(CLIP_B16) and clip.weights == CLIP_B16.weights
    assert (clip.width, clip.patch_size, clip.image_size, clip.trained_registers, clip.has_cls) == (768, 16, 224, 0, True)
    identity = get_family("dinov2").identity(configs.DINOV2)
    assert (identity.family, identity.architecture, identity.layers, identity.mlp_width) == \
           ("dinov2", "vit_large_patch14_dinov2", 24, 4096)
    dinov3 = get_family("dinov3").identity(configs.DINOV3)
    assert (dinov3.architecture, dinov3.layers, dinov3.mlp_width) == ("vit_large_patch16_dinov3", 24, 4096)


def test_course_pt_round_trip_and_selection(tmp_path):
    ranked = course_ranking(12, 64)
    path = tmp_path / "register_neurons.pt"
    torch.save(ranked, path)
    ranking = NeuronRanking.load(path)
    assert ranking.ranked == ranked and ranking.identity is None
    assert ranking.source == f"file:{path}"
    ranking.check_model(CLIP_B16, str(path))          # within bounds: accepted
    # the course code's selection: layers <= highest_layer, the first top_k, grouped by layer
    expected: dict[int, list[int]] = {}
    for layer, neuron, _ in [e for e in ranked if e[0] <= 5][:20]:
        expected.setdefault(layer, []).append(neuron)
    assert ranking.select(5, 20) == dict(sorted(expected.items()))
    above = ranking.above_highest_layer(5, 20)
    assert above == [(l, n, s) for l, n, s in ranked[:20] if l > 5]


def test_course_pt_saved_from_cuda_tensors_loads_on_cpu(tmp_path):
    """The course project saved entries as Python numbers; 0-d tensors are accepted too."""
    path = tmp_path / "tensors.pt"
    torch.save([(torch.tensor(6), torch.tensor(980), torch.tensor(80.9)), (6, 61, 51.0)], path)
    ranking = NeuronRanking.load(path)
    assert [(l, n) for l, n, _ in ranking.ranked] == [(6, 980), (6, 61)]
    assert ranking.ranked[0][2] == pytest.approx(80.9, rel=1e-6)


def test_pt_out_of_bounds_is_refused_naming_the_entry(tmp_path):
    path = tmp_path / "register_neurons.pt"
    torch.save([(3, 10, 5.0), (30, 2, 4.0)], path)
    with pytest.raises(UserError, match=r"\(30, 2\).*clip ViT-B-16"):
        NeuronRanking.load(path).check_model(CLIP_B16, str(path))


class Exploit:
    """Unpickling this would run code (it writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("content", ["exploit", "dict", "wrong_tuple", "text"])
def test_pt_that_is_not_a_ranking_is_refused_and_never_executed(tmp_path, content):
    path = tmp_path / "register_neurons.pt"
    marker = tmp_path / "pwned"
    if content == "exploit":
        with open(path, "wb") as stream:
            pickle.dump([Exploit(marker)], stream)
    elif content == "dict":
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    elif content == "wrong_tuple":
        torch.save([(1, 2)], path)
    else:
        path.write_text("not a pickle")
    with pytest.raises(UserError, match=str(path).replace("\\", "\\\\")):
        NeuronRanking.load(path)
    assert not marker.exists()


def test_json_records_identity_and_another_model_is_refused(tmp_path):
    ranking = NeuronRanking(ranked=course_ranking(12, 8), threshold=30.0, detect_layer=-1, detect_layer_index=11,
                            images_used=10, images_counted=9, max_norm_seen=80.0, identity=CLIP_B16)
    path = tmp_path / "register_neurons.json"
    ranking.save(path, highest_layer=5, top_k=4)
    data = json.loads(path.read_text())
    assert data["model"] == CLIP_B16.as_dict()
    assert data["above_highest_layer"]["count"] == sum(1 for l, _, _ in ranking.ranked[:4] if l > 5)
    loaded = NeuronRanking.load(path)
    assert loaded.identity == CLIP_B16 and loaded.ranked == ranking.ranked
    loaded.check_model(CLIP_B16, str(path))
    with pytest.raises(UserError) as caught:
        loaded.check_model(DINO_L14, str(path))
    message = str(caught.value)
    assert "ViT-B-16" in message and "vit_large_patch14_dinov2" in message and str(path) in message


def test_paper_neurons_belong_to_dinov2_vitl14():
    ranking = paper_neurons(DINO_L14)
    ranking.check_model(DINO_L14, "paper")
    with pytest.raises(UserError, match="ViT-B-16"):
        ranking.check_model(CLIP_B16, "paper")


def test_a_course_pt_records_no_detect_layer_and_the_json_says_unknown(tmp_path):
    """The course file records neither the detect layer nor the threshold: unknown (null), never a
    made-up 0 or -1, also after a round trip through our JSON."""
    path = tmp_path / "register_neurons.pt"
    torch.save(course_ranking(3, 4), path)
    ranking = NeuronRanking.load(path)
    assert ranking.detect_layer is None and ranking.detect_layer_index is None
    data = ranking.to_json(2, 5)
    assert data["detect_outliers_layer"] is None and data["detect_layer_index"] is None
    ranking.save(tmp_path / "register_neurons.json", 2, 5)
    again = NeuronRanking.load(tmp_path / "register_neurons.json")
    assert again.detect_layer is None and again.detect_layer_index is None and again.ranked == ranking.ranked
    assert json.loads((tmp_path / "register_neurons.json").read_text())["detect_outliers_layer"] is None


@pytest.mark.parametrize("entries, index, problem", [
    ([(3, 7, 2.0), (3, "x12", 1.0)], 1, "has a neuron that is not an integer ('x12')"),
    ([(3, 7, 2.0)] * 5 + [(4, 2)], 5, "has 2 values, not 3"),
    ([(1, 2, 3.0), 7], 1, "is not a tuple (int)"),
    ([(-1, 7, 2.0)], 0, "has a negative layer (-1)"),
    ([(1, -7, 2.0)], 0, "has a negative neuron (-7)"),
    ([(1.5, 7, 2.0)], 0, "has a layer that is not an integer (1.5)"),
    ([(1, 7, "high")], 0, "has a score that is not a number ('high')"),
    ([(True, 7, 1.0)], 0, "has a layer that is not an integer (True)"),
])
def test_a_bad_entry_of_a_course_pt_is_named_by_index_and_value(tmp_path, entries, index, problem):
    path = tmp_path / "register_neurons.pt"
    torch.save(entries, path)
    with pytest.raises(UserError) as caught:
        NeuronRanking.load(path)
    message = str(caught.value)
    assert f"entry {index} ({entries[index]!r}) {problem}" in message, message
    assert "not a list of" not in message
