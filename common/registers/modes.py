"""The feature-extraction modes of a run: one definition, used everywhere (docs/intervention.md, docs/run.md).

* ``no-ttr``: the model as released (no test-time register, no intervention); the baseline.
* ``ttr``: R >= 1 zero register tokens appended and the register neurons moved onto them.
* ``no-ttr-removed``: an extra, opt-in experiment (docs/intervention.md step 3 alone, R = 0): the register
  neurons' outlier activations removed with nowhere to go.  Never reported as ttr.
"""

BASELINE = "no-ttr"
TTR = "ttr"
REMOVED = "no-ttr-removed"

MODES: tuple[str, ...] = (BASELINE, TTR)      # every run computes these
EXTRA_MODES: tuple[str, ...] = (REMOVED,)     # computed when asked for (config key ``extra_modes``)

# Rows a run may add to metrics.csv besides its modes: the same comparison made another way.
ZERO_SHOT_SUFFIX = " (zero-shot)"        # CLIP zero-shot from class-name prompts (--zero_shot)
COURSE_SUFFIX = " (course probe)"        # the course project's saved probes (--reference_probes)


def predictions_file(mode: str) -> str:
    """The predictions file of a metrics.csv row: ``predictions_<mode>.csv``, zero-shot rows
    ``predictions_zero-shot_<mode>.csv`` (course probe rows have none)."""
    if mode.endswith(ZERO_SHOT_SUFFIX):
        return f"predictions_zero-shot_{mode.removesuffix(ZERO_SHOT_SUFFIX)}.csv"
    return f"predictions_{mode}.csv"
