"""The run figures' own choices (common/reporting/plots.py): which attention heads are drawn and the
colour scale a no-ttr/ttr pair shares.  The figures of a real analysis are drawn in
``tests/evaluation/test_analysis.py``."""

from __future__ import annotations

import numpy as np
from scipy.stats import entropy

from common.reporting.plots import _pair_scale, _shown_heads


def test_the_most_concentrated_heads_are_drawn():
    rng = np.random.default_rng(0)
    attention = rng.dirichlet(np.ones(16), size=6).reshape(6, 4, 4)   # [H, r, c], rows sum to 1
    attention[4] = 0.001
    attention[4, 1, 2] = 1.0                                             # a sink: lowest entropy
    assert _shown_heads(attention, 8) == list(range(6))                  # few heads: all of them
    by_entropy = np.argsort([entropy(head.ravel()) for head in attention])
    shown = _shown_heads(attention, 3)
    assert shown == sorted(by_entropy[:3].tolist()) and 4 in shown


def test_a_pair_shares_one_scale_from_its_own_minimum():
    a, b = np.array([[3.0, 5.0]]), np.array([[4.0, 9.0]])
    assert _pair_scale(a, b) == (3.0, 9.0)
    low, high = _pair_scale(np.full((2, 2), 7.0), np.full((2, 2), 7.0))   # flat maps still get a range
    assert low == 7.0 and high > low


def test_localization_figure_is_drawn(tmp_path):
    """Two images, no-ttr beside ttr: one PNG with a row per image and the input column first."""
    from PIL import Image

    from common.reporting.plots import localization_maps

    rng = np.random.default_rng(1)
    inputs = rng.random((2, 32, 32, 3))
    masks = np.zeros((2, 32, 32), bool)
    masks[:, 8:24, 8:24] = True
    maps = {"no-ttr": rng.random((2, 4, 4)), "ttr": rng.random((2, 4, 4))}
    path = tmp_path / "figures" / "localization.png"
    localization_maps(inputs, masks, maps, ["a.png", "b.png"], path)
    width, height = Image.open(path).size
    assert width > height > 0                  # three panels across, two rows
