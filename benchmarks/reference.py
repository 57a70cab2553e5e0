"""The reference repository's way of finding register neurons, for ``reference_over_detect`` of
benchmarks/throughput.py (docs/performance.md): plain torch hooks, batch size 1, every block's
output, every MLP's hidden activations and every attention map copied to host numpy, concatenated,
then scored layer by layer with numpy.  Never run by the tests.
"""

from __future__ import annotations

import numpy as np
import torch

from common.models.backbone import Backbone
from common.registers.neurons import SPARSE_ACTIVATION, SPARSE_FRACTION


@torch.no_grad()
def reference_detection(backbone: Backbone, images: torch.Tensor, detect_index: int,
                        threshold: float) -> tuple[np.ndarray, int]:
    """Batch size 1, everything copied to host numpy, concatenated, scored layer by layer.

    Returns (scores ``[L, D]``, counted images).
    """
    blocks = backbone.blocks
    outputs: list[list[np.ndarray]] = [[] for _ in blocks]
    activations: list[list[np.ndarray]] = [[] for _ in blocks]
    attentions: list[list[np.ndarray]] = [[] for _ in blocks]
    handles = []
    fused: list[tuple[torch.nn.Module, bool]] = []
    try:
        for layer, block in enumerate(blocks):
            handles.append(block.register_forward_hook(
                lambda module, args, output, layer=layer:
                    outputs[layer].append(output.detach().cpu().numpy())))
            handles.append(backbone.adapter.mlp_out(layer).register_forward_pre_hook(
                lambda module, args, layer=layer:
                    activations[layer].append(args[0].detach().cpu().numpy())))
            if backbone.family == "clip":
                def ask_weights(module, args, kwargs):
                    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

                handles.append(block.attn.register_forward_pre_hook(ask_weights, with_kwargs=True))
                handles.append(block.attn.register_forward_hook(
                    lambda module, args, output, layer=layer:
                        attentions[layer].append(output[1].detach().cpu().numpy())))
            else:
                # timm's explicit attention path: softmax(q k^T) goes through attn_drop.
                fused.append((block.attn, block.attn.fused_attn))
                block.attn.fused_attn = False
                handles.append(block.attn.attn_drop.register_forward_hook(
                    lambda module, args, output, layer=layer:
                        attentions[layer].append(output.detach().cpu().numpy())))
        for index in range(images.shape[0]):
            backbone.model(images[index:index + 1].to(backbone.device))
    finally:
        for handle in handles:
            handle.remove()
        for module, value in fused:
            module.fused_attn = value
    layer_outputs = [np.concatenate(parts) for parts in outputs]       # L x [n, N, d]
    layer_acts = [np.concatenate(parts) for parts in activations]      # L x [n, N, D]
    layer_attn = [np.concatenate(parts) for parts in attentions]       # L x [n, H, N, N]
    assert layer_attn[0].ndim == 4

    norms = np.linalg.norm(layer_outputs[detect_index], axis=-1)       # [n, N]
    outliers = norms > threshold
    counted = np.flatnonzero(outliers.any(axis=1))
    n_tokens = norms.shape[1]
    scores = np.zeros((len(blocks), layer_acts[0].shape[-1]), dtype=np.float64)
    for layer in range(len(blocks)):
        acts = layer_acts[layer]
        for image in counted:
            score = np.abs(acts[image][outliers[image]]).mean(axis=0)
            sparse = (acts[image] < SPARSE_ACTIVATION).sum(axis=0) >= SPARSE_FRACTION * n_tokens
            scores[layer] += score * sparse
    if len(counted):
        scores /= len(counted)
    return scores, len(counted)


def ranking_to_scores(ranked, layers: int, width: int) -> np.ndarray:
    scores = np.zeros((layers, width))
    for layer, neuron, score in ranked:
        scores[layer, neuron] = score
    return scores
