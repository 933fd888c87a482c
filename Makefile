# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv on first use and install the library (.) and the reproduction lab (lab/), both editable.
# Torch comes from TORCH_SPEC first so that pip never resolves a multi-gigabyte CUDA build
# (on our machines torch==2.13.0 is a local CPU wheel).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.safestep-installed
PYTEST_ARGS ?= -m "not slow"
# pytest-xdist: 2 worker processes, each taking whole test files (module-scoped fixtures run once);
# `make test PYTEST_WORKERS=` runs in one process. A single file runs fastest without: `pytest tests/test_x.py`.
PYTEST_WORKERS ?= -n 2 --dist loadfile

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml lab/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]" -e ./lab
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/safestep demo --out safestep-demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_WORKERS) $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/radius_speed.py

clean-venv:
	rm -rf $(VENV)
