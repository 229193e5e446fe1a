"""`make bench`: training speed against PyTorch eager, MFU, encoding overhead, bf16, evaluation
memory against length and compiles per evaluated length, measured in one run on this machine.

  make bench                  # full: both sizes, evaluation 4k..128k (over an hour on 2 cores)
  make bench ARGS=--quick     # small size, evaluation 4k and 16k: under 5 minutes
  python -m benchmarks.benchmark --sections=train --sizes=d512x8_T1024   # one part only
  python -m benchmarks.benchmark --smoke --out=/tmp/bench   # tiny shapes, seconds (tests)

Training: the project's train step (``pe_research.train``, blockwise attention) against the
same model and optimizer in PyTorch, eager and ``torch.compile`` (NoPE, RoPE)
(``benchmarks/torch_reference.py``; one thread per usable core), both float32, on one fixed
batch. Each variant (framework, encoding, precision) is built in its own process, as a training
run has it; once all are built they are timed in interleaved rounds, one turn each per round,
so all of them see the same machine load. A JAX turn is one call of the size's
``train.steps_per_call`` steps (K), as the trainer runs them (NoPE and RoPE also at one step per
call); a PyTorch turn is as many steps; times are per step. Every ratio is the median of the
per-round ratios with their min and max; its verdict ("faster"/"slower", PASS/FAIL) is called
only when the whole range is on one side, else "within noise" (``bench_report.py``).
MFU = tokens/s * ``flops_per_token`` over two denominators: the CPU's theoretical fp32 peak
(cores x clock x FLOP/cycle, the assumption recorded) and an fp32 matmul timed in each round.
Evaluation: each (attention, length) is scored in a fresh subprocess that reports its peak RSS.
Attention: one forward causal attention call at SmolLM2-135M's head shape (9 query heads, 3 KV
heads, head dim 64, batch 1) as evaluation runs it, the project's blockwise attention at two
block sizes against PyTorch's fused CPU ``scaled_dot_product_attention``, in interleaved rounds,
each in its own process; GFLOP/s counts the causal half (``4 H E L (L + 1) / 2``).
Writes OUT/results.json and OUT/results.md (also printed); OUT defaults to runs/bench.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pe_research.encodings  # noqa: F401  (registers every encoding family)
from benchmarks.bench_lib import (
  cpu_peak_gflops,
  matmul_peak_gflops,
  model_config,
  random_batch,
  rss_gib,
  write_results,
)
from benchmarks.bench_report import ratio_stats, report_lines, stats
from benchmarks.bench_variants import VariantProcess, time_rounds
from pe_research import runtime
from pe_research.model import Transformer
from pe_research.model_size import flops_per_token

ENCODINGS = {"full": ("nope", "rope", "alibi", "t5"), "quick": ("nope", "rope", "alibi", "t5")}
ENCODINGS["smoke"] = ("nope", "rope")
# name: (model_dim, num_layers, seq_len, batch, timed rounds, steps per call and per turn,
# attention block). Blocks of 128 train faster here than 256 (d256x4: 1.05x, d512x8: 1.02x,
# with the batch in pieces; measured): they skip more of the masked half.
SIZES = {
  "full": {
    "d256x4_T256": (256, 4, 256, 16, 5, 8, 128),
    "d512x8_T1024": (512, 8, 1024, 8, 3, 4, 128),
  },
  "quick": {"d256x4_T256": (256, 4, 256, 8, 5, 4, 128)},
  "smoke": {"d64x2_T64": (64, 2, 64, 2, 1, 2, 32)},
}
EVAL_LENGTHS = {  # attention -> lengths; dense beyond 8k needs > 4 GiB of scores per layer
  "full": {"dense": [4096, 8192], "blockwise": [4096, 8192, 16384, 32768, 65536, 131072]},
  "quick": {"dense": [4096], "blockwise": [4096, 16384]},
  "smoke": {"dense": [256], "blockwise": [256]},
}


# Forward attention (evaluation's batch 1) at SmolLM2-135M's shape: heads, KV heads, head dim;
# lengths and rounds per mode; the blockwise block sizes compared (256: imports' default).
ATTENTION_SHAPE = (9, 3, 64)
ATTENTION_LENGTHS = {"full": (4096, 16384), "quick": (4096,), "smoke": (256,)}
ATTENTION_ROUNDS = {"full": 5, "quick": 5, "smoke": 1}
ATTENTION_BLOCKS = {"full": (256, 512), "quick": (256, 512), "smoke": (64, 128)}

HEADLINE = ("nope", "rope")  # encodings with a one-step-per-call row and JAX/PyTorch headlines
# Encodings that also get a torch.compile row (inductor compiles for about 30 s per variant even
# at smoke shapes, so the smoke run that the tests use has none).
COMPILED = {"full": HEADLINE, "quick": HEADLINE, "smoke": ()}


def build_variants(variants: dict) -> tuple[dict, dict]:
  """``({name: VariantProcess}, {name: one-line error})``: built one at a time (compiles need
  the cores); only a torch.compile variant may fail (a missing C compiler), and is recorded."""
  steps, errors = {}, {}
  try:
    for name, (framework, cfg) in variants.items():
      try:
        steps[name] = VariantProcess(name, framework, cfg)
      except RuntimeError as e:
        if framework != "torch_compile":
          raise
        errors[name] = str(e).splitlines()[0]
  except BaseException:
    for process in steps.values():
      process.close()
    raise
  return steps, errors


def variant_configs(spec: tuple, encodings: tuple[str, ...], compiled: tuple[str, ...]) -> dict:
  """``{name: (framework, config)}``: JAX (each encoding fp32, RoPE bf16, RoPE dense, NoPE and
  RoPE one step per call), PyTorch eager (each encoding), torch.compile (NoPE, RoPE)."""
  d, layers, seq_len, batch, _, steps_per_call, block = spec

  def config(pe, k=steps_per_call, **model):
    model = {"attention": "blockwise", "attention_block": block, **model}
    c = model_config(d, layers, seq_len, batch, pe, **model)
    c.train.steps_per_call = k
    return c

  variants = {f"jax/{pe}": ("jax", config(pe)) for pe in encodings}
  variants["jax/rope/bf16"] = ("jax", config("rope", compute_dtype="bfloat16"))
  variants["jax/rope/dense"] = ("jax", config("rope", attention="dense"))
  variants |= {f"jax/{pe}/1_step_per_call": ("jax", config(pe, k=1)) for pe in HEADLINE}
  variants |= {f"torch/{pe}": ("torch", config(pe)) for pe in encodings}
  return variants | {f"torch_compile/{pe}": ("torch_compile", config(pe)) for pe in compiled}


def train_rows(times, matmul, spec, flops: float, cpu_peak: float, processes) -> dict:
  """Per variant: tokens/s (median, best), CPU s/step, MFU per round against the round's matmul
  and against the CPU's peak (median [min, max]), peak RSS, and what it ran with."""
  tokens = spec[3] * spec[2]
  rows = {}
  for name, t in times.items():
    tokens_per_s_R = tokens / np.asarray(t["wall"])
    row = {
      "tokens_per_s": float(np.median(tokens_per_s_R)),
      "best_tokens_per_s": max(tokens_per_s_R),
    }
    row["cpu_s_per_step"] = float(np.median(t["cpu"]))
    if not name.endswith("bf16"):  # both denominators are fp32 peaks
      row["mfu_vs_matmul"] = stats(tokens_per_s_R * flops / (np.asarray(matmul) * 1e9))
      row["mfu_vs_cpu_peak"] = stats(tokens_per_s_R * flops / (cpu_peak * 1e9))
    row |= {"peak_rss_gib": processes[name], "wall_s": t["wall"], "loss": t["loss"]}
    rows[name] = row
  return rows


