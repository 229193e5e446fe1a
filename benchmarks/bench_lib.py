"""Helpers shared by the CPU benchmark (``benchmark.py``) and the GPU one (``gpu_benchmark.py``):
model configs, the measured matmul peak, the fixed random batch, the results writer."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.base import get_config


def model_config(d: int, layers: int, seq_len: int, batch: int, pe: str, **model):
  """``configs/base.py`` at width ``d`` (heads of 64), with ``layers``, ``seq_len``, ``batch``
  and encoding ``pe``; ``model`` overrides ``config.model`` fields."""
  config = get_config()
  config.model.update(model_dim=d, num_layers=layers, num_heads=max(1, d // 64), **model)
  config.train.update(seq_len=seq_len, batch_size=batch)
  config.pe.name = pe
  return config


def matmul_peak_gflops(dtype, n: int = 1024, reps: int = 5) -> float:
  """Median GFLOP/s of a ``[4n, n] x [n, n]`` matmul (fp32 accumulation) on random data
  (constant operands can run faster than real ones)."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (4 * n, n), dtype)
  b = jax.random.normal(key_b, (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  seconds = []
  for _ in range(reps):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    seconds.append(time.perf_counter() - start)
  return 8 * n**3 / np.median(seconds) / 1e9


def rss_gib(peak: bool = True) -> float:
  """This process's peak (or current) resident memory in GiB. On Linux from /proc (VmHWM,
  VmRSS): ``ru_maxrss`` there keeps, across exec, the peak of the process that forked it, so a
  fresh subprocess reports at least its parent's size. Elsewhere ``ru_maxrss`` (peak only)."""
  try:
    with open("/proc/self/status") as f:
      key = "VmHWM:" if peak else "VmRSS:"
      return next(int(line.split()[1]) for line in f if line.startswith(key)) / 2**20
  except (OSError, StopIteration):
    import resource

    scale = 2**30 if sys.platform == "darwin" else 2**20  # macOS reports bytes, Linux KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def fp32_flop_per_cycle(info: dict) -> tuple[int, str]:
  """``(FP32 FLOP per cycle per core, the assumption)`` from the vendor, family and ISA flags:
  FMA pipes x fp32 lanes per pipe x 2 (multiply and add)."""
  isa, family = info["isa"], info["family_model"].split("/")[0]
  if "avx512f" in isa and info["vendor"] == "AuthenticAMD" and family == "25":
    zen4 = "Zen 4 (AMD family 25, avx512f): 2 FMA pipes x 8 fp32 lanes (256-bit; AVX-512 double-"
    return 32, zen4 + "pumped) x 2 = 32 FLOP/cycle/core assumed"
  if "avx512f" in isa:
    return (
      64,
      "avx512f: 2 FMA units x 16 fp32 lanes x 2 = 64 FLOP/cycle/core assumed (32 on one-FMA Xeons)",
    )
  if "avx2" in isa:
    return 32, "avx2: 2 FMA units x 8 fp32 lanes x 2 = 32 FLOP/cycle/core assumed"
  return 16, "no avx2: 2 SSE units x 4 fp32 lanes x 2 = 16 FLOP/cycle/core assumed"


def cpu_peak_gflops(info: dict) -> dict:
  """Theoretical FP32 peak of this CPU: ``cores x GHz x FLOP/cycle/core``, with how each
  factor was read."""
  flop_per_cycle, assumption = fp32_flop_per_cycle(info)
  peak = info["cores"] * info["mhz"] / 1000 * flop_per_cycle
  source = f"{info['cores']} cores x {info['mhz']:.0f} MHz ({info['mhz_source']}) x {assumption}"
  return {"gflops": peak, "peak_source": source}


def random_batch(seq_len: int, batch: int, vocab_size: int = 256) -> dict[str, np.ndarray]:
  """One fixed training batch of uniform random tokens (seed 0), every weight 1."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab_size, (batch, seq_len + 1)).astype(np.int32)
  weights = np.ones((batch, seq_len), np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def write_results(out: str, results: dict, lines: list[str]) -> None:
  """``out/results.json`` and ``out/results.md`` (the report ``lines``, also printed)."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  print(text)
