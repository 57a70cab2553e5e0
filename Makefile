PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo study-demo test test-fast bench clean-venv

# The first time this installs torch, open_clip, timm and the rest into .venv (a few minutes, see
# README.md): pip prints each package as it fetches and installs it, so the wait is never silent.
$(PY): requirements.txt
	@test -x $(PY) || { echo "make: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "make: installing requirements.txt into $(VENV) (only when it is new or changed; the first time takes a few minutes)"
	$(PY) -m pip install --progress-bar on -r requirements.txt
	@touch $(PY)
	@echo "make: $(VENV) is ready"

# Runs the whole pipeline on synthetic APTOS-layout data with a planted DINOv2-style model.
demo: $(PY)
	$(PY) test_aptos.py --demo --model dinov2 --out runs/demo_aptos_dinov2

# A small study grid (3 datasets x clip, dinov2 x normal_values zero, mean) on the planted fixture.
study-demo: $(PY)
	$(PY) -m common.study --demo --out runs/study_demo

test: $(PY)
	$(PY) -m pytest

# Everything but the end-to-end runs of the entry scripts.
test-fast: $(PY)
	$(PY) -m pytest -m "not slow"

bench: $(PY)
	$(PY) benchmarks/throughput.py --model clip --quick --json bench_clip.json
	$(PY) benchmarks/throughput.py --model dinov2 --quick --json bench_dinov2.json
	$(PY) benchmarks/scale.py --quick --json bench_scale.json
	$(PY) benchmarks/probe.py --json bench_probe.json
	$(PY) benchmarks/controls.py --json bench_controls.json
	$(PY) benchmarks/localization.py --json bench_localization.json
	$(PY) benchmarks/refits.py --json bench_refits.json

clean-venv:
	rm -rf $(VENV)
