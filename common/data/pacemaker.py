"""Pacemaker (Howard et al., JACC: Clinical Electrophysiology 2019): 1,676 chest X-rays of 45
pacemaker/defibrillator models from 5 manufacturers, with an official Test split of 5 images
per model.

Layouts read:

* ``Train/<class>/*`` and ``Test/<class>/*`` (any case; also ``training``/``testing``), with an
  optional ``val``/``valid``/``validation`` folder used as the val split (else val is carved
  from Train);
* class folders directly under the root (no official split: stratified 70/15/15).

Class names look like ``MDT - Adapta``: the part before `` - `` is the manufacturer, which the
report and the ``manufacturer_top1`` metric use.
"""

from __future__ import annotations

from pathlib import Path

from common.data.dataset import DatasetKind, Found, Notes, Painter, SyntheticSpec
from common.data.folders import class_folders
from common.data.manifest import generic_class

EXPECTED = ("class folders such as 'MDT - Adapta/' under Train/ and Test/ (any case; optional Val/), "
            "or class folders directly under it")

# Real device names for synthetic data; the first two share a manufacturer, so manufacturer
# accuracy differs from top-1.
SYNTHETIC_NAMES = (
    "MDT - Adapta", "MDT - Advisa", "STJ - Assurity", "BOS - Accolade", "BIO - Evia",
    "STJ - Endurity", "BOS - Altrua", "BIO - Entovis", "MDT - Sensia", "STJ - Accent",
    "BOS - Essentio", "BIO - Effecta", "SOR - Reply", "MDT - Azure", "STJ - Zephyr",
)
MAX_CLASSES = 45


def manufacturer_of(class_name: str) -> str:
    """The manufacturer part of a Pacemaker class name: ``"MDT - Adapta"`` -> ``"MDT"``."""
    return class_name.split(" - ", 1)[0].strip() if " - " in class_name else class_name


def _read(root: Path, notes: Notes) -> Found:
    table, layout = class_folders(root, notes)
    return Found(table, f"Pacemaker {layout}")


def _report_lines(class_names: list[str]) -> list[str]:
    makers = sorted({manufacturer_of(c) for c in class_names})
    return [f"Manufacturers: {len(makers)} ({', '.join(makers)})"]


def synthetic_names(classes: int) -> list[str]:
    """``classes`` plausible class names (real ones first, then ``GEN - Model NN``)."""
    names = list(SYNTHETIC_NAMES[:classes])
    return names + [f"GEN - Model {i:02d}" for i in range(len(names), classes)]


def _write_synthetic(root: Path, classes: int, per_class: int, layout: str, paint: Painter) -> None:
    """``Train/<class>/NNNN.png`` and ``Test/<class>/NNNN.png``, a fifth of each class in Test."""
    n_test = max(1, round(per_class * 0.2))
    for k, name in enumerate(synthetic_names(classes)):
        for n in range(per_class):
            paint.image(k, n, root / ("Test" if n < n_test else "Train") / name / f"{n:04d}.png")


DATASET = DatasetKind(
    name="pacemaker",
    expected=EXPECTED,
    read=_read,
    label_to_class=generic_class,
    labels_known="any text",
    report_lines=_report_lines,
    synthetic=SyntheticSpec(layouts=("folders",), default_classes=4, max_classes=MAX_CLASSES,
                            style="pacemaker", write=_write_synthetic),
)