def train_size(spec: tuple, encodings: tuple[str, ...], compiled: tuple, cpu_peak: float) -> dict:
  """Every variant of :func:`variant_configs` at one size, timed in interleaved rounds (a turn:
  one call of ``steps_per_call`` steps, PyTorch as many steps), each round also timing an fp32
  matmul; ratios as median [min, max] of per-round ratios, with verdicts."""
  d, layers, seq_len, batch, rounds, steps_per_call, block = spec
  variants = variant_configs(spec, encodings, compiled)
  steps, errors = build_variants(variants)
  n = 256 if d < 128 else 1024
  try:
    times, matmul = time_rounds(steps, rounds, lambda: matmul_peak_gflops(jnp.float32, n, 3))
  finally:
    peak_rss = {name: process.close() for name, process in steps.items()}
  flops = flops_per_token(variants["jax/rope"][1], seq_len)
  rows = train_rows(times, matmul, spec, flops, cpu_peak, peak_rss)
  for name, process in steps.items():
    rows[name]["info"] = process.info
  rows |= {name: {"error": error} for name, error in errors.items()}
  return (
    {"train": rows, "matmul_gflops_per_round": matmul}
    | train_ratios(times, encodings)
    | {
      "mfu": {k: rows["jax/rope"][f"mfu_{k}"] for k in ("vs_matmul", "vs_cpu_peak")},
      "steps_per_call": steps_per_call,
      "attention_block": block,
    }
  )


