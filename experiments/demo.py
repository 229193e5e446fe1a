r"""`make demo`: train short, test long — seven encodings, 256 KB of validation text per length.

  python -m experiments.demo --out=runs/demo [--steps=500] [--factors=1,2,16] [--workers=2]

Trains ``configs/demo.py`` (d=128, 4 layers, byte-level, pystdlib, L=128) with sinusoidal,
RoPE, ALiBi, T5 bias, NoPE, KERPLE and FIRE, two at a time (one process and one XLA thread
each), and evaluates each, non-overlapping, at 1×, 2× and 16× the training length on the same
first 262,144 validation bytes, with 95% bootstrap intervals over the windows. Writes
``OUT/ppl_vs_length.png``, ``OUT/results.csv`` and ``OUT/REPORT.md`` (whose verdicts need
separated intervals), plus the analytic ``OUT/rope_decay/``. A rerun reuses finished training
runs and evaluations. Zero-shot RoPE extension is ``experiments/context_extension.py``.
Runtime: README.md (section "What make demo does") has the measured time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import multiprocessing
import os
import time

from configs import demo as demo_config
from experiments import figure_report, rope_decay
from pe_research import eval_report, runtime, stats
from pe_research.launch import sweep
from pe_research.metrics import quiet_library_logging

ENCODINGS = ("sinusoidal", "rope", "alibi", "t5", "nope", "kerple", "fire")
MAX_TOKENS = 262_144  # Validation bytes per length (256 KB).
BATCH = 0  # Windows per evaluation call: about 1024 tokens (eval_lib.eval_batch_size).
MAX_FACTOR = 32  # Longest evaluation length / L.


def growth(rows: list[dict], at: int) -> float:
  """ppl at row ``at`` over ppl at the first (training) length."""
  return rows[at]["ppl"] / rows[0]["ppl"]


def findings(results: dict[str, list[dict]]) -> list[str]:
  """Sentences that check the published shapes against this run's rows (``ppl`` with its 95%
  interval ``ppl_lo``/``ppl_hi`` at each length; the first length is L). A shape is claimed or
  denied only where the intervals separate."""
  sin, alibi, rope = results["sinusoidal"], results["alibi"], results["rope"]
  n2, far = sin[1]["length"], rope[-1]["length"]
  lines = [
    figure_report.checked(
      f"Sinusoidal explodes right past L (ppl({n2}) > 1.5 ppl(L))",
      figure_report.exceeds(sin[1], sin[0], 1.5),
      f"ppl({n2})/ppl(L) = {growth(sin, 1):.2f}",
    )
  ]
  worst = max(range(1, len(alibi)), key=lambda i: growth(alibi, i))
  lines.append(
    figure_report.checked(
      "ALiBi stays flat past L (no length above 1.15 ppl(L))",
      figure_report.stays_flat(alibi, 1.15),
      f"largest ppl/ppl(L) = {growth(alibi, worst):.2f} at {alibi[worst]['length']}",
    )
  )
  lines.append(
    figure_report.checked(
      "RoPE degrades past L",
      figure_report.exceeds(rope[-1], rope[0], 1.0),
      f"ppl({far})/ppl(L) = {growth(rope, -1):.2f}",
    )
  )
  encodings = {k: figure_report.interval(rows[-1]) for k, rows in results.items() if k in ENCODINGS}
  best = stats.best(encodings)
  ranking = stats.rank(encodings)[0]
  lines.append(
    f"- Lowest ppl at {far}: "
    + (f"{best}, separated from every other encoding." if best else "tied (no single best).")
    + f" Order by interval (`<` separated, `~` tied): {ranking}."
  )
  return lines


def write_outputs(out: str, results: dict[str, list[dict]], max_tokens: int, wall: float) -> None:
  lengths = [r["length"] for r in results["rope"]]
  columns = ["length", "tokens", "loss", "ppl", "ppl_lo", "ppl_hi", "windows", "bits_per_byte"]
  figure_report.write_csv(
    os.path.join(out, "results.csv"),
    [
      {"model": label, **{c: r[c] for c in columns}}
      for label, rows in results.items()
      for r in rows
    ],
  )
  eval_report.plot_curves(
    os.path.join(out, "ppl_vs_length.png"),
    figure_report.ppl_curves(results),
    ylabel="validation perplexity (bytes)",
    title=f"Train short (L={lengths[0]}), test long: pystdlib bytes, 95% intervals",
    train_len=lengths[0],
  )
  text = [
    "# Train short, test long (make demo)",
    "",
    f"Byte-level LM (configs/demo.py: d=128, 4 layers) trained at L={lengths[0]} on Python",
    f"stdlib source; validation perplexity on the same first {max_tokens:,} validation bytes at",
    "every length (non-overlapping windows), with a 95% bootstrap interval over the windows in",
    "brackets. One seed per encoding.",
    f"Wall time of this invocation: {wall / 60:.1f} min.",
    "",
    "![ppl vs length](ppl_vs_length.png)",
    "",
    *figure_report.ppl_table("model", results),
    "",
    "Published shapes checked below: ALiBi paper Fig. 1.",
  ]
  figure_report.write_report(out, text, findings(results))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/demo", help="Output folder (a workdir per encoding).")
  parser.add_argument("--steps", type=int, default=500, help="Training steps per encoding.")
  parser.add_argument(
    "--max_tokens", type=int, default=MAX_TOKENS, help="Validation bytes scored per length."
  )
  parser.add_argument(
    "--factors", default="1,2,16", help="Evaluation lengths as multiples of configs/demo.py's L."
  )
  parser.add_argument(
    "--workers", type=int, default=2, help="Models trained/evaluated at once, one process each."
  )
  args = parser.parse_args(argv)
  if args.steps < 1 or args.max_tokens < 1 or args.workers < 1:
    parser.error("--steps, --max_tokens and --workers must be >= 1")
  factors = args.factors.split(",")
  if not all(f.strip().isdigit() for f in factors) or len(factors) < 2 or int(factors[0]) != 1:
    parser.error(f"--factors={args.factors!r}: allowed: integers starting with 1, e.g. 1,4,16")
  train_len = demo_config.get_config(f"steps={args.steps}").train.seq_len
  args.lengths = [train_len * int(f) for f in factors]
  if args.lengths != sorted(set(args.lengths)) or args.lengths[-1] > MAX_FACTOR * train_len:
    parser.error(f"--factors={args.factors!r}: allowed: increasing, at most {MAX_FACTOR}")
  return args


def _train(out: str, pe: str, steps: int) -> None:
  """Trains encoding ``pe`` unless finished; runs in a worker process."""
  quiet_library_logging()
  print(f"== {pe}: train {steps} steps", flush=True)
  sweep.train_run(demo_config.get_config(f"pe={pe},steps={steps}"), os.path.join(out, pe))


def _evaluate(out: str, pe: str, lengths: list[int], budget: dict) -> list[dict]:
  """The rows of the trained encoding ``pe``; runs in a worker process."""
  quiet_library_logging()
  print(f"== {pe}: evaluate at {lengths}", flush=True)
  return sweep.evaluate(os.path.join(out, pe), "demo", lengths=lengths, **budget)["rows"]


def run_jobs(out: str, args: argparse.Namespace) -> dict[str, list[dict]]:
  """Trains and evaluates every encoding in ``args.workers`` processes: the trainings are
  queued first, each evaluation as soon as its training ends, so the workers stay busy to the
  end. The results keep the order of ENCODINGS."""
  train = functools.partial(_train, out, steps=args.steps)
  budget = {"max_tokens": args.max_tokens, "batch_size": BATCH}
  evaluate = functools.partial(_evaluate, out, lengths=args.lengths, budget=budget)
  if args.workers == 1:
    return {pe: (train(pe), evaluate(pe))[1] for pe in ENCODINGS}
  runtime.one_thread_per_process()  # Read by the worker processes' XLA, not by this one's.
  spawn = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=spawn) as pool:
    trainings = {pool.submit(train, pe): pe for pe in ENCODINGS}
    evaluations = {}
    for done in concurrent.futures.as_completed(trainings):
      done.result()
      evaluations[trainings[done]] = pool.submit(evaluate, trainings[done])
    return {pe: evaluations[pe].result() for pe in ENCODINGS}


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  quiet_library_logging()
  start, out = time.time(), os.path.abspath(args.out)  # Orbax wants absolute paths.
  os.makedirs(out, exist_ok=True)
  rope_decay.main(["--out", os.path.join(out, "rope_decay")])  # The analytic figure.
  results = run_jobs(out, args)
  write_outputs(out, results, args.max_tokens, time.time() - start)
  print(f"wrote {out}/ppl_vs_length.png, results.csv, REPORT.md", flush=True)


if __name__ == "__main__":
  main()
