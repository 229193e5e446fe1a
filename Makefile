# pe_research: `make demo` and `make test` are all the set-up a fresh machine needs.
# Each creates .venv if missing and installs the pinned requirements; re-running is a no-op
# (a stamp file records the hash of the requirement files that were installed).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
RUNTIME_STAMP := $(VENV)/.stamp-runtime-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
DEV_STAMP := $(VENV)/.stamp-dev-$(shell cat requirements.txt requirements-dev.txt pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint format bench bench-gpu install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): | $(PY)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP)
	$(PIP) install -q -r requirements-dev.txt
	touch $@

install: $(RUNTIME_STAMP)
install-dev: $(DEV_STAMP)

demo: $(RUNTIME_STAMP)
	$(PY) -m experiments.demo --out=runs/demo

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEV_STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest tests

bench: $(DEV_STAMP)
	$(PY) -m experiments.benchmark $(ARGS)

# 125M-parameter bf16 training MFU on a GPU (needs jax with CUDA in the venv; docs/gpu_benchmark.md).
bench-gpu: $(DEV_STAMP)
	$(PY) -m experiments.gpu_benchmark $(ARGS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
