"""Process set-up: what an entry point arranges around JAX's backend, not how a formula runs.

  one_thread_per_process()   XLA:CPU worker processes get one thread each (``XLA_FLAGS``,
                             ``PJRT_NPROC``), set before they start
  use_low_memory_schedule()  XLA:CPU's concurrency-optimized scheduler off, set before JAX
                             starts its backend (long evaluations)
  warn_slow_dtype(dtype)     a one-line warning for bf16 on a CPU without bf16 dot instructions
                             (:func:`cpu_isa_flags`, :func:`slow_dtype_message`)
  CompileCounter             XLA backend compilations counted in this process
  machine()                  the CPU model, ISA flags, usable cores and clock (every timing
                             names its machine)

The kernels and the policy that picks their form are in :mod:`pe_research.backend`. Why each
setting exists, with the numbers that measured it: docs/cpu_performance.md, "Process set-up and
evaluation choices".
"""

from __future__ import annotations

import functools
import os

import jax
from absl import logging

from pe_research import backend

LOW_MEMORY_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def one_thread_per_process() -> None:
  """Single-threaded XLA:CPU for processes started after this call (this process's backend,
  already started, is unaffected), so P worker processes on P cores do not oversubscribe them:
  ``XLA_FLAGS`` for the compiled kernels, and ``PJRT_NPROC=1`` for the CPU client's task pool
  ("XLAEigen"), which the flags leave at one thread per core."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "multi_thread_eigen" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {ONE_THREAD}".strip()
  os.environ.setdefault("PJRT_NPROC", "1")


def use_low_memory_schedule() -> None:
  """Adds the low-memory schedule to ``XLA_FLAGS`` unless the flag is already set there (XLA:CPU's
  concurrency-optimized scheduler kept a buffer of every layer alive in long evaluations). XLA
  reads its flags once, when the backend starts: called later, this has no effect."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "concurrency_optimized_scheduler" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {LOW_MEMORY_SCHEDULE}".strip()


# CPU instructions that multiply bf16 operands natively; without them XLA:CPU widens bf16 matmul
# operands to float32, and bf16 training runs slower than float32 (docs/cpu_performance.md,
# "Process set-up and evaluation choices").
BF16_DOT_ISA = ("avx512_bf16", "amx_bf16")


def cpu_isa_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
  """The first core's ISA flags (empty where ``cpuinfo`` cannot be read, e.g. not Linux)."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
          return frozenset(value.split())
  except OSError:
    pass
  return frozenset()


def machine() -> dict:
  """The CPU model, its SIMD/matrix ISA flags and the usable cores (timings depend on all
  three; the machine here changes from day to day), from /proc/cpuinfo."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  flags = info.get("flags", "").split()
  isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {
    "cpu": info.get("model name", "unknown"),
    "vendor": info.get("vendor_id", "unknown"),
    "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
    "isa": isa,
    "cores": cores,
    **_clock_mhz(info),
  }


def _clock_mhz(cpuinfo: dict) -> dict:
  """The clock: cpufreq's maximum (what ``lscpu`` calls max MHz) where the kernel exposes it,
  else /proc/cpuinfo's "cpu MHz" of the first core (in a VM: the host's nominal clock)."""
  try:
    with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
      return {"mhz": int(f.read()) / 1000, "mhz_source": "cpufreq cpuinfo_max_freq"}
  except (OSError, ValueError):
    mhz = float(cpuinfo.get("cpu MHz", "nan"))
    return {"mhz": mhz, "mhz_source": '/proc/cpuinfo "cpu MHz"'}


def slow_dtype_message(compute_dtype: str, platform: str, isa: frozenset[str]) -> str | None:
  """The line to print when ``compute_dtype`` is bf16 on a CPU without bf16 dot instructions
  (None otherwise, or when the flags are unknown)."""
  if platform != "cpu" or compute_dtype != "bfloat16" or not isa or set(BF16_DOT_ISA) & isa:
    return None
  return (
    "model.compute_dtype='bfloat16' on a CPU without bf16 dot instructions "
    f"({' or '.join(BF16_DOT_ISA)}): XLA:CPU widens bf16 matmuls to float32 here, so expect "
    "this run to be slower than with 'float32'"
  )


@functools.cache
def warn_slow_dtype(compute_dtype: str) -> None:
  """Logs :func:`slow_dtype_message` once per process and dtype."""
  if message := slow_dtype_message(compute_dtype, backend.policy().platform, cpu_isa_flags()):
    logging.warning(message)


class CompileCounter:
  """Counts XLA backend compilations (JAX's ``backend_compile_duration`` monitoring event) in
  this process; ``count`` is the total since import, so callers take differences."""

  EVENT = "/jax/core/compile/backend_compile_duration"
  count = 0

  @classmethod
  def _listen(cls, event: str, *_, **__) -> None:
    if event == cls.EVENT:
      cls.count += 1


jax.monitoring.register_event_duration_secs_listener(CompileCounter._listen)
