# `make test` and `make demo` create (or reuse) .venv, install the project, then run.
# TORCH_SPEC picks the torch build: CI uses the CPU wheel (TORCH_SPEC=torch==2.13.0).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reclmis-installed

.PHONY: install test demo lint bench-quick

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "setuptools>=69" wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" --no-build-isolation
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/reclmis profile --preset paper --image-size 224 --tokens 18

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
