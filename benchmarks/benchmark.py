"""`make bench`: training speed against PyTorch eager, MFU, encoding overhead, bf16, evaluation
memory against length and compiles per evaluated length, measured in one run on this machine.

  make bench                  # full: both sizes, evaluation 4k..128k (over an hour on 2 cores)
  make bench ARGS=--quick     # small size, evaluation 4k and 16k: under 5 minutes
  python -m benchmarks.benchmark --sections=train --sizes=d512x8_T1024   # one part only
  python -m benchmarks.benchmark --smoke --out=/tmp/bench   # tiny shapes, seconds (tests)

Training: the project's train step (``pe_research.train``, blockwise attention) against the
same model in PyTorch eager (``benchmarks/torch_reference.py``), both float32, on one fixed
batch. Each variant (framework, encoding, precision) is built in its own process, as a training
run has it; once all are compiled they are timed in interleaved rounds, one turn each per
round, so all of them see the same machine load; a ratio is the median over rounds of the
per-round ratios. A JAX turn is one call of the size's ``train.steps_per_call`` steps, as the
trainer runs them (one more JAX variant makes one step per call); a PyTorch turn is as many
steps; times are per step. Tokens/s are wall-clock medians; the best step and CPU seconds per
step (all threads) are kept too: on a shared machine PyTorch's OpenMP threads lose whole time
slices at each barrier when another process holds a core, so the best step is the fairer
comparison.
MFU = tokens/s * ``flops_per_token`` / the matmul peak measured in the same run (fp32, or bf16
inputs with fp32 accumulation for bf16).
Evaluation: each (attention, length) is scored in a fresh subprocess that reports its peak RSS.
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
  matmul_peak_gflops,
  model_config,
  random_batch,
  rss_gib,
  write_results,
)
from benchmarks.bench_variants import VariantProcess, time_rounds
from experiments.figure_report import markdown_table
from pe_research import backend
from pe_research.model import Transformer, flops_per_token

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


def _median_ratio(numerator: list[float], denominator: list[float]) -> float:
  return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


def train_size(spec: tuple, encodings: tuple[str, ...], peaks: dict[str, float]) -> dict:
  """JAX (each encoding fp32, RoPE bf16, RoPE dense, RoPE one step per call) and PyTorch (each
  encoding) at one size. A variant's turn in a round is one call of ``steps_per_call`` steps
  (PyTorch: as many steps), timed per step."""
  d, layers, seq_len, batch, rounds, steps_per_call, block = spec

  def config(pe, steps_per_call=steps_per_call, **model):
    model = {"attention": "blockwise", "attention_block": block, **model}
    c = model_config(d, layers, seq_len, batch, pe, **model)
    c.train.steps_per_call = steps_per_call
    return c

  variants = {f"jax/{pe}": ("jax", config(pe)) for pe in encodings}
  variants["jax/rope/bf16"] = ("jax", config("rope", compute_dtype="bfloat16"))
  variants["jax/rope/dense"] = ("jax", config("rope", attention="dense"))
  variants["jax/rope/1_step_per_call"] = ("jax", config("rope", steps_per_call=1))
  variants |= {f"torch/{pe}": ("torch", config(pe)) for pe in encodings}
  steps = {}
  try:
    for name, (framework, cfg) in variants.items():  # One at a time: compiles need the cores.
      steps[name] = VariantProcess(name, framework, cfg)
    times = time_rounds(steps, rounds)
  finally:
    peak_rss = {name: process.close() for name, process in steps.items()}
  flops = flops_per_token(config("rope"), seq_len)
  rows = {}
  for name, t in times.items():
    tokens_per_s = batch * seq_len / float(np.median(t["wall"]))
    best_tokens_per_s = batch * seq_len / float(np.min(t["wall"]))
    peak = peaks["bfloat16" if name.endswith("bf16") else "float32"]
    mfu = tokens_per_s * flops / (peak * 1e9)
    rows[name] = {"tokens_per_s": tokens_per_s, "best_tokens_per_s": best_tokens_per_s}
    rows[name]["cpu_s_per_step"] = float(np.median(t["cpu"]))
    rows[name]["peak_rss_gib"] = peak_rss[name]
    rows[name] |= {"mfu": mfu, "wall_s": t["wall"], "loss": t["loss"]}
  speed = lambda slow, fast, key="wall": _median_ratio(times[slow][key], times[fast][key])
  by_pe = {pe: speed(f"torch/{pe}", f"jax/{pe}") for pe in encodings}
  loss_gap = np.abs(np.subtract(times["jax/rope"]["loss"], times["jax/rope/bf16"]["loss"]))
  return {
    "train": rows,
    "train_ratio_vs_torch": by_pe["rope"],
    "train_ratio_vs_torch_cpu": speed("torch/rope", "jax/rope", "cpu"),
    "train_ratio_vs_torch_best": min(times["torch/rope"]["wall"]) / min(times["jax/rope"]["wall"]),
    "train_ratio_vs_torch_by_encoding": by_pe,
    "mfu": rows["jax/rope"]["mfu"],
    "bf16_speedup": speed("jax/rope", "jax/rope/bf16"),
    "bf16_max_loss_gap": float(loss_gap.max()),
    "blockwise_speedup_vs_dense": speed("jax/rope/dense", "jax/rope"),
    "steps_per_call": steps_per_call,
    "attention_block": block,
    "steps_per_call_speedup": speed("jax/rope/1_step_per_call", "jax/rope"),
    "pe_overhead_vs_nope": {pe: speed(f"jax/{pe}", "jax/nope") - 1 for pe in encodings[1:]},
  }


def train_section(mode: str, peaks: dict[str, float], sizes: list[str]) -> dict:
  """``{metric: {size: value}}``, except ``pe_overhead_vs_nope``: ``{encoding: {size: value}}``."""
  results = {}
  for size in sizes:
    spec = SIZES[mode][size]
    for metric, value in train_size(spec, ENCODINGS[mode], peaks).items():
      results.setdefault(metric, {})[size] = value
  by_size = results.pop("pe_overhead_vs_nope")
  results["pe_overhead_vs_nope"] = {
    pe: {size: by_size[size][pe] for size in by_size} for pe in ENCODINGS[mode][1:]
  }
  return results


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


def compiles_per_eval_length(lengths=(64, 128, 256, 512)) -> dict:
  """Backend compiles while a fresh evaluator scores each length twice, per length."""
  from pe_research import eval_lib  # Here: it imports the data stack (TFDS, grain).

  model = Transformer(model_config(64, 2, 64, 1, "rope", attention="blockwise"), rngs=nnx.Rngs(0))
  evaluator = eval_lib.Evaluator(model)
  before = backend.CompileCounter.count
  for length in [*lengths, *lengths]:
    evaluator.score(random_batch(length, 2))
  return {
    "compiles_per_eval_length": (backend.CompileCounter.count - before) / len(lengths),
    "evaluator_programs": evaluator.num_compiles,
  }


def report_lines(results: dict) -> list[str]:
  """The markdown report: training table per size, targets, evaluation table."""
  lines = [
    "# Benchmark",
    "",
    f"Machine: {results['machine']}",
    "",
    f"Matmul peak: {results['matmul_peak_gflops']} GFLOP/s",
    "",
  ]
  for size, rows in results.get("train", {}).items():
    k = results.get("steps_per_call", {}).get(size, 1)
    lines += [f"## Training {size} ({k} steps per call and per turn)", ""]
    lines += markdown_table(
      ["variant", "tokens/s", "best tokens/s", "CPU s/step", "MFU", "peak RSS GiB"],
      [
        [n, r["tokens_per_s"], r["best_tokens_per_s"], r["cpu_s_per_step"], r["mfu"]]
        + [r.get("peak_rss_gib")]
        for n, r in rows.items()
      ],
    )
    lines.append("")
  checks = [
    ("JAX / PyTorch, RoPE fp32, wall", "train_ratio_vs_torch", ">= 1.0"),
    ("JAX / PyTorch, RoPE fp32, CPU s", "train_ratio_vs_torch_cpu", ">= 1.0"),
    ("JAX / PyTorch, RoPE fp32, best step", "train_ratio_vs_torch_best", ">= 1.0"),
    ("MFU, RoPE fp32", "mfu", ">= 0.6"),
    ("bf16 / fp32 speed", "bf16_speedup", ">= 1.5"),
    ("bf16 - fp32 max loss gap", "bf16_max_loss_gap", "noise"),
    ("blockwise / dense speed", "blockwise_speedup_vs_dense", "> 1"),
    ("steps_per_call K / 1 speed", "steps_per_call_speedup", "> 1"),
  ]
  rows = [[m, size, v, t] for m, key, t in checks for size, v in results.get(key, {}).items()]
  for pe, by_size in results.get("pe_overhead_vs_nope", {}).items():
    rows += [[f"{pe} step overhead vs NoPE", size, v, "<= 0.05"] for size, v in by_size.items()]
  if "compiles_per_eval_length" in results:
    rows.append(["compiles per eval length", "", results["compiles_per_eval_length"], "<= 1"])
  lines += ["## Targets", ""] + markdown_table(["metric", "size", "value", "target"], rows)
  if "eval_peak_rss_gib" not in results:
    return lines
  lines += ["", "## Evaluation (batch 1, RoPE; fresh process each)", ""]
  lengths = sorted({n for v in results["eval_peak_rss_gib"].values() for n in v})
  attentions = list(results["eval_peak_rss_gib"])
  keys = {"peak GiB": "eval_peak_rss_gib", "base GiB": "eval_base_rss_gib", "s": "eval_seconds"}
  table = [[n] + [results[k][a].get(n) for a in attentions for k in keys.values()] for n in lengths]
  header = ["length"] + [f"{a} {column}" for a in attentions for column in keys]
  return lines + markdown_table(header, table)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="Small size only: under 5 minutes.")
  parser.add_argument("--smoke", action="store_true", help="Tiny shapes: seconds (tests).")
  parser.add_argument("--out", default="runs/bench", help="Output folder.")
  parser.add_argument(
    "--sections", default="train,eval", help="Comma-separated subset of: train, eval."
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
  if unknown := sorted(set(sections) - {"train", "eval"}):
    parser.error(f"--sections: unknown {', '.join(unknown)}; allowed: train, eval")
  if unknown := [s for s in sizes if s not in SIZES[mode]]:
    parser.error(f"--sizes: unknown {', '.join(unknown)}; allowed: {', '.join(SIZES[mode])}")
  start = time.perf_counter()
  results = {
    "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, jax "
    f"{jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
    f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
  }
  peaks = {
    dt: matmul_peak_gflops(getattr(jnp, dt), 256 if mode == "smoke" else 1024)
    for dt in ("float32", "bfloat16")
  }
  results["matmul_peak_gflops"] = {k: round(float(v), 1) for k, v in peaks.items()}
  if "train" in sections:
    results |= train_section(mode, peaks, sizes)
  if "eval" in sections:
    results |= compiles_per_eval_length()
    results |= eval_section(mode)
  results["seconds"] = time.perf_counter() - start
  write_results(args.out, results, report_lines(results))
  return results


if __name__ == "__main__":
  main()
