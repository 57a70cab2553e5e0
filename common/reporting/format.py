"""How every report writes its numbers: ``summary.md`` of a run, ``report.md`` of
``python -m common.report`` and the study's ``report.md``.

One rule each, so the same p-value reads the same everywhere:

* a missing value (None, NaN) is ``n/a``;
* a metric, a rate or a score: 3 decimals (``0.812``); a difference: signed (``+0.031``);
* an interval: ``[lo, hi]``; an estimate: ``value [lo, hi]`` and, for the spread over probe
  seeds, ``sd x`` (:func:`spread`): an exact 0 is written ``sd 0`` (the seeds agree), a spread
  that is not 0 but rounds to it ``sd < 0.001``, and nothing with one seed (no spread exists);
  float noise never reaches here (the SD of values equal within 1e-12 is stored as exactly 0);
* a p-value: 3 decimals, below 0.001 ``< 0.001``, never a bare 0 (no test of
  :mod:`common.evaluation.stats` gives 0: McNemar's is exact, a permutation p is at least
  1/(B + 1));
* a share as a percentage with 1 decimal (``12.5%``); a share that is not 0 but rounds to 0 is
  ``< 0.1%``, never ``0.0%``;
* a metric by its label (:data:`common.evaluation.metrics.METRIC_LABELS`), in that table's order.
"""

from __future__ import annotations

import pandas as pd

from common.evaluation.metrics import METRIC_LABELS

MISSING = "n/a"
P_FLOOR = 0.001        # p-values below this are written "< 0.001"


def is_missing(value) -> bool:
    """True for None and NaN (Python, numpy or pandas)."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def number(value, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or ``n/a``."""
    return MISSING if is_missing(value) else f"{float(value):.{digits}f}"


def signed(value, digits: int = 3) -> str:
    """A difference: always with its sign (``+0.031``, ``-0.004``), or ``n/a``."""
    return MISSING if is_missing(value) else f"{float(value):+.{digits}f}"


def interval(lo, hi, *, sign: bool = False, digits: int = 3) -> str:
    """``[lo, hi]`` (signed with ``sign``)."""
    write = signed if sign else number
    return f"[{write(lo, digits)}, {write(hi, digits)}]"


def spread(sd, digits: int = 3) -> str:
    """A standard deviation over probe seeds: ``sd 0.012``; ``sd 0`` for an exact 0; ``sd < 0.001``
    for one that is not 0 but rounds to 0; ``""`` when missing (one seed: no spread)."""
    if is_missing(sd):
        return ""
    if float(sd) == 0:
        return "sd 0"
    smallest = 10.0 ** -digits
    return f"sd < {smallest:g}" if float(sd) < smallest / 2 else f"sd {number(sd, digits)}"


def estimate(value, lo, hi, *, sd=None, sign: bool = False, digits: int = 3) -> str:
    """``value [lo, hi]``, then the seed spread (:func:`spread`) when ``sd`` is given and not
    missing; ``n/a`` when the value is missing."""
    if is_missing(value):
        return MISSING
    write = signed if sign else number
    text = f"{write(value, digits)} {interval(lo, hi, sign=sign, digits=digits)}"
    return text if is_missing(sd) else f"{text} {spread(sd, digits)}"


def p_value(p) -> str:
    """A p-value: ``0.012``; ``< 0.001``; ``n/a``."""
    if is_missing(p):
        return MISSING
    return f"< {P_FLOOR:g}" if p < P_FLOOR else f"{float(p):.3f}"


def p_text(p) -> str:
    """A p-value in a sentence: ``p = 0.012``, ``p < 0.001``, ``p = n/a``."""
    text = p_value(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def percent(fraction, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage: ``12.5%``; ``< 0.1%`` for a share that is not 0 but
    rounds to 0; ``n/a``."""
    if is_missing(fraction):
        return MISSING
    value = 100.0 * float(fraction)
    smallest = 10.0 ** -digits
    if 0 < value < smallest / 2:
        return f"< {smallest:g}%"
    return f"{value:.{digits}f}%"


def metric_label(name: str, capital: bool = False) -> str:
    """The human name of a metric (``top1`` -> ``top-1 accuracy``); an unknown name as it is."""
    label = METRIC_LABELS.get(name, name)
    return label[:1].upper() + label[1:] if capital else label


def in_report_order(names) -> list[str]:
    """``names`` ordered as the label table orders metrics; unknown names last, sorted."""
    names = set(names)
    return [m for m in METRIC_LABELS if m in names] + sorted(names - set(METRIC_LABELS))


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table as lines; ``|`` inside a cell is escaped."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|")

    return (["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])

