"""The feature-extraction modes of a run: one definition, used everywhere (SPEC §4, §7).

* ``no-ttr``: the model as released (no test-time register, no intervention); the baseline.
* ``ttr``: R >= 1 zero register tokens appended and the register neurons moved onto them.
* ``no-ttr-removed``: an extra, opt-in experiment (SPEC §4 step 3 alone, R = 0): the register
  neurons' outlier activations removed with nowhere to go.  Never reported as ttr.
"""

BASELINE = "no-ttr"
TTR = "ttr"
REMOVED = "no-ttr-removed"

MODES: tuple[str, ...] = (BASELINE, TTR)      # every run computes these
EXTRA_MODES: tuple[str, ...] = (REMOVED,)     # computed when asked for (config key ``extra_modes``)