def train_ratios(times: dict, encodings: tuple[str, ...]) -> dict:
  """Speed ratios (a step time over another's, per round): JAX vs PyTorch, bf16, blockwise, K
  steps per call, and each encoding's step overhead over NoPE."""
  speed = lambda slow, fast, key="wall": ratio_stats(times[slow][key], times[fast][key])
  vs_torch = {
    pe: {
      "1_step_per_call": speed(f"torch/{pe}", f"jax/{pe}/1_step_per_call"),
      "k_steps_per_call": speed(f"torch/{pe}", f"jax/{pe}"),
    }
    for pe in HEADLINE
  }
  built = [pe for pe in HEADLINE if f"torch_compile/{pe}" in times]
  loss_gap = np.abs(np.subtract(times["jax/rope"]["loss"], times["jax/rope/bf16"]["loss"]))
  overhead = lambda pe: ratio_stats(
    times[f"jax/{pe}"]["wall"], times["jax/nope"]["wall"], 1.0, "slower", "faster"
  )
  return {
    "train_ratio_vs_torch": vs_torch,
    "train_ratio_vs_torch_compile": {pe: speed(f"torch_compile/{pe}", f"jax/{pe}") for pe in built},
    "train_ratio_vs_torch_by_encoding": {pe: speed(f"torch/{pe}", f"jax/{pe}") for pe in encodings},
    "train_ratio_vs_torch_cpu": speed("torch/rope", "jax/rope", "cpu"),
    "train_ratio_vs_torch_best": min(times["torch/rope"]["wall"]) / min(times["jax/rope"]["wall"]),
    "bf16_speedup": speed("jax/rope", "jax/rope/bf16"),
    "bf16_max_loss_gap": float(loss_gap.max()),
    "blockwise_speedup_vs_dense": speed("jax/rope/dense", "jax/rope"),
    "steps_per_call_speedup": {
      pe: speed(f"jax/{pe}/1_step_per_call", f"jax/{pe}") for pe in HEADLINE
    },
    "pe_overhead_vs_nope": {pe: overhead(pe) for pe in encodings[1:]},
  }


def train_section(mode: str, cpu_peak: float, sizes: list[str]) -> dict:
  """``{metric: {size: value}}``."""
  results = {}
  for size in sizes:
    for metric, value in train_size(
      SIZES[mode][size], ENCODINGS[mode], COMPILED[mode], cpu_peak
    ).items():
      results.setdefault(metric, {})[size] = value
  return results


def torch_info(train: dict) -> dict:
  """What the PyTorch variants ran with (version, threads, AdamW implementation)."""
  infos = [row.get("info", {}) for rows in train.values() for row in rows.values()]
  return next((info for info in infos if "torch" in info), {})


def eval_child(length: int, attention: str, pe: str, mode: str) -> dict:
  """Scores one random batch of ``length`` tokens (small-size model); runs in a subprocess."""
  from pe_research import eval_lib  # Here: it imports the data stack (TFDS, grain).

  d, layers = SIZES[mode][next(iter(SIZES[mode]))][:2]
  model = Transformer(model_config(d, layers, length, 1, pe, attention=attention), rngs=nnx.Rngs(0))
  evaluator = eval_lib.Evaluator(model, attention=attention)
  base_gib = rss_gib(peak=False)
  start = time.perf_counter()
  _, compile_seconds = evaluator.score(random_batch(length, 1))
  seconds = time.perf_counter() - start - compile_seconds
  peak_gib = rss_gib()
  return {"peak_rss_gib": peak_gib, "base_rss_gib": base_gib, "seconds": seconds}


def eval_section(mode: str, pe: str = "rope") -> dict:
  """Peak RSS, RSS before scoring (imports, model) and seconds per (attention, length)."""
  rss, base, seconds = {}, {}, {}
  for attention, lengths in EVAL_LENGTHS[mode].items():
    for length in lengths:
      args = json.dumps([length, attention, pe, mode])
      cmd = [sys.executable, "-m", "benchmarks.benchmark", "--eval_child", args]
      done = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if done.returncode:
        raise RuntimeError(f"evaluation {attention} at {length} failed:\n{done.stderr[-2000:]}")
      child = json.loads(done.stdout.strip().splitlines()[-1])
      rss.setdefault(attention, {})[length] = child["peak_rss_gib"]
      base.setdefault(attention, {})[length] = child["base_rss_gib"]
      seconds.setdefault(attention, {})[length] = child["seconds"]
      print(
        f"eval {attention:>9} {length:>7}: {child['peak_rss_gib']:.2f} GiB, "
        f"{child['seconds']:.1f} s",
        flush=True,
      )
  return {"eval_peak_rss_gib": rss, "eval_base_rss_gib": base, "eval_seconds": seconds}


