"""The bad-input matrix for object masks (a manifest's ``mask`` column, docs/datasets.md): a mask of
the wrong size, one that is not binary, one that is not an image, one that is not there - each one ``error:`` line naming the
mask and what to do, exit 2, nothing the user gave changed; a column filled in for some images only
is fine.  The harness is tests/badinput.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from badinput import (
    Case,
    Ctx,
    Result,
    _both,
    _count_rows,
    _offline,  # noqa: F401  (an autouse fixture, picked up by name)
    params,
    run_case,
    trees,  # noqa: F401  (a fixture, picked up by name)
    write,
    write_png,
)


def _mask(path, size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], 255, np.uint8)).save(path)


def _masked_manifest(ctx: Ctx, bad: str | None = None) -> list[str]:
    """18 images (3 classes x 6), every second one with a mask in ``masks/``; ``bad`` spoils the
    mask of ``g1_1.png``."""
    rows = []
    for k in range(3):
        for n in range(6):
            write_png(ctx.inp / "images" / f"g{k}_{n}.png")
            split = "test" if n == 0 else "val" if n == 1 else "train"
            mask = f"../masks/g{k}_{n}.png" if n % 2 else ""
            if mask:
                _mask(ctx.inp / "masks" / f"g{k}_{n}.png")
            rows.append(f"../images/g{k}_{n}.png,{k},{split},{mask}")
    spoiled = ctx.inp / "masks" / "g1_1.png"
    if bad == "size":
        _mask(spoiled, size=(31, 32))
    elif bad == "text":
        write(spoiled, b"not a mask\n")
    elif bad == "grey":
        write_png(spoiled)                                  # an ordinary image: many grey levels
    elif bad == "missing":
        spoiled.unlink()
    csv = ctx.inp / "meta" / "labels.csv"
    write(csv, ("path,label,split,mask\n" + "\n".join(rows) + "\n").encode())
    return ["--check_data", "--manifest", str(csv)]


def _says(*texts: str):
    def check(ctx: Ctx, result: Result) -> None:
        for text in texts:
            assert text in result.text
    return check


MASK_CASES = [
    Case("manifest-mask-of-another-size-exit2-names-the-mask-and-both-sizes", "aptos",
         lambda ctx: _masked_manifest(ctx, "size"), 2, ("masks/g1_1.png", "31x32", "images/g1_1.png", "32x32"),
         r"give a binary mask image .* of the image's size"),
    Case("manifest-mask-that-is-not-an-image-exit2-names-it", "aptos", lambda ctx: _masked_manifest(ctx, "text"), 2,
         ("masks/g1_1.png", "cannot be read"), r"give a binary mask image"),
    Case("manifest-mask-not-binary-exit2-names-it", "aptos", lambda ctx: _masked_manifest(ctx, "grey"), 2,
         ("masks/g1_1.png", "is not binary"), r"give a binary mask image"),
    Case("manifest-mask-file-missing-exit2-names-it", "aptos", lambda ctx: _masked_manifest(ctx, "missing"), 2,
         ("masks/g1_1.png", "not found"), r"fix the mask column"),
    Case("manifest-mask-column-filled-for-some-images-exit0", "aptos", _masked_manifest, 0,
         check=_both(_count_rows(18), _says("Object masks: 9 image(s), 0 of them in test"))),
]


@pytest.mark.parametrize("case", params(MASK_CASES))
def test_bad_masks(case: Case, tmp_path, trees, capsys):
    problems = run_case(case, tmp_path, trees, capsys)
    assert not problems, "\n".join(problems)
