"""Prefill (scoring) throughput and peak memory of an imported pretrained model, against HF
transformers on the same tokens, each length in a fresh process.

  make pretrained
  python -m benchmarks.pretrained_prefill --workdir=runs/pretrained/smollm2-135m \
      --lengths=2048,8192,32768 --hf_lengths=2048,8192 --out=docs/benchmarks/pretrained_prefill

Per length: one window of ``length`` tokens of the run's validation data (``data.name`` with its
tokenizer; pystdlib by default), scored once (all ``length`` targets): seconds after compilation,
tokens/s, compile seconds, peak RSS of the process (VmHWM) and mean NLL. The HF row loads the
run exported to an HF folder (``pe_research.pretrained export``) with ``AutoModelForCausalLM``
(float32, sdpa, torch threads = cores) and scores the same tokens; the NLLs must agree.
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

from benchmarks.bench_lib import machine, rss_gib, write_results
from pe_research import backend


def _window(config, length: int) -> dict[str, np.ndarray]:
  from pe_research.data import make_eval_batches

  return make_eval_batches(config, length=length, max_tokens=length, batch_size=1)[0]


def ours_child(workdir: str, length: int) -> dict:
  """Scores one window with the run's model (its attention, blockwise for imports)."""
  from pe_research import eval_lib
  from pe_research.runs import load_model

  model, config, _ = load_model(workdir)
  batch = _window(config, length)
  evaluator = eval_lib.Evaluator(model)
  start = time.perf_counter()
  stats, compile_seconds = evaluator.score(batch)
  seconds = time.perf_counter() - start - compile_seconds
  nll = float(stats["nll_sum_L"].sum() / stats["weight_sum_L"].sum())
  return {"seconds": seconds, "compile_seconds": compile_seconds, "nll": nll}


def hf_child(hf_dir: str, workdir: str, length: int) -> dict:
  """Scores the same window with transformers (float32, sdpa)."""
  import torch
  import transformers

  from pe_research.runs import load_model

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  _, config, _ = load_model(workdir)
  batch = _window(config, length)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    hf_dir, dtype=torch.float32, attn_implementation="sdpa"
  ).eval()
  start = time.perf_counter()
  with torch.inference_mode():
    logits = model(torch.tensor(batch["inputs"])).logits[0].float()
  seconds = time.perf_counter() - start
  nll = torch.nn.functional.cross_entropy(logits, torch.tensor(batch["targets"][0]).long())
  return {"seconds": seconds, "compile_seconds": 0.0, "nll": float(nll)}


def _run_child(kind: str, *args) -> dict:
  payload = json.dumps([kind, *args])
  cmd = [sys.executable, "-m", "benchmarks.pretrained_prefill", "--child", payload]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{kind} at {args[-1]} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def report_lines(results: dict) -> list[str]:
  m = results["machine"]
  lines = [
    "# Prefill throughput: " + results["workdir"],
    "",
    f"Machine: {m['cpu']} (family/model {m['family_model']}), {m['cores']} cores, ISA "
    f"{', '.join(m['isa'])}. One window per length, a fresh process per row.",
    "",
    "| system | length | tokens/s | seconds | compile s | peak RSS GiB | mean NLL |",
    "|---|---|---|---|---|---|---|",
  ]
  for row in results["rows"]:
    lines.append(
      f"| {row['system']} | {row['length']} | {row['length'] / row['seconds']:.0f} | "
      f"{row['seconds']:.1f} | {row['compile_seconds']:.1f} | {row['peak_rss_gib']:.2f} | "
      f"{row['nll']:.4f} |"
    )
  return lines


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/pretrained/smollm2-135m")
  parser.add_argument("--lengths", default="2048,8192,32768")
  parser.add_argument("--hf_lengths", default="", help="Lengths also run with transformers.")
  parser.add_argument("--out", default="runs/pretrained_prefill")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    backend.use_low_memory_schedule()
    kind, *child_args = json.loads(args.child)
    result = ours_child(*child_args) if kind == "ours" else hf_child(*child_args)
    print(json.dumps(result | {"peak_rss_gib": rss_gib()}))
    return result
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
      for system in systems:
        if system == "pe_research":
          row = _run_child("ours", os.path.abspath(args.workdir), length)
        else:
          row = _run_child("hf", tmp, os.path.abspath(args.workdir), length)
        rows.append({"system": system, "length": length} | row)
        print(json.dumps(rows[-1]), flush=True)
  results = {"workdir": args.workdir, "machine": machine(), "rows": rows}
  write_results(args.out, results, report_lines(results))
  return results


if __name__ == "__main__":
  main()