def attention_section(mode: str) -> dict:
  """Per length: GFLOP/s of each variant (median [min, max] over rounds), JAX/PyTorch speed per
  block size from per-round ratios, and the largest difference of the checked output element."""
  heads, kv_heads, dim = ATTENTION_SHAPE
  out = {}
  for length in ATTENTION_LENGTHS[mode]:
    variants = {
      f"jax/block{b}": ("jax_attention", (length, heads, kv_heads, dim, b))
      for b in ATTENTION_BLOCKS[mode]
    }
    variants["torch/sdpa"] = ("torch_attention", (length, heads, kv_heads, dim, 0))
    steps, _ = build_variants(variants)
    try:
      times, _ = time_rounds(steps, ATTENTION_ROUNDS[mode])
    finally:
      info = {name: process.info for name, process in steps.items()}
      for process in steps.values():
        process.close()
    flops = 4 * heads * dim * length * (length + 1) / 2
    gflops = {name: stats(flops / np.asarray(t["wall"]) / 1e9) for name, t in times.items()}
    checks = np.concatenate([t["loss"] for t in times.values()])
    out[length] = {
      "gflops": gflops,
      "ratio_vs_torch": {
        name: ratio_stats(times["torch/sdpa"]["wall"], t["wall"])
        for name, t in times.items()
        if name.startswith("jax/")
      },
      "output_max_diff": float(checks.max() - checks.min()),
      "torch": info["torch/sdpa"],
    }
    print(f"attention {length}: " + ", ".join(f"{n} {g['median']:.1f}" for n, g in gflops.items()))
  return {"attention": out}


def compiles_per_eval_length(lengths=(64, 128, 256, 512)) -> dict:
  """Backend compiles while a fresh evaluator scores each length twice, per length."""
  from pe_research import eval_lib  # Here: it imports the data stack (TFDS, grain).

  model = Transformer(model_config(64, 2, 64, 1, "rope", attention="blockwise"), rngs=nnx.Rngs(0))
  evaluator = eval_lib.Evaluator(model)
  before = runtime.CompileCounter.count
  for length in [*lengths, *lengths]:
    evaluator.score(random_batch(length, 2))
  return {
    "compiles_per_eval_length": (runtime.CompileCounter.count - before) / len(lengths),
    "evaluator_programs": evaluator.num_compiles,
  }


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="Small size only: under 5 minutes.")
  parser.add_argument("--smoke", action="store_true", help="Tiny shapes: seconds (tests).")
  parser.add_argument("--out", default="runs/bench", help="Output folder.")
  parser.add_argument(
    "--sections",
    default="train,eval,attention",
    help="Comma-separated subset of: train, eval, attention.",
  )
  parser.add_argument(
    "--sizes", default="", help="Comma-separated training sizes (default: all of the mode's)."
  )
  parser.add_argument("--eval_child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.eval_child:
    print(json.dumps(eval_child(*json.loads(args.eval_child))))
    return {}
  mode = "smoke" if args.smoke else "quick" if args.quick else "full"
  sections = args.sections.split(",")
  sizes = args.sizes.split(",") if args.sizes else list(SIZES[mode])
  if unknown := sorted(set(sections) - {"train", "eval", "attention"}):
    parser.error(f"--sections: unknown {', '.join(unknown)}; allowed: train, eval, attention")
  if unknown := [s for s in sizes if s not in SIZES[mode]]:
    parser.error(f"--sizes: unknown {', '.join(unknown)}; allowed: {', '.join(SIZES[mode])}")
  start = time.perf_counter()
  results = {
    "machine": f"Load {os.getloadavg()[0]:.1f}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
    f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}.",
    "machine_info": runtime.machine() | {"jax": jax.__version__},
  }
  results["cpu_peak"] = cpu_peak_gflops(results["machine_info"])
  peaks = {
    dt: matmul_peak_gflops(getattr(jnp, dt), 256 if mode == "smoke" else 1024)
    for dt in ("float32", "bfloat16")
  }
  results["matmul_peak_gflops"] = {k: round(float(v), 1) for k, v in peaks.items()}
  if "train" in sections:
    results |= train_section(mode, results["cpu_peak"]["gflops"], sizes)
    results["machine_info"] |= torch_info(results["train"])
  if "eval" in sections:
    results |= compiles_per_eval_length()
    results |= eval_section(mode)
  if "attention" in sections:
    results |= attention_section(mode)
  results["seconds"] = time.perf_counter() - start
  write_results(args.out, results, report_lines(results))
  return results


if __name__ == "__main__":
  main()
