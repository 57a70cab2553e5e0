"""The attention-localization part of summary.md (docs/localization.md): one sentence for the
opening (the share of attention inside the object masks, no-ttr and ttr, the paired difference) and
the section with every metric's mean per mode, the paired difference with its bootstrap interval and
permutation p-value, what each metric is, the figure and the notes."""

from __future__ import annotations

from common.evaluation.localization import ACCUMULATED_IOU, LocalizationResult, summary_value
from common.registers.modes import BASELINE, TTR
from common.reporting.format import (
    estimate,
    interval,
    is_missing,
    markdown_table,
    number,
    p_text,
    p_value,
    signed,
)

LOCALIZATION_LABELS = {"energy_in_mask": "energy in mask", "pointing_hit": "pointing hit",
                       "iou": "IoU (mean over images)", ACCUMULATED_IOU: "IoU (accumulated over images)"}


def localization_effect(result: LocalizationResult, mode: str = TTR, baseline: str = BASELINE) -> str:
    """One sentence: the share of the last layer's CLS attention inside the object masks, baseline
    and mode, with the paired difference and its interval (empty when not measured)."""
    summary = result.summary
    before = summary_value(summary, "energy_in_mask", baseline)
    if is_missing(before) or is_missing(summary_value(summary, "energy_in_mask", mode)):
        return ""
    d, lo, hi = (summary_value(summary, "energy_in_mask", mode, c) for c in ("diff", "diff_lo", "diff_hi"))
    p = summary_value(summary, "energy_in_mask", mode, "diff_p")
    return (f"Attention localization: on {int(summary_value(summary, 'energy_in_mask', mode, 'images'))} test "
            f"images with an object mask, the share of the last layer's CLS attention inside the mask goes from "
            f"{number(before)} ({baseline}) to {number(summary_value(summary, 'energy_in_mask', mode))} ({mode}), "
            f"a difference of {signed(d)}, 95% CI {interval(lo, hi, sign=True)} (paired bootstrap), {p_text(p)} "
            "(paired permutation).")


def localization_section(result: LocalizationResult, n_boot: int, n_perm: int, baseline: str = BASELINE) -> list[str]:
    """The summary's attention-localization section: per metric and mode the mean with its interval
    and the paired difference against ``baseline``, what each metric is, the figure, the notes."""
    lines = ["## Attention localization", ""]
    summary, table = result.summary, result.table
    if len(summary):
        images = int(summary["images"].iloc[0])
        share = float(table.loc[table["mode"] == baseline, "mask_share"].mean()) if len(table) else float("nan")
        lines += [f"Over {images} test image(s) with an object mask"
                  + (f" ({len(result.left_out)} left out: their mask is empty after the preprocessing)"
                     if result.left_out else "")
                  + ": the last layer's CLS attention on the image patches (CLS, trained and test-time registers "
                  "left out), averaged over heads and renormalised, upsampled bilinearly to the model's input and "
                  "compared with the mask brought there by the image's own resize and crop (nearest-neighbour). "
                  "Per image and mode in `localization.csv`.", ""]
        lines += markdown_table(
            ["metric", "mode", "mean [95% CI]", f"− {baseline} [95% CI]", "p"],
            [[LOCALIZATION_LABELS[row["metric"]], row["mode"], estimate(row["mean"], row["mean_lo"], row["mean_hi"]),
              "" if row["mode"] == baseline else estimate(row["diff"], row["diff_lo"], row["diff_hi"], sign=True),
              "" if row["mode"] == baseline else p_value(row["diff_p"])]
             for _, row in summary.iterrows()])
        lines += ["", f"Energy in mask: the attention's share inside the mask (uniform attention would give the "
                  f"mask's share of the image, {number(share)} on average here). Pointing hit: the share of images "
                  "whose attention maximum lies inside the mask. IoU: the attention binarised at its mean (pixels "
                  "above it) against the mask, per image and averaged; accumulated: intersections and unions summed "
                  "over the images first (the form of the test-time-registers paper's zero-shot segmentation). "
                  f"Intervals: percentile bootstrap over the images ({n_boot} resamples); differences: paired "
                  f"bootstrap, the same resamples for both modes; p: two-sided paired permutation test ({n_perm} "
                  "permutations, each image's two modes swapped at random). Exploratory: no adjustment for "
                  "multiplicity."]
    elif result.left_out:
        lines.append(f"Every test image with a mask ({len(result.left_out)}) was left out: each mask is empty after "
                     "the preprocessing (cropped away).")
    for name, caption in result.figures:
        lines += ["", f"![{caption}](figures/{name})", "", f"*{caption}*"]
    for note in result.notes:
        lines += ["", f"Note: {note}."]
    return lines
