"""Register-neuron rankings: what detection produces, what ``--neurons`` reads (docs/detection.md, docs/datasets.md).

A :class:`NeuronRanking` is the full list of ``(layer, neuron, score)``, best first, plus what
produced it and the identity of the model it belongs to.  It is read from and written to:

* ``register_neurons.json`` (ours): the full ranking, the selection, the threshold and why,
  the detect layer, images used and counted, the model's identity, and how many of the top
  ``top_k`` neurons lie above ``highest_layer`` (those the selection leaves out);
* the course project's ``register_neurons.pt`` (a ``torch.save``d list of ``(layer, neuron,
  score)`` tuples, best first), loaded with ``weights_only=True`` so no code is ever unpickled;
  it carries no identity, so it is checked by bounds against the model;
* ``paper``: the register neurons of DINOv2 ViT-L/14 published by the test-time-registers
  authors (found on ImageNet).

Loading into another model than the one recorded is an error naming both.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import UserError
from common.io import write_json
from common.models.families import ModelIdentity

if TYPE_CHECKING:
    from common.registers.trained import TrainedRegisterStats

JSON_FORMAT = "ttr-register-neurons/2"
SPARSE_FRACTION = 0.5
SPARSE_ACTIVATION = 0.5

# Register neurons of DINOv2 ViT-L/14 published by the test-time-registers authors (ImageNet).
PAPER_NEURONS_DINOV2_VITL14: dict[int, list[int]] = {
    12: [3168],
    13: [2400],
    14: [2110, 1510, 1082, 2711, 2464, 147, 543, 581],
    15: [1714, 3507, 2492, 2680, 131, 720, 3499, 3062, 2625],
    16: [2301, 3576, 1940, 3463, 1244, 407, 3152, 2517, 3465],
    17: [884, 133, 1427, 3464, 2373, 2436, 841, 3574, 2129, 3355, 4047, 3341, 1330, 4031, 844, 944, 464],
}
# The model they index: DINOv2 ViT-L/14 (24 blocks, 4096 neurons each) without trained registers.
PAPER_IDENTITY = ModelIdentity("dinov2", "vit_large_patch14_dinov2", 24, 4096, "vit_large_patch14_dinov2.lvd142m",
                               width=1024, patch_size=14, image_size=224)


@dataclass
class NeuronRanking:
    """The full ranking plus what produced it."""

    ranked: list[tuple[int, int, float]]          # (layer, neuron, score), best first
    threshold: float
    detect_layer: int | None                      # as configured (may be negative); None: not recorded
    detect_layer_index: int | None                # 0-based; None: not recorded (a course .pt)
    images_used: int
    images_counted: int
    max_norm_seen: float
    threshold_reason: str = ""
    source: str = "detected"                      # detected | file:PATH | paper
    identity: ModelIdentity | None = None         # None: a course .pt file (checked by bounds)
    extra: dict = field(default_factory=dict)
    # the trained registers' statistics of the detection pass (cached with it, not in the JSON file)
    trained: TrainedRegisterStats | None = None

    # ---------------------------------------------------------------- selection
    def select(self, highest_layer: int, top_k: int) -> dict[int, list[int]]:
        """Keep layers <= ``highest_layer``, take the first ``top_k``, group by layer in rank order."""
        if top_k < 1:   # a user's value is checked where it enters (common.app.settings)
            raise ValueError(f"top_k={top_k}: it must be at least 1")
        selected: dict[int, list[int]] = {}
        taken = 0
        for layer, neuron, _ in self.ranked:
            if layer > highest_layer:
                continue
            selected.setdefault(int(layer), []).append(int(neuron))
            taken += 1
            if taken == top_k:
                break
        return dict(sorted(selected.items()))

    def above_highest_layer(self, highest_layer: int, top_k: int) -> list[tuple[int, int, float]]:
        """The neurons among the first ``top_k`` of the whole ranking that lie above
        ``highest_layer``: strong register neurons the selection leaves out."""
        return [(int(l), int(n), float(s)) for l, n, s in self.ranked[:top_k] if l > highest_layer]

    def selected_scores(self, highest_layer: int, top_k: int) -> list[float]:
        chosen = {(l, n) for l, ids in self.select(highest_layer, top_k).items() for n in ids}
        return [float(s) for l, n, s in self.ranked if (l, n) in chosen]

    # ---------------------------------------------------------------- identity
    def check_model(self, model: ModelIdentity, argument: str) -> None:
        """UserError unless this ranking can index ``model``: same identity when recorded, else
        every (layer, neuron) within its depth and MLP width."""
        if self.identity is not None and not self.identity.same_model(model):
            raise UserError(f"--neurons {argument}: the ranking was found on {self.identity.describe()}, "
                            f"but this run uses {model.describe()}; detect on this model or pass its own "
                            "register_neurons.json")
        # bounds too (a course .pt records no model; a JSON may have been edited by hand)
        bad = [(l, n) for l, n, _ in self.ranked if not (0 <= l < model.layers and 0 <= n < model.mlp_width)]
        if bad:
            layer, neuron = bad[0]
            raise UserError(f"--neurons {argument}: ({layer}, {neuron}) is outside {model.describe()} "
                            f"({len(bad)} such entries); the ranking belongs to another model")

    # ---------------------------------------------------------------- JSON
    def to_json(self, highest_layer: int | None = None, top_k: int | None = None) -> dict:
        data = {
            "format": JSON_FORMAT,
            "source": self.source,
            "model": self.identity.as_dict() if self.identity is not None else None,
            "register_norm_threshold": self.threshold,
            "threshold_reason": self.threshold_reason,
            "detect_outliers_layer": self.detect_layer,
            "detect_layer_index": self.detect_layer_index,
            "images_used": self.images_used,
            "images_counted": self.images_counted,
            "max_norm_seen": self.max_norm_seen,
            "sparsity_filter": {"fraction": SPARSE_FRACTION, "activation_threshold": SPARSE_ACTIVATION},
            **self.extra,
        }
        if highest_layer is not None and top_k is not None:
            above = self.above_highest_layer(highest_layer, top_k)
            data["highest_layer"] = highest_layer
            data["top_k"] = top_k
            data["selected"] = {str(layer): ids for layer, ids in self.select(highest_layer, top_k).items()}
            data["above_highest_layer"] = {
                "count": len(above),
                "of_top_k": top_k,
                "neurons": [[l, n, _json_float(s)] for l, n, s in above],
                "note": "neurons among the top_k of the whole ranking that lie above highest_layer "
                        "and are therefore not selected",
            }
        data["ranked"] = [[int(l), int(n), _json_float(s)] for l, n, s in self.ranked]
        return data

    def save(self, path: str | Path, highest_layer: int | None = None, top_k: int | None = None) -> None:
        write_json(path, self.to_json(highest_layer, top_k))

    @classmethod
    def load(cls, path: str | Path) -> "NeuronRanking":
        """Read our JSON or the course project's ``.pt`` ranking (UserError naming the file)."""
        path = Path(path)
        try:
            head = path.read_bytes()[:4]
        except FileNotFoundError:
            raise UserError(f"--neurons {path}: no such file; pass a register_neurons.json, a course "
                            "register_neurons.pt or 'paper'") from None
        except OSError as error:  # a folder, no permission, ...
            raise UserError(f"--neurons {path}: cannot be read ({error.strerror or error}); pass a "
                            "register_neurons.json or register_neurons.pt file") from None
        if head.startswith(b"PK") or head[:1] == b"\x80" or path.suffix in (".pt", ".pth"):
            return cls._load_pt(path)
        return cls._load_json(path)

    @classmethod
    def _load_json(cls, path: Path) -> "NeuronRanking":
        try:
            data = json.loads(path.read_text())
            ranked = [(int(l), int(n), float("nan") if s is None else float(s)) for l, n, s in data["ranked"]]
            identity = ModelIdentity.from_dict(data["model"]) if data.get("model") else None
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"--neurons {path}: not a register-neurons JSON ({error.__class__.__name__}: "
                            f"{error}); pass a register_neurons.json written by a run") from None
        if not ranked:
            raise UserError(f"--neurons {path}: the ranking is empty; pass a register_neurons.json written by a "
                            "run, or detect the neurons (leave --neurons out)")
        return cls(
            ranked=ranked, threshold=data.get("register_norm_threshold", float("nan")),
            detect_layer=_layer_or_none(data.get("detect_outliers_layer")),
            detect_layer_index=_layer_or_none(data.get("detect_layer_index")),
            images_used=int(data.get("images_used", 0)), images_counted=int(data.get("images_counted", 0)),
            max_norm_seen=float(data.get("max_norm_seen", float("nan"))),
            threshold_reason=data.get("threshold_reason", ""), source=f"file:{path}", identity=identity)

    @classmethod
    def _load_pt(cls, path: Path) -> "NeuronRanking":
        import torch

        try:
            # weights_only: the file is read as data; a pickle that would run code is refused.
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
                AttributeError, TypeError, OSError) as error:
            reason = " ".join(str(error).split())[:160]
            raise UserError(f"--neurons {path}: not a register-neuron ranking that can be read safely "
                            f"({type(error).__name__}: {reason}); pass a course register_neurons.pt "
                            "(a list of (layer, neuron, score)) or a register_neurons.json") from None
        if not isinstance(data, (list, tuple)):
            raise UserError(f"--neurons {path}: holds a {type(data).__name__}, not a list of (layer, neuron, "
                            "score) tuples; pass the course project's register_neurons.pt or our JSON")
        ranked, bad = _ranking_from(data)
        if bad is not None:
            index, problem = bad
            raise UserError(f"--neurons {path}: entry {index} ({_shown_entry(data[index])}) {problem}; each entry "
                            "must be (layer, neuron, score) with a layer and a neuron >= 0: pass the course project's "
                            "register_neurons.pt as it saved it, or our JSON")
        if not ranked:
            raise UserError(f"--neurons {path}: the ranking is empty; pass the course project's full "
                            "register_neurons.pt, or detect the neurons (leave --neurons out)")
        # The course file records neither the detect layer nor the threshold: unknown, not 0 or -1.
        return cls(ranked=ranked, threshold=float("nan"), detect_layer=None, detect_layer_index=None,
                   images_used=0, images_counted=0, max_norm_seen=float("nan"),
                   threshold_reason="read from a course project register_neurons.pt (threshold not recorded)",
                   source=f"file:{path}", identity=None)


