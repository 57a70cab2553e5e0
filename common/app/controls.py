"""A run's controls (docs/intervention.md, "Controls"): the modes it computes and what they need.

The trained registers' statistics come from the detection pass (cached with it).  A run whose
neurons came from ``--neurons`` (or a detection cached before the statistics existed) runs one
pass over the detection images for them when a trained-register control needs them (every rank
over every detection image: no reduction, the same numbers everywhere).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

from tqdm.auto import tqdm

from common.app.runstate import RunState
from common.evaluation.analysis import Analysis, ModeSetup
from common.models.hooks import HookedViT
from common.registers.controls import ControlInputs, ModeRun, mode_setup, modes_of_run
from common.registers.modes import REMOVED, TRAINED_MEAN, TRAINED_NOISE, is_control
from common.registers.trained import trained_register_stats

log = logging.getLogger(__name__)


def run_modes(state: RunState) -> tuple[str, ...]:
    """Every mode of the run (no-ttr, ttr, the extra modes and controls asked for, the random draws)."""
    return modes_of_run(state.config, state.backbone.identity.trained_registers)


def control_inputs(state: RunState, detection_paths: Callable[[], list[str]]) -> ControlInputs:
    """The seed, the model's sizes and the trained registers' statistics (computed here only when
    a control needs them and detection did not give them)."""
    backbone = state.backbone
    trained = state.ranking.trained if state.ranking is not None else None
    if trained is None and {TRAINED_MEAN, TRAINED_NOISE} & set(state.modes):
        paths = detection_paths()
        with tqdm(total=len(paths), unit="img", desc="trained registers' statistics", disable=not state.main) as bar:
            def batches():
                for images in state.bank.batches(paths, state.config["batch_size"]):
                    yield images
                    bar.update(images.shape[0])

            trained = trained_register_stats(HookedViT(backbone), batches())
        if state.main:
            log.info("trained registers' statistics over %d detection images (no detection pass gave them)",
                     trained.images)
    return ControlInputs(seed=int(state.config["seed"]), mlp_width=backbone.mlp_width, layers=backbone.num_layers,
                         trained=trained)


def mode_run(state: RunState, mode: str) -> ModeRun:
    """How ``mode`` runs in this run (its registers, its change of the forward, its cache description)."""
    return mode_setup(mode, state.intervention, state.config["num_registers"], state.controls)


def analysis_setup(state: RunState, mode: str) -> ModeSetup:
    """``mode`` as the analysis pass runs it: its hook functions are those of batch number 0 in
    every analysis batch (the seeded draws repeat from batch to batch there; the features use
    each batch's own)."""
    run = mode_run(state, mode)
    return ModeSetup(run.num_registers, run.fwd_hooks(HookedViT(state.backbone).token_layout(run.num_registers)))


def figure_modes(analysis: Analysis) -> Analysis:
    """The analysis of the modes the figures and ``outliers.csv`` show: no-ttr, ttr and
    no-ttr-removed (the other controls are summarised in ``controls.csv``)."""
    return replace(analysis, modes={m: a for m, a in analysis.modes.items() if m == REMOVED or not is_control(m)})
