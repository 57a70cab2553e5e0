"""``python -m common.studyreport STUDY_DIR`` and ``write_report`` (common/reporting/studyreport.py):
the files it writes, writing them again from study.json, and a bad folder (exit 2, one line)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

from common.reporting.studyreport import main

ROOT = Path(__file__).resolve().parents[2]

FILES = ["calibration.csv", "calibration.png", "cells.csv", "neuron_overlap.csv", "outliers.csv",
         "outliers.png", "paper_table.csv", "paper_table.png", "per_class.csv", "per_class_aptos.png",
         "per_class_orthonet.png", "per_class_pacemaker.png", "report.md", "scores_by_layer_dinov2_vitl14.png",
         "skipped.csv"]


def test_write_report_files(fake_study):
    assert sorted(p.name for p in fake_study["out"].iterdir()) == FILES   # no temporaries left
    cells = pd.read_csv(fake_study["out"] / "cells.csv")
    assert list(cells["name"]) == [c["name"] for c in fake_study["cells"]]
    assert list(cells["status"]) == ["done"] * 4 + ["failed"] and list(cells["top_k"].iloc[:4]) == [0, 1, 2, 3]
    assert pd.isna(cells["top_k"].iloc[4])    # the failed cell has no top_k setting: n/a
    assert list(cells["main"]) == [True, True, True, False, True]
    skipped = pd.read_csv(fake_study["out"] / "skipped.csv")
    assert skipped.to_dict("records") == fake_study["record"]["skipped"]


def test_written_again_from_study_json(fake_study, capsys):
    assert main([str(fake_study["base"])]) == 0
    assert capsys.readouterr().out.strip() == f"report: {fake_study['base'] / 'report' / 'report.md'}"
    assert sorted(p.name for p in fake_study["out"].iterdir()) == FILES


def test_a_folder_without_study_json_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "common.studyreport", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and str(tmp_path / "study.json") in result.stderr
    assert "pass the --out folder of a study" in result.stderr
