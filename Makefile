# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.largessl-installed
EXTRAS ?= test,s3,deepspeed,fast

.PHONY: demo test gpu-test lint unit distributed integration install clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing largessl[$(EXTRAS)] into $(VENV) (torch from constraints.txt)"
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/largessl demo

lint: $(STAMP)
	$(VENV)/bin/ruff check largessl tests launchers hubconf.py

test: lint
	$(VENV)/bin/pytest tests

# The GPU tier (tests/gpu/): needs one CUDA device; under 8 minutes on an H100/H200 (docs/benchmarks.md).
gpu-test: $(STAMP)
	$(VENV)/bin/pytest -m gpu -v -rA tests/gpu

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit

distributed: $(STAMP)
	$(VENV)/bin/pytest tests/distributed

integration: $(STAMP)
	$(VENV)/bin/pytest tests/integration

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
