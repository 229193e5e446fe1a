"""Suite-wide settings, applied before any test module imports JAX.

One persistent JAX compilation cache per test run (``PE_RESEARCH_TEST_CACHE=0`` turns it off),
shared by the pytest-xdist workers and by the subprocesses tests start (training and
evaluation CLIs, kill/resume runs): an executable compiled once is loaded afterwards.
Tests that count compilations turn it off for themselves (``no_compilation_cache``).

XLA:CPU compiles the suite's programs with LLVM at -O0 (``TEST_XLA_FLAGS``; the test processes
and every subprocess inherit it): the suite compiles hundreds of small programs and runs most for
milliseconds, so code generation is most of its time. The optimization level changes how fast a
program runs, not what it computes: ``test_compile_flags`` runs one model's loss and gradients
for several encodings at -O0 and at XLA's default and requires them equal.
``PE_RESEARCH_TEST_XLA_OPT=default`` runs the whole suite at XLA's default level.
"""

import os
import shutil
import tempfile

import pytest

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if os.environ.get("PE_RESEARCH_TEST_XLA_OPT", "0") != "default":
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

_OWN_CACHE = None
if (
  os.environ.get("PE_RESEARCH_TEST_CACHE", "1") != "0"
  and "JAX_COMPILATION_CACHE_DIR" not in os.environ
):
  # Set in the pytest process before xdist starts its workers, which inherit it.
  _OWN_CACHE = tempfile.mkdtemp(prefix="pe_research_jax_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


# The files that keep one worker busiest (seconds, `pytest --durations`, 2026-12-06: reliability
# ~120, benchmark ~85, context_parallel ~70, ...) are handed out first (Makefile:
# --no-loadscope-reorder keeps this order), so the two workers finish together instead of one
# starting a long file last.
SLOW_FILES_FIRST = (
  "test_reliability.py",
  "test_benchmark.py",
  "test_context_parallel.py",
  "test_experiments.py",
  "test_pretrained_extension.py",
  "test_train.py",
  "test_smollm2.py",
  "test_scale_out.py",
  "test_gguf.py",
  "test_pretrained.py",
  "test_fsdp_layers.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps file order


def pytest_sessionfinish(session):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # The process that made it.
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def no_compilation_cache(monkeypatch):
  """This test (and the processes it starts) compiles everything itself."""
  import jax
  from jax._src import compilation_cache  # JAX decides once per process whether to use it.

  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  previous = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", previous)
  compilation_cache.reset_cache()


@pytest.fixture
def use_policy():
  """``use_policy(**fields)``: this test runs with the backend policy changed in those fields
  (``use_policy(reference=True)``: the reference policy), restored after it. Functions traced
  before keep the policy they were traced with: trace afresh inside the test."""
  import dataclasses

  from pe_research import backend

  def use(reference: bool = False, **fields):
    base = backend.Policy.reference() if reference else backend.policy()
    backend.set_policy(dataclasses.replace(base, **fields))

  saved = backend.policy()
  yield use
  backend.set_policy(saved)
