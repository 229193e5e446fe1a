r"""Extending a pretrained RoPE model's context (SmolLM2-135M, trained at L = 8192) past L: every
zero-shot method and short fine-tunes, side by side on the same tokens.

  make pretrained && python -m experiments.pretrained_extension --preset=cpu
  python -m experiments.pretrained_extension --preset=paper --workdir=runs/pretrained/NAME
  python -m experiments.pretrained_extension --preset=smoke --workdir=DIR --data='{"text": {...}}'

Zero-shot (one config value each, applied at evaluation to the same parameters): none, PI
(linear), static NTK, dynamic NTK, YaRN, Llama-3 (rope_scaling, factor s) and three methods HF's
vocabulary lacks: Self-Extend (``pe.self_extend_window`` W, ``pe.self_extend_group`` G), log-n
attention scaling (``pe.logn_len`` = L) and ReRoPE (``pe.rerope_window``). Fine-tuned (from the
imported parameters, ``configs/finetune.py``, the same tokens per method): PI and YaRN at the
preset's fine-tuning window, and PoSE (the original window, positions over s·L, YaRN
frequencies). Measured: perplexity against length per text kind (non-overlapping windows; the
shorter lengths also sliding with stride 256 as in PI/YaRN), a 95% bootstrap interval on each
(``pe_research.stats``), and a needle-in-a-haystack grid (the passkey prompt, greedy exact
retrieval of the key's tokens, ``pe_research.passkey``) with the base model inside L as its
positive control. Writes OUT/results.csv, OUT/niah.csv, OUT/<text>.png, OUT/REPORT.md; every
evaluation is cached in the run's eval/ (re-running resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from experiments import figure_cli
from experiments.extension_presets import (  # noqa: F401 (the presets are this script's API)
  _L,
  PRESETS,
  ZERO_SHOT,
  Preset,
  same_as_none,
  subset,
  zero_shot_methods,
)
from experiments.extension_report import write_outputs
from pe_research import backend, cli, config_lib
from pe_research.launch import sweep

NAME = "pretrained_extension"


def _slug(label: str) -> str:
  return label.lower().replace(" ", "_").replace("-", "")


def _evaluate(workdir, name, lengths, budget, rope_scaling, overrides, stride=None):
  """One cached evaluation per length (each length has its own token budget ``budget(n)``);
  with ``stride``, sliding windows instead, scoring the first window and 4 strides after it."""
  rows = []
  for n in lengths:
    step = None if stride is None else min(stride, n // 2)
    summary = sweep.evaluate(
      workdir,
      f"{name}_{n}",
      lengths=[n],
      max_tokens=budget(n) if step is None else n + 4 * step,
      rope_scaling=rope_scaling,
      overrides=overrides,
      mode="nonoverlapping" if step is None else "sliding",
      stride=step,
    )
    path = os.path.join(workdir, "eval", f"{name}_{n}")  # Its per-position losses: _per_position.
    rows += [r | {"eval": path} for r in summary["rows"]]
  return rows


def niah(workdir: str, name: str, preset: Preset, rope_scaling, overrides) -> list[dict]:
  """Passkey grid rows (length, depth, accuracy with its interval), cached in the run's eval/."""
  from pe_research import eval_lib
  from pe_research.data import tokenizer_of
  from pe_research.runs import load_model

  request = {
    "lengths": list(preset.niah_lengths),
    "depths": list(preset.niah_depths),
    "trials": preset.niah_trials,
    "rope_scaling": rope_scaling,
    "overrides": overrides,
    "code": sweep.code_version(),
  }
  path = os.path.join(workdir, "eval", f"niah_{name}.json")
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached["request"] == request:
      return cached["rows"]
  model, config, _ = load_model(
    workdir, rope_scaling=json.dumps(rope_scaling) if rope_scaling else None, overrides=overrides
  )
  rows, _ = eval_lib.passkey_sweep(
    eval_lib.Evaluator(model),
    preset.niah_lengths,
    preset.niah_depths,
    trials=preset.niah_trials,
    batch_size=1,
    encode=tokenizer_of(config.data).encode,
  )
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"request": request, "rows": rows}, f, indent=1)
  return rows