def _layer_or_none(value) -> int | None:
    """A recorded layer index, or None where the file records none (null, absent)."""
    return None if value is None else int(value)


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _ranking_from(data: list | tuple) -> tuple[list[tuple[int, int, float]], tuple[int, str] | None]:
    """``data`` as a list of (int layer, int neuron, float score), and the first bad entry as
    (its index, what is wrong with it), or None when every entry is good."""
    ranked = []
    for index, entry in enumerate(data):
        if not isinstance(entry, (list, tuple)):
            return ranked, (index, f"is not a tuple ({type(entry).__name__})")
        if len(entry) != 3:
            return ranked, (index, f"has {len(entry)} values, not 3")
        layer, neuron, score = (value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value
                                for value in entry)   # 0-d tensors from a torch.save of tensor entries
        for name, value in (("layer", layer), ("neuron", neuron)):
            if isinstance(value, bool) or not isinstance(value, int):
                return ranked, (index, f"has a {name} that is not an integer ({value!r})")
            if value < 0:
                return ranked, (index, f"has a negative {name} ({value})")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            return ranked, (index, f"has a score that is not a number ({score!r})")
        ranked.append((layer, neuron, float(score)))
    return ranked, None


def _shown_entry(entry) -> str:
    text = repr(entry)
    return text if len(text) <= 80 else text[:77] + "..."


def paper_neurons(model: ModelIdentity) -> NeuronRanking:
    """The published DINOv2 ViT-L/14 register neurons as a ranking (rank order as published), for a
    run of that model (by its identity, whatever ``--model`` name or weights file chose it)."""
    if not model.same_model(PAPER_IDENTITY):
        raise UserError(f"--neurons paper holds the published register neurons of DINOv2 ViT-L/14 "
                        f"({PAPER_IDENTITY.describe()}) only; this run uses {model.describe()}: detect instead or "
                        "pass a JSON file of neurons (register_neurons.json)")
    ranked = [(layer, neuron, float("nan"))
              for layer, neurons in PAPER_NEURONS_DINOV2_VITL14.items() for neuron in neurons]
    return NeuronRanking(
        ranked=ranked, threshold=float("nan"), detect_layer=-2, detect_layer_index=22,
        images_used=0, images_counted=0, max_norm_seen=float("nan"),
        threshold_reason="published by the test-time-registers authors (found on ImageNet)",
        source="paper", identity=PAPER_IDENTITY,
    )
