"""Process-wide XLA settings that entry points choose before JAX starts its backend.

  use_low_memory_schedule()   evaluation processes (pe_research.evaluate, the long-context
                              experiments and benchmarks)
  eval_attention(model_impl, model_block, length, dense_too_big)
                              the attention implementation and block size that score a length
  one_thread_per_process()    processes started from here run XLA:CPU on one thread each
  CompileCounter              XLA backend compilations, counted from JAX's monitoring events

XLA:CPU's concurrency-optimized scheduler orders a long evaluation program so that a buffer of
every layer stays alive at once: SmolLM2-135M (30 layers) scoring 32,768 tokens needed 4.5 GiB
of temporaries, 0.45 GiB with it off (compiled memory analysis), at the same speed within
noise (docs/benchmarks/pretrained_prefill). XLA reads its flags once, when the backend starts:
called later, this has no effect.
"""

from __future__ import annotations

import os

import jax

LOW_MEMORY_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def one_thread_per_process() -> None:
  """Adds single-threaded XLA:CPU to ``XLA_FLAGS`` for processes started after this call (this
  process's backend, already started, is unaffected): P worker processes on P cores then do not
  oversubscribe them."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "multi_thread_eigen" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {ONE_THREAD}".strip()


def use_low_memory_schedule() -> None:
  """Adds the low-memory schedule to ``XLA_FLAGS`` unless the flag is already set there."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "concurrency_optimized_scheduler" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {LOW_MEMORY_SCHEDULE}".strip()


# Evaluation of a dense-attention model switches to blockwise attention with 512-position blocks
# from this length on (or earlier, when the dense scores exceed the memory budget). Measured
# on AMD EPYC Zen 4 (AVX-512), 2 cores, the d=128 4-layer demo model, 32,768 tokens, batch 1:
# dense vs blockwise-512 seconds at 1024 / 4096 were RoPE 2.62 vs 1.32 / 9.22 vs 4.24, ALiBi
# 2.60 vs 1.42 / 9.39 vs 3.73, T5 3.07 vs 2.65 / 11.37 vs 7.39 (equal ppl to 4 digits);
# blockwise with 128-position blocks took 1.77 / 5.13 (RoPE).
EVAL_BLOCKWISE_FROM = 1024
EVAL_BLOCK = 512


def eval_attention(
  model_impl: str, model_block: int, length: int, dense_too_big: bool
) -> tuple[str, int]:
  """``(implementation, block size)`` that scores ``length`` for a model trained with
  ``model_impl``: dense models go blockwise (``EVAL_BLOCK``) from ``EVAL_BLOCKWISE_FROM`` on, or
  when their scores would exceed the memory budget; other implementations are kept."""
  if model_impl == "dense" and (dense_too_big or length >= EVAL_BLOCKWISE_FROM):
    return "blockwise", EVAL_BLOCK
  return model_impl, model_block


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
