"""CLIP zero-shot classification from class-name prompts, no-ttr vs ttr (the paper's own measure
for CLIP; no training at all).

Each class is the mean of its prompts' unit-norm text embeddings (renormalised); an image's
class probabilities are the softmax of ``logit_scale x cosine(image, class)`` over the classes,
with the image embedding the run's pooled feature of each mode.  The prompts come from
``configs.ZERO_SHOT`` and are recorded with the run.
"""

from __future__ import annotations

import numpy as np
import torch

import configs
from common.errors import UserError
from common.models.family import TextEncoder


def readable(class_name: str, dataset: str) -> str:
    """A class name as words for a prompt (``configs.ZERO_SHOT``'s ``class_names`` first)."""
    settings = configs.ZERO_SHOT.get(dataset, {})
    if class_name in settings.get("class_names", {}):
        return settings["class_names"][class_name]
    name = class_name
    if " - " in name:
        maker, model = name.split(" - ", 1)
        name = f"{settings.get('manufacturers', {}).get(maker.strip(), maker.strip())} {model.strip()}"
    return " ".join(name.replace("_", " ").split())


def class_prompts(dataset: str, class_names: list[str]) -> list[list[str]]:
    """Per class (in our class order), its prompts."""
    templates = configs.ZERO_SHOT.get(dataset, {}).get("templates")
    if not templates:
        raise UserError(f"no zero-shot templates for {dataset!r} in configs.ZERO_SHOT; add some")
    return [[template.format(readable(name, dataset)) for template in templates] for name in class_names]


def class_embeddings(text: TextEncoder, prompts: list[list[str]]) -> torch.Tensor:
    """``[C, d]`` unit-norm class embeddings: the renormalised mean of each class's prompts."""
    rows = []
    for class_prompts_ in prompts:
        mean = text.embed(class_prompts_).mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def zero_shot_probabilities(image_features: np.ndarray, classes: torch.Tensor, logit_scale: float) -> np.ndarray:
    """``[N, C]`` probabilities for pooled image features ``[N, d]`` and class embeddings ``[C, d]``."""
    images = torch.from_numpy(np.asarray(image_features, dtype=np.float32))
    images = images / images.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    logits = logit_scale * images @ classes.float().cpu().T
    return torch.softmax(logits.double(), dim=-1).numpy()