def fine_tune_config(workdir: str, label: str, preset: Preset, train_len: int):
  """PI / YaRN at the fine-tuning window, or PoSE (window L, positions over s·L, YaRN)."""
  from configs import finetune

  seq_len = preset.pose_seq_len if label == "PoSE" else preset.ft_seq_len
  config = finetune.get_config(f"init_from={workdir},seq_len={seq_len},steps={preset.ft_steps}")
  s = float(preset.factor)
  scaling = {"rope_type": "linear", "factor": s}
  if label != "PI":
    scaling = {"rope_type": "yarn", "factor": s, _L: train_len}
  config.pe.rope_scaling = json.dumps(scaling)
  if label == "PoSE":
    config.pe.pose_target_len = preset.factor * train_len
  # The same tokens per step for every method (PoSE's window may be shorter than ft_seq_len).
  config.train.batch_size = max(1, preset.ft_seq_len // seq_len)
  return config


def final_train_loss(workdir: str) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return float(records[-1]["loss"])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  figure_cli.add_common_flags(parser, NAME, tuple(PRESETS))
  parser.add_argument("--workdir", default="runs/pretrained/smollm2-135m")
  parser.add_argument("--data", default="", help="JSON {text kind: data overrides}.")
  parser.add_argument("--methods", default="", help="Comma-separated subset of the methods.")
  parser.add_argument(
    "--lengths", default="", help="Comma-separated lengths replacing the preset's."
  )
  args = parser.parse_args(argv)
  args.command = ["python -m experiments.pretrained_extension", *(argv or sys.argv[1:])]
  backend.use_low_memory_schedule()  # Before JAX starts (no effect in a process that has).
  preset, start = subset(PRESETS[args.preset], args.methods, args.lengths), time.time()
  out = figure_cli.out_dir(args, NAME)
  if not os.path.isfile(os.path.join(args.workdir, "config.json")):
    raise ValueError(f"--workdir={args.workdir!r} has no run; allowed: make pretrained first")
  with open(os.path.join(args.workdir, "config.json")) as f:
    base = config_lib.config_from_saved(json.load(f))
  train_len = base.train.seq_len
  texts = json.loads(args.data) if args.data else preset.data
  first = next(iter(texts))

  def budget(n):
    return n * (preset.windows if n <= train_len else 1)

  table: dict[str, dict[str, dict]] = {kind: {} for kind in texts}  # kind -> label -> n -> ppl
  rows = []
  methods = zero_shot_methods(preset, train_len)

  def run(label, kind, lengths, stride=None):
    """Rows of ``label`` at ``lengths`` (sliding with ``stride``); lengths where it is the base
    model by construction are the base model's (cached) evaluation, marked ``same_as``."""
    suffix = "" if stride is None else "_sliding"
    out_rows = []
    for who in dict.fromkeys(("none", label)):
      mine = [n for n in lengths if same_as_none(label, n, preset, train_len) == (who == "none")]
      if not mine:
        continue
      scaling, pe = methods[who]
      name = f"px_{_slug(who)}_{kind}{suffix}"
      overrides = pe | texts[kind]
      for r in _evaluate(args.workdir, name, mine, budget, scaling, overrides, stride):
        out_rows.append(r | ({"same_as": "none"} if who != label else {}))
    return out_rows

  for label in methods:
    for kind in texts:
      if label not in (preset.methods if kind == first else preset.other_methods):
        continue
      lengths = preset.lengths if kind == first else preset.other_lengths
      lengths += preset.base_lengths if label == "none" else ()
      lengths += preset.long_lengths if kind == first and label in preset.long_methods else ()
      evaluated = run(label, kind, tuple(sorted(set(lengths))))
      if kind == first and preset.sliding_lengths:
        evaluated += run(label, kind, preset.sliding_lengths, stride=preset.stride)
      for r in evaluated:
        rows.append({"text": kind, "method": label, "fine_tuned": False} | r)
        if r["mode"] == "nonoverlapping":
          table[kind].setdefault(label, {})[r["length"]] = (r["ppl"], r["ppl_lo"], r["ppl_hi"])
      print(f"== {label} on {kind}: done ({(time.time() - start) / 60:.1f} min)", flush=True)
  losses = {}
  for label in preset.ft_methods:
    config = fine_tune_config(args.workdir, label, preset, train_len)
    ft_dir = os.path.join(out, "runs", _slug(label))
    sweep.train_run(config, ft_dir)
    losses[label] = final_train_loss(ft_dir)
    lengths = preset.lengths + preset.base_lengths + preset.long_lengths
    ft_rows = _evaluate(ft_dir, f"px_ft_{first}", sorted(lengths), budget, None, texts[first])
    ft_rows += _evaluate(
      ft_dir,
      f"px_ft_{first}_sliding",
      preset.sliding_lengths,
      budget,
      None,
      texts[first],
      preset.stride,
    )
    for r in ft_rows:
      rows.append({"text": first, "method": f"{label} (ft)", "fine_tuned": True} | r)
      rows[-1]["train_loss"] = losses[label]
      if r["mode"] == "nonoverlapping":
        table[first].setdefault(f"{label} (ft)", {})[r["length"]] = (
          r["ppl"],
          r["ppl_lo"],
          r["ppl_hi"],
        )
  niah_rows = {
    label: niah(args.workdir, _slug(label), preset, *methods[label])
    for label in preset.niah_methods
  }
  write_outputs(out, args, preset, table, rows, niah_rows, losses, train_len, time.time() - start)


if __name__ == "__main__":
  cli.exit_on_value_error(main)
