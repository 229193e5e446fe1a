"""Prefill (scoring) throughput and peak memory of an imported pretrained model, against HF
transformers on the same tokens, each length in a fresh process.

  make pretrained
  python -m benchmarks.pretrained_prefill --workdir=runs/pretrained/smollm2-135m \
      --lengths=2048,8192,32768 --hf_lengths=2048,8192 --rounds=3 \
      --out=docs/benchmarks/pretrained_prefill

Per length: one window of ``length`` tokens of the run's validation data (``data.name`` with its
tokenizer; pystdlib by default), scored ``--repeats`` times in the same process (all ``length``
targets): the first call's seconds after compilation, the later (warm) calls' seconds, compile
seconds, peak RSS of the process (VmHWM) and mean NLL. Tokens/s is taken from the median warm
call (the first call when there is one call). The HF row loads the run exported to an HF folder
(``pe_research.pretrained export``) with ``AutoModelForCausalLM`` (float32, sdpa, torch threads =
cores) and scores the same tokens the same number of times, each call timed to the same outputs
as pe_research's (per-token NLL and argmax hits; before 2026-12-06 it stopped at the logits,
3.8% less work at 2k); the NLLs must agree. Where both
systems ran a length, the report gives pe_research/transformers speed and memory ratios against
the targets (at least 1.5x the speed, at most half the memory). With ``--rounds`` R > 1 each
length runs R rounds, the systems alternated in each, and the ratios are per round: the report
gives their median and [min, max], so a verdict reads against the machine's noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.bench_lib import rss_gib, write_results
from pe_research import runtime


def _window(config, length: int) -> dict[str, np.ndarray]:
  from pe_research.data import make_eval_batches

  return make_eval_batches(config, length=length, max_tokens=length, batch_size=1)[0]


def ours_child(workdir: str, length: int, repeats: int) -> dict:
  """Scores one window ``repeats`` times with the run's model (blockwise attention for imports)."""
  from pe_research import eval_lib
  from pe_research.runs import load_model

  model, config, _ = load_model(workdir)
  batch = _window(config, length)
  evaluator = eval_lib.Evaluator(model)
  calls, compile_seconds = [], 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    stats, compiled = evaluator.score(batch)
    calls.append(time.perf_counter() - start - compiled)
    compile_seconds += compiled
  nll = float(stats["nll_sum_L"].sum() / stats["weight_sum_L"].sum())
  return {"calls": calls, "compile_seconds": compile_seconds, "nll": nll}


def hf_child(hf_dir: str, workdir: str, length: int, repeats: int) -> dict:
  """Scores the same window ``repeats`` times with transformers (float32, sdpa)."""
  import torch
  import transformers

  from pe_research.runs import load_model

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  _, config, _ = load_model(workdir)
  batch = _window(config, length)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    hf_dir, dtype=torch.float32, attn_implementation="sdpa"
  ).eval()
  calls = []
  targets = torch.tensor(batch["targets"][0]).long()
  for _ in range(repeats):
    start = time.perf_counter()
    with torch.inference_mode():  # What pe_research's call returns: NLL and hits per token.
      logits = model(torch.tensor(batch["inputs"])).logits[0].float()
      nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
      hits = logits.argmax(dim=-1) == targets
    calls.append(time.perf_counter() - start)
    del logits, hits
  return {"calls": calls, "compile_seconds": 0.0, "nll": float(nll.mean())}


def call_seconds(row: dict) -> float:
  """The seconds a row's tokens/s is computed from: the median warm call, else the first."""
  calls = row["calls"]
  return float(np.median(calls[1:])) if len(calls) > 1 else calls[0]


# Targets of the real-model benchmark: pe_research/transformers tokens/s and peak RSS.
SPEED_TARGET, MEMORY_TARGET = 1.5, 0.5


def comparisons(rows: list[dict]) -> list[dict]:
  """Per length with both systems: speed ratio (tokens/s, pe_research/transformers, from
  :func:`call_seconds`) and memory ratio (peak RSS), each the median over the rounds (rows of
  one ``round`` are paired; rows without one are round 0) with its [min, max], and each median
  against its target."""
  by_key = {(row["system"], row["length"], row.get("round", 0)): row for row in rows}
  out = []
  for length in sorted({row["length"] for row in rows}):
    rounds = sorted({r for system, n, r in by_key if n == length})
    pairs = [
      (by_key[("pe_research", length, r)], by_key[("transformers", length, r)])
      for r in rounds
      if ("pe_research", length, r) in by_key and ("transformers", length, r) in by_key
    ]
    if not pairs:
      continue
    speeds = [call_seconds(hf) / call_seconds(ours) for ours, hf in pairs]
    memories = [ours["peak_rss_gib"] / hf["peak_rss_gib"] for ours, hf in pairs]
    speed, memory = float(np.median(speeds)), float(np.median(memories))
    out.append(
      {
        "length": length,
        "rounds": len(pairs),
        "speed": speed,
        "speed_range": (min(speeds), max(speeds)),
        "memory": memory,
        "memory_range": (min(memories), max(memories)),
        "speed_pass": speed >= SPEED_TARGET,
        "memory_pass": memory <= MEMORY_TARGET,
        "nll_diff": max(abs(ours["nll"] - hf["nll"]) for ours, hf in pairs),
      }
    )
  return out


