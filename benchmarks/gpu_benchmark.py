"""One prepared GPU check: training MFU of a 125M-parameter model (GPT-2 small shape), bf16.

  python -m benchmarks.gpu_benchmark --out=runs/bench_gpu  # on a GPU: under 9 min (--budget_s)
  python -m benchmarks.gpu_benchmark --smoke --out=/tmp  # tiny shapes on the CPU (tests)
  python -m benchmarks.gpu_benchmark --variants=rope/bfloat16/xla,alibi/bfloat16/xla --batch=64

Model: D=768, 12 layers, 12 heads of 64, GELU MLP 3072, LayerNorm, tied 50,304-token embedding
(123.6M parameters), T=1024, B=32 (32,768 tokens per step), AdamW; the project's own train
step (``pe_research.train``: jit, donated state, fp32 parameters and optimizer). A variant is
``encoding/compute_dtype/attention``: ``xla`` is ``jax.nn.dot_product_attention``, which the
project runs as cuDNN flash attention on a GPU for bf16 inputs (with the encoding's bias as a
cuDNN bias for ALiBi/T5); ``blockwise`` is the project's own flash attention; ``pallas`` the
Pallas kernel's Triton form (``kernels/pallas_gpu.py``), the bias computed in-kernel.

Before the variants (not with ``--smoke``): ``benchmarks.kernel_check``, the Triton kernel
against dense attention per encoding, forward and every gradient, on the device.

Each variant: compile (timed), two warm-up steps, then ``--reps`` runs of ``--steps`` steps,
each timed to the end of its last step (steps are dispatched asynchronously, as in training);
the median run gives tokens/s. MFU = tokens/s * FLOPs per token / peak, with FLOPs per token
``model_size.flops_per_token`` (6N plus causal attention, the masked half not counted) and, for
comparison with published numbers, the PaLM count (6N + 12 n_layers H E L: attention counted
over the full square). Peaks: the datasheet dense bf16 rate of the card (H100/H200 SXM: 989.4
TFLOP/s) and a bf16 matmul measured in the same run on random data. A failing variant (an
attention the cuDNN kernel does not support, say) is recorded with its one-line error and the
rest still run; no variant but the first starts after ``--budget_s`` seconds. Writes
OUT/results.json and OUT/results.md (printed last). Measured numbers: docs/gpu_benchmark.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pe_research.encodings  # noqa: F401  (registers every encoding family)
from benchmarks import kernel_check
from benchmarks.bench_lib import matmul_peak_gflops, model_config, random_batch, write_results
from experiments.figure_report import markdown_table
from pe_research import sharding, train
from pe_research.encodings.registry import encoding_names
from pe_research.model import Transformer
from pe_research.model_size import count_params, flops_per_token, resolved_dims

# name: (model_dim, num_layers, num_heads, vocab_size, seq_len, batch)
SIZES = {"125m": (768, 12, 12, 50304, 1024, 32), "smoke": (64, 2, 2, 512, 64, 2)}
VARIANTS = (
  "rope/bfloat16/xla",
  "nope/bfloat16/xla",
  "alibi/bfloat16/xla",
  "t5/bfloat16/xla",
  "rope/bfloat16/blockwise",
  "t5/bfloat16/blockwise",
  "rope/float32/xla",
  # The Pallas kernel's Triton form (bias in-kernel) per encoding, against cuDNN and blockwise.
  "rope/bfloat16/pallas",
  "alibi/bfloat16/pallas",
  "t5/bfloat16/pallas",
  "kerple/bfloat16/pallas",
  "kerple/bfloat16/blockwise",
  "fire/bfloat16/pallas",
  "fire/bfloat16/blockwise",
)
DTYPES = ("bfloat16", "float32")
ATTENTIONS = ("xla", "blockwise", "dense", "pallas")
# Dense bf16 tensor-core peak from the vendor's datasheets, TFLOP/s (SXM parts).
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def datasheet_peak_tflops(device_kind: str) -> float | None:
  """The datasheet bf16 peak of a device named like ``NVIDIA H100 80GB HBM3`` (None if unknown;
  H100 PCIe and NVL parts have other peaks and are not matched)."""
  if "PCIe" in device_kind or "NVL" in device_kind:
    return None
  return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in device_kind), None)


def parse_variant(variant: str) -> tuple[str, str, str]:
  """``"rope/bfloat16/xla"`` -> ``("rope", "bfloat16", "xla")``, or a one-line ValueError."""
  parts = variant.split("/")
  ok = len(parts) == 3 and parts[0] in encoding_names()
  if not ok or parts[1] not in DTYPES or parts[2] not in ATTENTIONS:
    raise ValueError(
      f"--variants: {variant!r} is not encoding/dtype/attention with encoding in "
      f"{', '.join(encoding_names())}, dtype in {', '.join(DTYPES)} and attention in "
      f"{', '.join(ATTENTIONS)}"
    )
  return parts[0], parts[1], parts[2]


def variant_config(size: tuple, pe: str, dtype: str, attention: str):
  d, layers, heads, vocab, seq_len, batch = size
  config = model_config(d, layers, seq_len, batch, pe, attention=attention, compute_dtype=dtype)
  config.model.update(num_heads=heads, vocab_size=vocab)
  return config


def palm_flops_per_token(config, seq_len: int) -> float:
  """6N + 12 n_layers H E L: the PaLM/nanoGPT count (attention over the full square)."""
  m = config.model
  head_dim, _ = resolved_dims(m)
  causal_attention = 6.0 * m.num_layers * m.num_heads * head_dim * (seq_len + 1)
  full_attention = 12.0 * m.num_layers * m.num_heads * head_dim * seq_len
  return flops_per_token(config, seq_len) - causal_attention + full_attention


def time_variant(config, steps: int, reps: int) -> dict:
  """Compile seconds, seconds per step (median of ``reps`` runs of ``steps``), losses."""
  seq_len, batch_size = config.train.seq_len, config.train.batch_size
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = train.make_optimizer(config.train)
  graphdef, state = train.create_train_state(config, mesh, tx)
  step_fn = train.jit_train_step(graphdef, tx, schedule, state, mesh)
  batch = sharding.global_batch(random_batch(seq_len, batch_size, config.model.vocab_size), mesh)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  losses = []
  for _ in range(2):
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))
  runs = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))  # Waits for the last step.
    runs.append((time.perf_counter() - start) / steps)
  return {"compile_s": compile_s, "step_s": runs, "loss": losses}


def memory_peak_gib() -> float | None:
  """The device's peak bytes in use since the process started (not per variant), in GiB."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def run_variants(size, variants, *, steps, reps, budget_s, peak_tflops) -> dict:
  rows, start = {}, time.perf_counter()
  for variant in variants:
    if rows and time.perf_counter() - start > budget_s:  # The first variant always runs.
      rows[variant] = {"error": f"skipped: --budget_s={budget_s} spent"}
      continue
    config = variant_config(size, *parse_variant(variant))
    seq_len, batch = config.train.seq_len, config.train.batch_size
    try:
      timing = time_variant(config, steps, reps)
    except Exception as e:  # A kernel the backend lacks must not lose the other variants.
      first_line = (str(e).strip().splitlines() or [""])[0][:300]
      rows[variant] = {"error": f"{type(e).__name__}: {first_line}"}
      print(f"{variant}: FAILED {rows[variant]['error']}", flush=True)
      continue
    finally:
      gc.collect()
    tokens_per_s = batch * seq_len / float(np.median(timing["step_s"]))
    row = {"tokens_per_s": tokens_per_s, **timing, "memory_peak_gib": memory_peak_gib()}
    for name, flops in (
      ("", flops_per_token(config, seq_len)),
      ("_palm", palm_flops_per_token(config, seq_len)),
    ):
      row[f"tflops{name}"] = tokens_per_s * flops / 1e12
      for peak_name, peak in peak_tflops.items():
        row[f"mfu{name}_vs_{peak_name}"] = None if peak is None else row[f"tflops{name}"] / peak
    rows[variant] = row
    print(
      f"{variant}: {tokens_per_s:,.0f} tokens/s, {row['tflops']:.1f} TFLOP/s, "
      f"compile {timing['compile_s']:.0f} s, loss {timing['loss'][0]:.3f} -> "
      f"{timing['loss'][-1]:.3f}",
      flush=True,
    )
  return rows


