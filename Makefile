PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test check bench clean-venv

$(PY): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(PY)

# Runs the whole pipeline on synthetic APTOS-layout data with a planted DINOv2-style model.
demo: $(PY)
	$(PY) test_aptos.py --demo --model dinov2 --out runs/demo_aptos_dinov2

test: $(PY)
	$(PY) -m pytest

bench: $(PY)
	$(PY) benchmarks/throughput.py --model clip --quick
	$(PY) benchmarks/throughput.py --model dinov2 --quick

clean-venv:
	rm -rf $(VENV)
