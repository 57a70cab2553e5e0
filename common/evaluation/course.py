"""The course project's saved linear probes as inputs (docs/datasets.md, docs/run.md ``--reference_probes``).

Its ``Trained_Models/<dataset>_<model>/`` folders hold ``best_model_no_ttr.pth`` and
``best_model_ttr.pth``: the state dict of one ``nn.Linear`` (``fc.weight [C, d]``, ``fc.bias [C]``)
applied to the raw, unstandardised pooled feature.  Its class order is the course code's: the
sorted raw labels, which :attr:`common.data.registry.Dataset.course_class_order` maps onto ours.
The files are read with ``weights_only=True`` (no code is unpickled) onto the CPU (they were
saved from CUDA tensors).
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.errors import UserError
from common.registers.modes import BASELINE, TTR

PROBE_FILES = {BASELINE: "best_model_no_ttr.pth", TTR: "best_model_ttr.pth"}


@dataclass
class CourseProbe:
    """One saved probe: ``weight [C, d]``, ``bias [C]`` in the course code's class order."""

    path: Path
    weight: np.ndarray
    bias: np.ndarray

    def predict_proba(self, features: np.ndarray, course_class_order: Sequence[int]) -> np.ndarray:
        """Softmax probabilities ``[N, C]`` in OUR class order for raw pooled ``features [N, d]``."""
        if features.shape[1] != self.weight.shape[1]:
            raise UserError(f"--reference_probes {self.path}: fc.weight is {list(self.weight.shape)} but this "
                            f"run's pooled features are {features.shape[1]}-d (shape {list(features.shape)}); "
                            "use the probes saved for this backbone")
        logits = features.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias.astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        course = np.exp(logits)
        course /= course.sum(axis=1, keepdims=True)
        ours = np.empty_like(course)
        ours[:, list(course_class_order)] = course
        return ours


def load_probe(path: Path, n_classes: int) -> CourseProbe:
    """Read one saved probe, checking its shape against the dataset's ``n_classes``."""
    import torch

    if not path.is_file():
        raise UserError(f"--reference_probes: {path} not found; the folder must hold "
                        f"{' and '.join(PROBE_FILES.values())}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise UserError(f"--reference_probes: {path} cannot be read safely ({type(error).__name__}: "
                        f"{' '.join(str(error).split())[:160]}); pass the course project's saved probes") from None
    if not isinstance(state, dict) or not {"fc.weight", "fc.bias"} <= set(state):
        keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise UserError(f"--reference_probes: {path} holds {keys}, not a linear probe with fc.weight and fc.bias")
    weight = state["fc.weight"].detach().float().numpy()
    bias = state["fc.bias"].detach().float().numpy()
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise UserError(f"--reference_probes: {path} has fc.weight {list(weight.shape)} and fc.bias "
                        f"{list(bias.shape)}; expected [C, d] and [C]")
    if weight.shape[0] != n_classes:
        raise UserError(f"--reference_probes: {path} has fc.weight {list(weight.shape)} ({weight.shape[0]} classes) "
                        f"but this dataset has {n_classes} classes; use the probes saved for this dataset")
    return CourseProbe(path=path, weight=weight, bias=bias)


def load_probes(folder: str | Path, n_classes: int, feature_width: int) -> dict[str, CourseProbe]:
    """``{mode: CourseProbe}`` for no-ttr and ttr from a course ``Trained_Models/<dataset>_<model>/``,
    checked against the dataset's classes and the backbone's pooled feature width (before any
    extraction)."""
    folder = Path(folder)
    probes = {mode: load_probe(folder / name, n_classes) for mode, name in PROBE_FILES.items()}
    for probe in probes.values():
        if probe.weight.shape[1] != feature_width:
            raise UserError(f"--reference_probes: {probe.path} has fc.weight {list(probe.weight.shape)} but this "
                            f"backbone's pooled feature is {feature_width}-d (expected [{n_classes}, "
                            f"{feature_width}]); use the probes saved for this backbone")
    return probes
