"""The CPU benchmark's numbers as intervals and verdicts, and its markdown report
(``benchmarks/benchmark.py``).

A figure measured over interleaved rounds is ``{"median", "lo", "hi"}`` of its per-round
values (``lo``/``hi``: the smallest and largest round). A verdict calls a side of a threshold
only when the whole range lies there; a range that straddles it is "within noise".
"""

from __future__ import annotations

import numpy as np

from experiments.figure_report import fmt, markdown_table
from pe_research import runtime


def stats(values) -> dict:
  """``{"median", "lo", "hi"}`` of per-round values."""
  values = np.asarray(values, np.float64)
  return {"median": float(np.median(values)), "lo": float(values.min()), "hi": float(values.max())}


def ratio_stats(numerator, denominator, minus: float = 0.0, above="faster", below="slower"):
  """Per-round ``numerator / denominator - minus`` as :func:`stats`, with its verdict against
  ``1 - minus`` (``above`` / ``below`` / "within noise")."""
  ratio = stats(np.asarray(numerator) / np.asarray(denominator) - minus)
  return ratio | {"verdict": verdict(ratio["lo"], ratio["hi"], 1.0 - minus, above, below)}


def verdict(lo: float, hi: float, threshold: float = 1.0, above="faster", below="slower") -> str:
  """``above`` if the whole range ``[lo, hi]`` exceeds ``threshold``, ``below`` if it lies under
  it, else "within noise"."""
  if lo > threshold:
    return above
  if hi < threshold:
    return below
  return "within noise"


def target_verdict(value: dict | float, target: str) -> str:
  """PASS/FAIL/"within noise" of a figure against ``">= t"`` or ``"<= t"``, from its range."""
  op, threshold = target.split()
  if not isinstance(value, dict):  # An exact count: no range to straddle.
    t = float(threshold)
    return "PASS" if (value >= t if op == ">=" else value <= t) else "FAIL"
  lo, hi = value["lo"], value["hi"]
  if op == ">=":
    return verdict(lo, hi, float(threshold), above="PASS", below="FAIL")
  return verdict(lo, hi, float(threshold), above="FAIL", below="PASS")


def interval(value) -> str:
  """``median [lo, hi]`` of a :func:`stats` figure, else the plain value."""
  if isinstance(value, dict):
    return f"{fmt(value['median'])} [{fmt(value['lo'])}, {fmt(value['hi'])}]"
  return fmt(value)


def machine_lines(results: dict) -> list[str]:
  """The machine, the versions and both MFU denominators, and the bf16 caveat where it holds."""
  m = results["machine_info"]
  lines = [
    "# Benchmark",
    "",
    f"Machine: {m['cpu']} ({m['vendor']} family/model {m['family_model']}), {m['cores']} usable "
    f"cores at {fmt(m['mhz'])} MHz ({m['mhz_source']}), ISA {' '.join(m['isa'])}; "
    f"jax {m['jax']}, torch {m.get('torch', '–')} ({m.get('torch_threads', '–')} threads, "
    f"{m.get('torch_optimizer', '–')} AdamW). {results['machine']}",
    "",
    f"CPU fp32 peak: {fmt(results['cpu_peak']['gflops'])} GFLOP/s = "
    f"{results['cpu_peak']['peak_source']}.",
    f"Matmul peak at start: {results['matmul_peak_gflops']} GFLOP/s; MFU vs matmul divides by "
    "an fp32 matmul re-measured in every round.",
  ]
  if not set(runtime.BF16_DOT_ISA) & set(m["isa"]):
    lines.append(
      "bf16 is expected to be slower here: this CPU has neither avx512_bf16 nor amx_bf16, so "
      "bf16 matmuls are converted to fp32 (the measured ratio below decides the verdict)."
    )
  return lines + [""]


def train_table(rows: dict) -> list[str]:
  """One line per variant; a variant that failed to build shows its one-line error."""
  header = ["variant", "tokens/s", "best tokens/s", "CPU s/step", "MFU vs matmul"]
  header += ["MFU vs CPU peak", "peak RSS GiB"]
  table = []
  for name, r in rows.items():
    if "error" in r:
      table.append([name, r["error"]] + ["–"] * (len(header) - 2))
      continue
    table.append([name, r["tokens_per_s"], r["best_tokens_per_s"], r["cpu_s_per_step"]])
    table[-1] += [interval(r.get("mfu_vs_matmul")), interval(r.get("mfu_vs_cpu_peak"))]
    table[-1].append(r.get("peak_rss_gib"))
  return markdown_table(header, table)