def _run_child(kind: str, *args) -> dict:
  payload = json.dumps([kind, *args])
  cmd = [sys.executable, "-m", "benchmarks.pretrained_prefill", "--child", payload]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{kind} at {args[-2]} tokens failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def report_lines(results: dict) -> list[str]:
  m = results["machine"]
  lines = [
    "# Prefill throughput: " + results["workdir"],
    "",
    f"Machine: {m['cpu']} (family/model {m['family_model']}), {m['cores']} cores, ISA "
    f"{', '.join(m['isa'])}. One window per length, a fresh process per row.",
    "",
    "Tokens/s from the median warm call (calls after the first); the first call alone where a",
    "length was scored once.",
    "",
    "| system | length | round | tokens/s | first call s | warm calls s | compile s | "
    "peak RSS GiB | mean NLL |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in results["rows"]:
    warm = ", ".join(f"{s:.1f}" for s in row["calls"][1:]) or "-"
    lines.append(
      f"| {row['system']} | {row['length']} | {row.get('round', 0)} | "
      f"{row['length'] / call_seconds(row):.0f} | "
      f"{row['calls'][0]:.1f} | {warm} | {row['compile_seconds']:.1f} | "
      f"{row['peak_rss_gib']:.2f} | {row['nll']:.4f} |"
    )
  compared = comparisons(results["rows"])
  if compared:
    verdict = lambda ok: "PASS" if ok else "FAIL"
    lines += [
      "",
      f"Targets: pe_research at least {SPEED_TARGET}x transformers' tokens/s, at most "
      f"{MEMORY_TARGET}x its peak RSS. Ratios: the median over the rounds [min, max].",
      "",
      "| length | rounds | speed ratio | speed target | memory ratio | memory target | "
      "NLL difference |",
      "|---|---|---|---|---|---|---|",
    ]
    span = lambda lo_hi: f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi[0] != lo_hi[1] else ""
    for c in compared:
      lines.append(
        f"| {c['length']} | {c['rounds']} | {c['speed']:.2f}{span(c['speed_range'])} | "
        f"{verdict(c['speed_pass'])} | {c['memory']:.2f}{span(c['memory_range'])} | "
        f"{verdict(c['memory_pass'])} | {c['nll_diff']:.1e} |"
      )
  return lines


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/pretrained/smollm2-135m")
  parser.add_argument("--lengths", default="2048,8192,32768")
  parser.add_argument("--hf_lengths", default="", help="Lengths also run with transformers.")
  parser.add_argument("--repeats", type=int, default=3, help="Calls per row (first + warm).")
  parser.add_argument(
    "--rounds", type=int, default=1, help="Rounds per length, the systems alternated in each."
  )
  parser.add_argument("--out", default="runs/pretrained_prefill")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    runtime.use_low_memory_schedule()
    kind, *child_args = json.loads(args.child)
    result = ours_child(*child_args) if kind == "ours" else hf_child(*child_args)
    print(json.dumps(result | {"peak_rss_gib": rss_gib()}))
    return result
  if args.repeats < 1:
    parser.error(f"--repeats={args.repeats} must be at least 1")
  if args.rounds < 1:
    parser.error(f"--rounds={args.rounds} must be at least 1")
  lengths = [int(n) for n in args.lengths.split(",") if n]
  hf_lengths = [int(n) for n in args.hf_lengths.split(",") if n]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if hf_lengths:
      from pe_research.pretrained import importer

      importer.export_run(args.workdir, tmp)
    for length in sorted(set(lengths) | set(hf_lengths)):
      systems = (["pe_research"] if length in lengths else []) + (
        ["transformers"] if length in hf_lengths else []
      )
      for round_ in range(args.rounds):
        for system in systems:
          if system == "pe_research":
            row = _run_child("ours", os.path.abspath(args.workdir), length, args.repeats)
          else:
            row = _run_child("hf", tmp, os.path.abspath(args.workdir), length, args.repeats)
          rows.append({"system": system, "length": length, "round": round_} | row)
          print(json.dumps(rows[-1]), flush=True)
  results = {"workdir": args.workdir, "machine": runtime.machine(), "rows": rows}
  write_results(args.out, results, report_lines(results))
  return results


if __name__ == "__main__":
  main()