def report_lines(results: dict) -> list[str]:
  peaks = results["peak_tflops"]
  lines = [
    "# GPU benchmark",
    "",
    f"Device: {results['device']}; jax {results['jax']}; size {results['size']} "
    f"({results['params'] / 1e6:.1f}M parameters, {results['tokens_per_step']} tokens/step).",
    f"Peaks (TFLOP/s, bf16): datasheet {peaks['datasheet']}, "
    f"measured matmul {peaks['matmul']:.1f}.",
    "MFU counts causal attention FLOPs (masked half excluded); MFU (PaLM) counts the full square.",
    "",
  ]
  header = ["variant", "tokens/s", "TFLOP/s", "MFU", "MFU (PaLM)", "MFU vs matmul", "compile s"]
  table = []
  for variant, r in results["train"].items():
    if "error" in r:
      table.append([variant, r["error"], "", "", "", "", ""])
      continue
    table.append(
      [
        variant,
        r["tokens_per_s"],
        r["tflops"],
        r["mfu_vs_datasheet"],
        r["mfu_palm_vs_datasheet"],
        r["mfu_vs_matmul"],
        r["compile_s"],
      ]
    )
  lines += markdown_table(header, table)
  checks = results.get("kernel_check")
  if checks:
    lines += ["", f"Pallas Triton kernel vs dense (fp32, tolerance {kernel_check.TOLERANCE}):", ""]
    rows = [
      [name, r.get("error") or r["max_rel_err"], r.get("ok", False)] for name, r in checks.items()
    ]
    lines += markdown_table(["encoding", "max relative error", "ok"], rows)
  return lines


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="Tiny shapes: seconds, any backend.")
  parser.add_argument("--out", default="runs/bench_gpu", help="Output folder.")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="encoding/dtype/attention,...")
  parser.add_argument("--batch", type=int, default=0, help="Sequences per step (0: the size's).")
  parser.add_argument("--steps", type=int, default=10, help="Steps per timed run.")
  parser.add_argument("--reps", type=int, default=3, help="Timed runs per variant (median).")
  parser.add_argument("--budget_s", type=float, default=420.0, help="Later variants: none after.")
  args = parser.parse_args(argv)
  try:
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
      parse_variant(variant)
  except ValueError as e:
    parser.error(str(e))
  if args.steps < 1 or args.reps < 1 or args.batch < 0:
    parser.error(f"--steps={args.steps}, --reps={args.reps} must be >= 1, --batch >= 0")
  size_name = "smoke" if args.smoke else "125m"
  if not args.smoke and jax.default_backend() != "gpu":
    parser.error(f"the 125m size needs a GPU (backend is {jax.default_backend()}); use --smoke")
  size = SIZES[size_name]
  if args.batch:
    size = (*size[:-1], args.batch)
  device = jax.devices()[0]
  start = time.perf_counter()
  matmul_n = 256 if args.smoke else 8192
  measured = matmul_peak_gflops(jnp.bfloat16, matmul_n, reps=10) / 1e3
  peak_tflops = {"datasheet": datasheet_peak_tflops(device.device_kind), "matmul": measured}
  config = variant_config(size, "rope", "bfloat16", "xla")
  results = {
    "device": f"{device.device_kind} ({jax.default_backend()})",
    "jax": jax.__version__,
    "size": size_name,
    "params": _param_count(config),
    "tokens_per_step": config.train.seq_len * config.train.batch_size,
    "peak_tflops": peak_tflops,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  print(f"{results['device']}: bf16 matmul {measured:.1f} TFLOP/s", flush=True)
  if not args.smoke:
    results["kernel_check"] = kernel_check.run()
  results["train"] = run_variants(
    size,
    variants,
    steps=args.steps,
    reps=args.reps,
    budget_s=args.budget_s,
    peak_tflops=peak_tflops,
  )
  results["seconds"] = time.perf_counter() - start
  write_results(args.out, results, report_lines(results))
  return results


def _param_count(config) -> int:
  """Trainable parameters, counted from shapes alone (nothing allocated)."""
  return count_params(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))


if __name__ == "__main__":
  main()