def target_rows(results: dict) -> list[list]:
  """``[metric, size, median [lo, hi], target, verdict]`` for every target of every size."""
  checks = []
  for pe in ("nope", "rope"):
    for k in ("1_step_per_call", "k_steps_per_call"):
      label = f"JAX / PyTorch eager, {pe} fp32, JAX {k.replace('_', ' ')}"
      checks.append((label, ("train_ratio_vs_torch", pe, k), ">= 1.0"))
    checks.append((f"JAX / torch.compile, {pe} fp32", ("train_ratio_vs_torch_compile", pe), ""))
  checks += [
    ("JAX / PyTorch, RoPE fp32, CPU s", ("train_ratio_vs_torch_cpu",), ">= 1.0"),
    ("JAX / PyTorch, RoPE fp32, best step (one number)", ("train_ratio_vs_torch_best",), ""),
    ("MFU vs matmul, RoPE fp32", ("mfu", "vs_matmul"), ">= 0.6"),
    ("MFU vs CPU peak, RoPE fp32", ("mfu", "vs_cpu_peak"), ""),
    ("bf16 / fp32 speed", ("bf16_speedup",), ">= 1.5"),
    ("bf16 - fp32 max loss gap", ("bf16_max_loss_gap",), ""),
    ("blockwise / dense speed", ("blockwise_speedup_vs_dense",), ">= 1.0"),
    ("steps_per_call K / 1 speed, nope", ("steps_per_call_speedup", "nope"), ">= 1.0"),
    ("steps_per_call K / 1 speed, rope", ("steps_per_call_speedup", "rope"), ">= 1.0"),
  ]
  for pe in ("rope", "alibi", "t5"):
    checks.append((f"{pe} step overhead vs NoPE", ("pe_overhead_vs_nope", pe), "<= 0.05"))
  rows = []
  for label, (key, *path), target in checks:
    for size, value in results.get(key, {}).items():
      for part in path:
        value = value.get(part) if isinstance(value, dict) else None
      if value is not None:
        called = target_verdict(value, target) if target else _ratio_verdict(value)
        rows.append([label, size, interval(value), target or "–", called])
  return rows


def _ratio_verdict(value) -> str:
  return value.get("verdict", "–") if isinstance(value, dict) else "–"


def report_lines(results: dict) -> list[str]:
  """The markdown report: machine, training table per size, targets, evaluation table."""
  lines = machine_lines(results)
  for size, rows in results.get("train", {}).items():
    k = results.get("steps_per_call", {}).get(size, 1)
    lines += [f"## Training {size} ({k} steps per call and per turn)", ""]
    lines += train_table(rows) + [""]
  rows = target_rows(results)
  if "compiles_per_eval_length" in results:
    value = results["compiles_per_eval_length"]
    rows.append(["compiles per eval length", "", value, "<= 1", target_verdict(value, "<= 1")])
  if rows:
    lines += ["## Targets (median [min, max] over rounds)", ""]
    lines += markdown_table(["metric", "size", "value", "target", "verdict"], rows)
  if "eval_peak_rss_gib" in results:
    lines += ["", "## Evaluation (batch 1, RoPE; fresh process each)", ""]
    lengths = sorted({n for v in results["eval_peak_rss_gib"].values() for n in v})
    attentions = list(results["eval_peak_rss_gib"])
    keys = {"peak GiB": "eval_peak_rss_gib", "base GiB": "eval_base_rss_gib", "s": "eval_seconds"}
    table = [
      [n] + [results[k][a].get(n) for a in attentions for k in keys.values()] for n in lengths
    ]
    header = ["length"] + [f"{a} {column}" for a in attentions for column in keys]
    lines += markdown_table(header, table)
  if "attention" in results:
    lines += attention_lines(results["attention"])
  return lines


def attention_lines(attention: dict) -> list[str]:
  """Forward attention: GFLOP/s per variant and JAX/PyTorch speed with its verdict."""
  lines = [
    "",
    "## Forward attention (batch 1, 9 query / 3 KV heads, head dim 64; median [min, max])",
    "",
  ]
  table = []
  for length, row in attention.items():
    for name, gflops in row["gflops"].items():
      ratio = row["ratio_vs_torch"].get(name)
      verdict = ratio["verdict"] if ratio else "–"
      table.append([length, name, interval(gflops), interval(ratio) if ratio else "–", verdict])
    table[-1].append(f"{row['output_max_diff']:.1e}")
  header = ["length", "variant", "GFLOP/s", "JAX / PyTorch speed", "verdict", "output diff"]
  return lines + markdown_table(header, [r + [""] * (len(header) - len(r)) for r in table])
