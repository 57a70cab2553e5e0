"""Register-neuron detection (SPEC §5), streaming over batches, and its JSON round trip.

For each image: outlier positions are the tokens of layer output ``k`` whose L2 norm is
``> threshold``; images without one are skipped.  For every layer ``l`` and neuron ``j``,
``score_l[j]`` is the mean ``|activation|`` over the outlier positions, multiplied by the
sparsity filter (``activation < 0.5`` at no fewer than half of the positions).  The final score
is the mean over counted images.  Only running sums are kept, so memory does not grow with the
number of images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from common.errors import UserError
from common.hooks import Capture, HookedViT

log = logging.getLogger(__name__)

SPARSE_FRACTION = 0.5
SPARSE_ACTIVATION = 0.5
JSON_FORMAT = "ttr-register-neurons/1"
# Activations of all layers for one batch are held until the detect layer is reached.
DETECT_MEMORY_BUDGET_BYTES = 1 << 30

# Register neurons of DINOv2 ViT-L/14 published by the test-time-registers authors (ImageNet).
PAPER_NEURONS_DINOV2_VITL14: dict[int, list[int]] = {
    12: [3168],
    13: [2400],
    14: [2110, 1510, 1082, 2711, 2464, 147, 543, 581],
    15: [1714, 3507, 2492, 2680, 131, 720, 3499, 3062, 2625],
    16: [2301, 3576, 1940, 3463, 1244, 407, 3152, 2517, 3465],
    17: [884, 133, 1427, 3464, 2373, 2436, 841, 3574, 2129, 3355, 4047, 3341, 1330, 4031, 844, 944, 464],
}


@dataclass
class DetectionResult:
    """The full ranking plus what produced it."""

    ranked: list[tuple[int, int, float]]          # (layer, neuron, score), best first
    threshold: float
    detect_layer: int                             # as configured (may be negative)
    detect_layer_index: int                       # 0-based
    images_used: int
    images_counted: int
    max_norm_seen: float
    threshold_reason: str = ""
    source: str = "detected"                      # detected | file:PATH | paper
    extra: dict = field(default_factory=dict)

    def select(self, highest_layer: int, top_k: int) -> dict[int, list[int]]:
        """Keep layers <= ``highest_layer``, take the first ``top_k``, group by layer in rank order."""
        if top_k < 1:
            raise UserError(f"top_k={top_k}: it must be at least 1")
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

    def to_json(self, highest_layer: int | None = None, top_k: int | None = None) -> dict:
        data = {
            "format": JSON_FORMAT,
            "source": self.source,
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
            data["highest_layer"] = highest_layer
            data["top_k"] = top_k
            data["selected"] = {str(layer): ids for layer, ids in self.select(highest_layer, top_k).items()}
        data["ranked"] = [[int(l), int(n), None if math.isnan(s) else float(s)] for l, n, s in self.ranked]
        return data

    def save(self, path: str | Path, highest_layer: int | None = None, top_k: int | None = None) -> None:
        """Write the JSON atomically (temporary file in the same folder, then rename)."""
        write_json_atomic(Path(path), self.to_json(highest_layer, top_k))

    @classmethod
    def load(cls, path: str | Path) -> "DetectionResult":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            ranked = [(int(l), int(n), float("nan") if s is None else float(s)) for l, n, s in data["ranked"]]
        except FileNotFoundError:
            raise UserError(f"--neurons {path}: no such file; pass a register_neurons.json or 'paper'") from None
        except OSError as error:  # a folder, no permission, ...
            raise UserError(
                f"--neurons {path}: cannot be read ({error.strerror or error}); pass a register_neurons.json"
            ) from None
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(
                f"--neurons {path}: not a register-neurons JSON ({error.__class__.__name__}: {error}); "
                "pass a register_neurons.json written by a run"
            ) from None
        if not ranked:
            raise UserError(f"--neurons {path}: the ranking is empty")
        return cls(
            ranked=ranked,
            threshold=data.get("register_norm_threshold", float("nan")),
            detect_layer=int(data.get("detect_outliers_layer", -1)),
            detect_layer_index=int(data.get("detect_layer_index", -1)),
            images_used=int(data.get("images_used", 0)),
            images_counted=int(data.get("images_counted", 0)),
            max_norm_seen=float(data.get("max_norm_seen", float("nan"))),
            threshold_reason=data.get("threshold_reason", ""),
            source=f"file:{path}",
        )


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=1)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def paper_neurons(family: str, backbone_size: str | None) -> DetectionResult:
    """The published DINOv2 ViT-L/14 register neurons as a ranking (rank order as published)."""
    if family != "dinov2" or backbone_size != "vitl14":
        raise UserError(
            "--neurons paper holds the published neurons of DINOv2 ViT-L/14 only; "
            f"this run uses {family} {backbone_size or ''}".rstrip() + ": detect instead or pass a JSON file"
        )
    ranked = [(layer, neuron, float("nan"))
              for layer, neurons in PAPER_NEURONS_DINOV2_VITL14.items() for neuron in neurons]
    return DetectionResult(
        ranked=ranked, threshold=float("nan"), detect_layer=-2, detect_layer_index=22,
        images_used=0, images_counted=0, max_norm_seen=float("nan"),
        threshold_reason="published by the test-time-registers authors (found on ImageNet)",
        source="paper",
    )


def rank_scores(scores: np.ndarray) -> list[tuple[int, int, float]]:
    """``scores [L, D]`` -> every (layer, neuron, score), score descending, ties by (layer, neuron)."""
    layers, neurons = np.meshgrid(np.arange(scores.shape[0]), np.arange(scores.shape[1]), indexing="ij")
    flat_scores, flat_layers, flat_neurons = scores.ravel(), layers.ravel(), neurons.ravel()
    order = np.lexsort((flat_neurons, flat_layers, -flat_scores))
    # .tolist() gives the same Python ints and floats as int()/float() per element, ~10x faster
    return list(zip(flat_layers[order].tolist(), flat_neurons[order].tolist(), flat_scores[order].tolist()))


def suggest_threshold(norms: np.ndarray) -> tuple[float, str]:
    """Pick a norm threshold from a sample of token norms, and say why.

    Outlier tokens form a separate high-norm mode, a minority of the tokens (on images with much
    uniform background, such as the planted fixture or many medical images, it can exceed 20%).
    Among the top half of the norms we look for the largest multiplicative gap between
    neighbouring sorted values; when it is at least 1.5x the threshold is the geometric middle
    of the gap.  Without such a gap we fall back to
    median + 10 x MAD (a robust z-score of 10).
    """
    values = np.sort(np.asarray(norms, dtype=np.float64).ravel())
    values = values[np.isfinite(values) & (values > 0)]
    if values.size < 2:
        raise UserError("no token norms were seen; check that the detection images load")
    start = max(int(0.5 * values.size) - 1, 0)
    upper = values[start:]
    ratios = upper[1:] / upper[:-1]
    best = int(np.argmax(ratios))
    if ratios[best] >= 1.5:
        low, high = upper[best], upper[best + 1]
        threshold = float(math.sqrt(low * high))
        share = float((values > threshold).mean())
        return threshold, (
            f"largest gap in the top half of {values.size} token norms: between {low:.1f} and "
            f"{high:.1f} (x{ratios[best]:.1f}); geometric middle {threshold:.1f}, "
            f"{share:.1%} of tokens above"
        )
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    threshold = median + 10.0 * max(mad, 1e-6)
    return threshold, (
        f"no gap of 1.5x or more among the top half of {values.size} token norms; "
        f"median {median:.1f} + 10 x MAD {mad:.2f} = {threshold:.1f}"
    )


def detection_batch_size(backbone, requested: int) -> int:
    """Largest batch (<= requested) whose activations of every layer fit the memory budget."""
    per_image = backbone.num_layers * (backbone.num_patches + backbone.num_prefix_tokens) * backbone.mlp_width * 4
    return max(1, min(requested, DETECT_MEMORY_BUDGET_BYTES // per_image))


class _StopForward(Exception):
    """Raised from a hook to end a forward once the layer of interest has run."""


@torch.no_grad()
def collect_norms(hooked: HookedViT, batches: Iterable[torch.Tensor], detect_layer: int) -> np.ndarray:
    """All token norms of layer output ``detect_layer`` (runs each forward only up to that layer)."""
    index = hooked.layer_index(detect_layer)
    collected: list[np.ndarray] = []

    def stop(module, args, output):
        collected.append(output.norm(dim=-1).flatten().cpu().numpy())
        raise _StopForward

    for images in batches:
        handle = hooked.backbone.blocks[index].register_forward_hook(stop)
        try:
            hooked.backbone.model(images.to(hooked.backbone.device))
        except _StopForward:
            pass
        finally:
            handle.remove()
    return np.concatenate(collected) if collected else np.zeros(0)


# Bytes of gathered outlier rows processed at once (several layers per kernel when they fit).
_GATHER_CHUNK_BYTES = 64 << 20


def _layer_scores(acts: list[torch.Tensor], outliers: torch.Tensor, per_image: torch.Tensor,
                  sparsity: bool) -> torch.Tensor:
    """Per-image scores ``[L, B, D]`` of one batch: mean |activation| over each image's outlier
    positions, times the sparsity filter.  An image without an outlier position scores 0.

    Written for few kernel launches per layer (on a busy CPU every parallel kernel can cost a
    scheduler time slice, whatever its size): only the rows at the outlier positions are
    gathered (one kernel per layer) and scored for several layers at once; the count of
    ``activation < 0.5`` over the N positions is a batched matmul on a reused 0/1 buffer (exact
    in float32 for N < 2**24).
    """
    batch, tokens, width = acts[0].shape
    image_of, token_of = outliers.nonzero(as_tuple=True)                 # [M] outlier positions
    weights = (1.0 / per_image[image_of].to(acts[0].dtype))[None, :, None]  # [1, M, 1]
    scores = acts[0].new_zeros(len(acts), batch, width)                  # [L, B, D]
    step = max(1, _GATHER_CHUNK_BYTES // max(1, image_of.numel() * width * acts[0].element_size()))
    for start in range(0, len(acts), step):
        rows = torch.stack([a[image_of, token_of] for a in acts[start:start + step]])  # [l, M, D]
        scores[start:start + step].index_add_(1, image_of, rows.abs_().mul_(weights))
    if sparsity:
        scratch = torch.empty_like(acts[0])
        ones = acts[0].new_ones(batch, 1, tokens)
        silent = torch.stack([torch.bmm(ones, torch.lt(a, SPARSE_ACTIVATION, out=scratch))[:, 0]
                              for a in acts])                            # [L, B, D]
        scores.mul_(silent >= SPARSE_FRACTION * tokens)
    return scores


@torch.no_grad()
def detect_register_neurons(
    hooked: HookedViT,
    batches: Iterable[torch.Tensor],
    *,
    detect_layer: int,
    threshold: float,
    sparsity: bool = True,
    progress=None,
) -> DetectionResult:
    """Score every (layer, neuron) over ``batches`` of preprocessed images ``[B, 3, H, W]``.

    The model runs as released: no test-time registers, no intervention.
    """
    backbone = hooked.backbone
    layers = tuple(range(backbone.num_layers))
    index = hooked.layer_index(detect_layer)
    capture = Capture(residual=(index,), neurons=layers)
    score_sums = torch.zeros(len(layers), backbone.mlp_width, dtype=torch.float64, device=backbone.device)
    used = counted = 0
    max_norm = 0.0
    for images in batches:
        _, cache = hooked.run(images.to(backbone.device), capture=capture)
        norms = cache[("residual", index)].norm(dim=-1)                  # [B, N]
        max_norm = max(max_norm, float(norms.max()))
        outliers = norms > threshold                                     # [B, N]
        per_image = outliers.sum(dim=1)                                  # [B]
        used += images.shape[0]
        if bool(per_image.any()):
            # (no local name keeps this batch's activations alive into the next forward)
            score_sums += _layer_scores([cache[("neurons", layer)] for layer in layers], outliers,
                                        per_image, sparsity).sum(dim=1, dtype=torch.float64)
            counted += int((per_image > 0).sum())
        del cache
        if progress is not None:
            progress.update(images.shape[0])
    if counted == 0:
        raise NoOutliersError(max_norm=max_norm, threshold=threshold, images=used, detect_layer=detect_layer)
    scores = (score_sums / counted).cpu().numpy()
    return DetectionResult(
        ranked=rank_scores(scores), threshold=float(threshold), detect_layer=detect_layer,
        detect_layer_index=index, images_used=used, images_counted=counted, max_norm_seen=max_norm,
    )


class NoOutliersError(UserError):
    """No image had a token above the threshold; carries what the message needs."""

    def __init__(self, *, max_norm: float, threshold: float, images: int, detect_layer: int,
                 suggestion: float | None = None):
        self.max_norm, self.threshold, self.images, self.detect_layer = max_norm, threshold, images, detect_layer
        self.suggestion = suggestion
        super().__init__(self._message())

    def _message(self) -> str:
        hint = (f"try --set register_norm_threshold={self.suggestion:.1f} (suggested from the norm "
                "distribution) or register_norm_threshold=auto" if self.suggestion is not None
                else "lower register_norm_threshold or set it to auto")
        return (
            f"no outlier tokens: none of {self.images} detection images has a token norm above "
            f"register_norm_threshold={self.threshold:g} at layer {self.detect_layer} (largest norm "
            f"seen: {self.max_norm:.1f}); {hint}"
        )

    def with_suggestion(self, suggestion: float) -> "NoOutliersError":
        return NoOutliersError(max_norm=self.max_norm, threshold=self.threshold, images=self.images,
                               detect_layer=self.detect_layer, suggestion=suggestion)
