"""Register-neuron detection (docs/detection.md), streaming over batches.

The model runs as released (no test-time register, no intervention).  The candidate positions
are CLS and the image patches: trained registers (the ``_reg`` DINOv2 models, DINOv3) are
high-norm by design and are neither outlier candidates nor counted in N.  For each image:
outlier positions are the candidates whose L2 norm at layer output ``k`` is ``> threshold``;
images without one are skipped.  For every layer ``l`` and neuron ``j``, ``score_l[j]`` is the
mean ``|activation|`` over the outlier positions, times the sparsity filter (``activation < 0.5``
at no fewer than half of the N candidate positions).  The final score is the mean over counted
images.  Only running sums are kept, so memory does not grow with the number of images.

For a model with trained registers the same pass also sums their residual state at every block's
output (:class:`common.registers.trained.TrainedAccumulator`, over every detection image): the
mean and standard deviation that the trained-register controls substitute (docs/intervention.md).
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import numpy as np
import torch

from common.errors import UserError
from common.models.hooks import HookedViT, mlp_post, resid_post
from common.registers.neurons import SPARSE_ACTIVATION, SPARSE_FRACTION, NeuronRanking
from common.registers.trained import TrainedAccumulator

log = logging.getLogger(__name__)

# Activations of all layers for one batch are held until the detect layer is reached.
DETECT_MEMORY_BUDGET_BYTES = 1 << 30
# Bytes of gathered outlier rows processed at once (several layers per kernel when they fit).
_GATHER_CHUNK_BYTES = 64 << 20


def rank_scores(scores: np.ndarray) -> list[tuple[int, int, float]]:
    """``scores [L, D]`` -> every (layer, neuron, score), score descending, ties by (layer, neuron)."""
    layers, neurons = np.meshgrid(np.arange(scores.shape[0]), np.arange(scores.shape[1]), indexing="ij")
    flat_scores, flat_layers, flat_neurons = scores.ravel(), layers.ravel(), neurons.ravel()
    order = np.lexsort((flat_neurons, flat_layers, -flat_scores))
    # .tolist() gives the same Python ints and floats as int()/float() per element, ~10x faster
    return list(zip(flat_layers[order].tolist(), flat_neurons[order].tolist(), flat_scores[order].tolist()))


def suggest_threshold(norms: np.ndarray) -> tuple[float, str]:
    """A norm threshold from a sample of candidate-token norms, and why; always strictly below the
    largest norm, so following it finds outliers.

    Outlier tokens form a separate high-norm mode, a minority of the tokens (on images with much
    uniform background it can exceed 20%).  Among the top half of the norms we look for the
    largest multiplicative gap between neighbouring sorted values; when it is at least 1.5x the
    threshold is the geometric middle of the gap.  Without such a gap the norms look unimodal:
    median + 10 x MAD, capped below the largest norm (then only the top tail is "outlying", and
    the reason says so).
    """
    values = np.sort(np.asarray(norms, dtype=np.float64).ravel())
    values = values[np.isfinite(values) & (values > 0)]
    if values.size < 2:
        raise UserError("no token norms were seen; check that the detection images load")
    largest = float(values[-1])
    start = max(int(0.5 * values.size) - 1, 0)
    upper = values[start:]
    ratios = upper[1:] / upper[:-1]
    best = int(np.argmax(ratios)) if ratios.size else 0
    if ratios.size and ratios[best] >= 1.5:
        low, high = upper[best], upper[best + 1]
        threshold = float(math.sqrt(low * high))
        share = float((values > threshold).mean())
        return threshold, (
            f"largest gap in the top half of {values.size} token norms: between {low:.1f} and "
            f"{high:.1f} (x{ratios[best]:.1f}); geometric middle {threshold:.1f}, {share:.1%} of tokens above"
        )
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    robust = median + 10.0 * max(mad, 1e-6)
    below = values[values < largest]
    if robust < largest:
        threshold = robust
        how = f"median {median:.1f} + 10 x MAD {mad:.2f} = {threshold:.1f}"
    else:
        # Nothing stands 10 MADs out: take the middle between the two largest distinct norms.
        second = float(below[-1]) if below.size else largest * 0.99
        threshold = 0.5 * (second + largest)
        how = (f"median + 10 x MAD = {robust:.1f} is not below the largest norm {largest:.1f}, so the "
               f"threshold is {threshold:.1f}, between the two largest norms")
    share = float((values > threshold).mean())
    return threshold, (
        f"no gap of 1.5x or more among the top half of {values.size} token norms (they look unimodal: "
        f"there may be no register-like outliers); {how}, {share:.1%} of tokens above"
    )


def detection_batch_size(backbone, requested: int) -> int:
    """Largest batch (<= requested) whose activations of every layer fit the memory budget."""
    per_image = backbone.num_layers * (backbone.num_patches + backbone.num_prefix_tokens) * backbone.mlp_width * 4
    return max(1, min(requested, DETECT_MEMORY_BUDGET_BYTES // per_image))


class _StopForward(Exception):
    """Raised from a hook to end a forward once the layer of interest has run."""


@torch.no_grad()
def collect_norms(hooked: HookedViT, batches: Iterable[torch.Tensor], detect_layer: int) -> np.ndarray:
    """Norms of the candidate tokens (CLS and image patches) at layer output ``detect_layer``,
    all images pooled ``[M]``; each forward runs only up to that layer."""
    backbone = hooked.backbone
    index = hooked.layer_index(detect_layer)
    candidates = hooked.token_layout(0).candidates(backbone.device)
    collected: list[np.ndarray] = []

    def stop(tensor, name):
        collected.append(tensor.float().norm(dim=-1)[:, candidates].flatten().cpu().numpy())
        raise _StopForward

    for images in batches:
        try:
            hooked.run_with_hooks(images.to(backbone.device), [(resid_post(index), stop)])
        except _StopForward:
            pass
    return np.concatenate(collected) if collected else np.zeros(0)


def _layer_scores(acts: list[torch.Tensor], outliers: torch.Tensor, per_image: torch.Tensor,
                  candidates: torch.Tensor, sparsity: bool) -> torch.Tensor:
    """Per-image scores ``[L, B, D]`` of one batch: mean |activation| over each image's outlier
    positions, times the sparsity filter.  An image without an outlier position scores 0.

    Written for few kernel launches per layer (on a busy CPU every parallel kernel can cost a
    scheduler time slice, whatever its size): only the rows at the outlier positions are
    gathered (one kernel per layer) and scored for several layers at once; the count of
    ``activation < 0.5`` over the N candidate positions is a batched matmul with a 0/1 row
    that is 1 at the candidates (exact in float32 for N < 2**24).
    """
    acts = [a.float() for a in acts]                                     # no-op in fp32
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
        counted = candidates.to(acts[0].dtype).expand(batch, 1, tokens)  # [B, 1, N]
        silent = torch.stack([torch.bmm(counted, torch.lt(a, SPARSE_ACTIVATION, out=scratch))[:, 0]
                              for a in acts])                            # [L, B, D]
        scores.mul_(silent >= SPARSE_FRACTION * int(candidates.sum()))
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
    reduce=None,
) -> NeuronRanking:
    """Score every (layer, neuron) over ``batches`` of preprocessed images ``[B, 3, H, W]``.

    ``reduce(sums float64, counts [3])`` -> the same summed over every process (torchrun;
    identity when None); ``sums`` holds the score sums ``[L, D]`` (and, flattened behind them, the
    trained registers' sums), ``counts`` images used, images counted, max norm.  The ranking's
    ``trained`` holds the trained registers' statistics (None without trained registers).
    """
    backbone = hooked.backbone
    layers = tuple(range(backbone.num_layers))
    index = hooked.layer_index(detect_layer)
    names = [resid_post(index)] + [mlp_post(layer) for layer in layers]
    candidates = hooked.token_layout(0).candidates(backbone.device)
    score_sums = torch.zeros(len(layers), backbone.mlp_width, dtype=torch.float64, device=backbone.device)
    trained = TrainedAccumulator(hooked) if backbone.num_prefix_tokens > int(backbone.has_cls) else None
    reading = trained.fwd_hooks() if trained is not None else ()
    used = counted = 0
    max_norm = 0.0
    for images in batches:
        _, cache = hooked.run_with_cache(images.to(backbone.device), names, fwd_hooks=reading)
        norms = cache[resid_post(index)].float().norm(dim=-1)           # [B, N]
        norms[:, ~candidates] = 0.0                                      # trained registers never count
        max_norm = max(max_norm, float(norms.max()))
        outliers = norms > threshold                                     # [B, N]
        per_image = outliers.sum(dim=1)                                  # [B]
        used += images.shape[0]
        if bool(per_image.any()):
            # (no local name keeps this batch's activations alive into the next forward)
            score_sums += _layer_scores([cache[mlp_post(layer)] for layer in layers], outliers,
                                        per_image, candidates, sparsity).sum(dim=1, dtype=torch.float64)
            counted += int((per_image > 0).sum())
        del cache
        if progress is not None:
            progress.update(images.shape[0])
    if reduce is not None:
        packed = score_sums if trained is None else torch.cat([score_sums.flatten(), trained.sums.flatten()])
        packed, (used, counted, max_norm) = reduce(packed, (used, counted, max_norm))
        score_sums = packed[:score_sums.numel()].view_as(score_sums)
        if trained is not None:
            trained.sums = packed[score_sums.numel():].view_as(trained.sums)
    if counted == 0:
        raise NoOutliersError(max_norm=max_norm, threshold=threshold, images=used, detect_layer=detect_layer)
    scores = (score_sums / counted).cpu().numpy()
    return NeuronRanking(
        ranked=rank_scores(scores), threshold=float(threshold), detect_layer=detect_layer,
        detect_layer_index=index, images_used=used, images_counted=counted, max_norm_seen=max_norm,
        identity=backbone.identity, trained=trained.stats(used) if trained is not None else None,
    )


class NoOutliersError(UserError):
    """No image had a candidate token above the threshold; carries what the message needs."""

    def __init__(self, *, max_norm: float, threshold: float, images: int, detect_layer: int,
                 suggestion: float | None = None):
        self.max_norm, self.threshold, self.images, self.detect_layer = max_norm, threshold, images, detect_layer
        self.suggestion = suggestion
        super().__init__(self._message())

    def _shown_suggestion(self) -> str:
        """The suggestion as printed: one decimal, unless rounding would reach the largest norm
        (following the advice must find outliers)."""
        shown = f"{self.suggestion:.1f}"
        if float(shown) < self.max_norm:
            return shown
        return f"{math.floor(self.suggestion * 1000) / 1000:.3f}"

    def _message(self) -> str:
        hint = (f"try --set register_norm_threshold={self._shown_suggestion()} (suggested from the norm "
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
