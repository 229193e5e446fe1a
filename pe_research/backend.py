"""Process-wide XLA settings that entry points choose before JAX starts its backend.

  use_low_memory_schedule()   evaluation processes (pe_research.evaluate, the long-context
                              experiments and benchmarks)

XLA:CPU's concurrency-optimized scheduler orders a long evaluation program so that a buffer of
every layer stays alive at once: SmolLM2-135M (30 layers) scoring 32,768 tokens needed 4.5 GiB
of temporaries, 0.45 GiB with it off (compiled memory analysis), at the same speed within
noise (docs/benchmarks/pretrained_prefill). XLA reads its flags once, when the backend starts:
called later, this has no effect.
"""

from __future__ import annotations

import os

LOW_MEMORY_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_low_memory_schedule() -> None:
  """Adds the low-memory schedule to ``XLA_FLAGS`` unless the flag is already set there."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "concurrency_optimized_scheduler" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {LOW_MEMORY_SCHEDULE}".strip()
