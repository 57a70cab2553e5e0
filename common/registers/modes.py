"""The feature-extraction modes of a run: one definition, used everywhere (docs/intervention.md, docs/run.md).

* ``no-ttr``: the model as released (no test-time register, no intervention); the baseline.
* ``ttr``: R >= 1 zero register tokens appended and the register neurons moved onto them.
* ``no-ttr-removed``: an extra, opt-in experiment (docs/intervention.md step 3 alone, R = 0): the register
  neurons' outlier activations removed with nowhere to go.  Never reported as ttr.
* the **controls** (docs/intervention.md, "Controls"), opt-in, each scored against no-ttr like ttr:
  ``ttr-random`` (ttr on random neurons; it runs as ``random_draws`` modes ``ttr-random-01``, ...),
  ``ttr-mean``, ``ttr-noise``, ``ttr-shuffle`` (ttr with another value on the registers), and for
  models with trained registers ``trained-zero``, ``trained-mean``, ``trained-noise``, ``trained-shuffle``.

Free of torch: the settings import it before argparse runs.
"""

BASELINE = "no-ttr"
TTR = "ttr"
REMOVED = "no-ttr-removed"

# ttr with the registers given another value than the signed max (the patches as in ttr)
TTR_MEAN = "ttr-mean"
TTR_NOISE = "ttr-noise"
TTR_SHUFFLE = "ttr-shuffle"
# ttr on random neurons, layer-matched to the selected ones (one mode per draw)
TTR_RANDOM = "ttr-random"
# the trained registers' residual state replaced at the output of every block (no test-time register)
TRAINED_ZERO = "trained-zero"
TRAINED_MEAN = "trained-mean"
TRAINED_NOISE = "trained-noise"
TRAINED_SHUFFLE = "trained-shuffle"

SUBSTITUTES: tuple[str, ...] = (TTR_MEAN, TTR_NOISE, TTR_SHUFFLE)
TRAINED_CONTROLS: tuple[str, ...] = (TRAINED_ZERO, TRAINED_MEAN, TRAINED_NOISE, TRAINED_SHUFFLE)
# what --controls turns on (the trained ones only for a model with trained registers)
CONTROLS: tuple[str, ...] = (TTR_RANDOM, REMOVED, *SUBSTITUTES, *TRAINED_CONTROLS)

MODES: tuple[str, ...] = (BASELINE, TTR)      # every run computes these
# computed when asked for (config key ``extra_modes``, or ``--controls``)
EXTRA_MODES: tuple[str, ...] = (REMOVED, TTR_RANDOM, *SUBSTITUTES, *TRAINED_CONTROLS)

# Rows a run may add to metrics.csv besides its modes: the same comparison made another way.
ZERO_SHOT_SUFFIX = " (zero-shot)"        # CLIP zero-shot from class-name prompts (--zero_shot)
COURSE_SUFFIX = " (course probe)"        # the course project's saved probes (--reference_probes)


def predictions_file(mode: str) -> str:
    """The predictions file of a metrics.csv row: ``predictions_<mode>.csv``, zero-shot rows
    ``predictions_zero-shot_<mode>.csv`` (course probe rows have none)."""
    if mode.endswith(ZERO_SHOT_SUFFIX):
        return f"predictions_zero-shot_{mode.removesuffix(ZERO_SHOT_SUFFIX)}.csv"
    return f"predictions_{mode}.csv"


# --------------------------------------------------------------------------------------------
# the controls


def draw_modes(draws: int) -> tuple[str, ...]:
    """The modes of ``ttr-random``'s draws: ``ttr-random-01`` .. (zero-padded so they sort)."""
    width = max(2, len(str(draws)))
    return tuple(f"{TTR_RANDOM}-{k:0{width}d}" for k in range(1, draws + 1))


def draw_index(mode: str) -> int | None:
    """1-based draw number of a ``ttr-random-NN`` mode; None for any other mode."""
    prefix = TTR_RANDOM + "-"
    if mode.startswith(prefix) and mode[len(prefix):].isdigit():
        return int(mode[len(prefix):])
    return None


def is_control(mode: str) -> bool:
    """A control mode (``no-ttr-removed`` included) or one of ``ttr-random``'s draws."""
    return mode in CONTROLS or draw_index(mode) is not None


def applicable_controls(trained_registers: int) -> tuple[str, ...]:
    """The controls that apply to a model with ``trained_registers`` trained register tokens."""
    return tuple(m for m in CONTROLS if m not in TRAINED_CONTROLS or trained_registers > 0)


def inapplicable(modes, trained_registers: int) -> list[str]:
    """The modes of ``modes`` that do not apply to such a model (the trained-register controls
    without trained registers)."""
    return [m for m in modes if m in TRAINED_CONTROLS and trained_registers <= 0]


def run_modes(extra_modes, *, controls: bool, random_draws: int, trained_registers: int) -> tuple[str, ...]:
    """Every mode a run computes, in ``metrics.csv`` order: no-ttr, ttr, the ``extra_modes`` asked
    for (and with ``controls`` every control that applies), ``ttr-random`` expanded into its draws
    at the end.  Raises ValueError for a mode that does not apply (checked where settings enter)."""
    asked = list(extra_modes) + (list(applicable_controls(trained_registers)) if controls else [])
    bad = inapplicable(asked, trained_registers)
    if bad:
        raise ValueError(f"{bad[0]} needs a model with trained registers")
    ordered = [m for m in EXTRA_MODES if m in asked and m != TTR_RANDOM]
    draws = draw_modes(random_draws) if TTR_RANDOM in asked else ()
    return (*MODES, *ordered, *draws)
