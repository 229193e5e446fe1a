r"""Extending a pretrained RoPE model's context (SmolLM2-135M-Instruct, trained at L = 8192)
past L: every zero-shot method and short fine-tunes, side by side on the same tokens.

  make pretrained && python -m experiments.pretrained_extension --preset=cpu
  python -m experiments.pretrained_extension --preset=paper --workdir=runs/pretrained/NAME
  python -m experiments.pretrained_extension --preset=smoke --workdir=DIR --data='{"text": {...}}'

The methods (``extension_methods.METHODS``, one record each): none; the frequency methods PI,
NTK, YaRN and Llama-3 at s = n / L (``rope_scaling``), with fixed-s rows labelled "(s=4)";
dynamic NTK (HF's per-call form); and three methods HF's vocabulary lacks: Self-Extend
(``pe.self_extend_window`` W, ``pe.self_extend_group`` G), log-n attention scaling
(``pe.logn_len`` = L), ReRoPE (``pe.rerope_window``, with log-n as Su's reference; "clip only"
without). Fine-tuned (from the imported parameters, ``configs/finetune.py``, the same tokens
per step for every method): PI and YaRN at the preset's window, PoSE on its short window with
positions over s·L (YaRN frequencies). Where a method is the base model by construction at a
length (the encoding answers: ``RoPE.unchanged_up_to``), the base model's evaluation is reused.

Measured on ``windows`` windows per length, each the start of one document or stated series
(``pe_research.data.long_windows``; the ``data.*`` overrides of each text kind choose the corpus
and ``data.eval_split``): every window's NLL inside L and beyond L (``eval_lib``'s regions,
``<eval>_windows.json``), from which ``extension_report`` writes the tables and
``extension_verdicts`` the paired verdicts with intervals over windows; a needle-in-a-haystack
grid (``pe_research.niah``: ``niah_trials`` keys per cell, each on its own document of the first
text kind, at depths that put the needle more than L tokens before the question, each method's
positive control at L, the base's horizon below L, with Clopper–Pearson intervals). Writes
OUT/results.csv, OUT/niah.csv, OUT/<text>.png, OUT/REPORT.md; every evaluation is cached in the
run's eval/ (re-running resumes). ``--publish=DIR`` (e.g. docs/pretrained_extension/cpu) then
copies those files and the per-window losses behind every interval (DIR/windows/) where they
can be committed.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import shutil
import sys
import time

from experiments import figure_cli
from experiments.extension_methods import BY_LABEL, BY_SLUG, ExtensionMethod
from experiments.extension_presets import PRESETS, Preset, subset
from experiments.extension_report import write_outputs
from pe_research import cli, config_lib, runtime
from pe_research.launch import sweep

NAME = "pretrained_extension"


def _evaluate(workdir, name, lengths, budget, rope_scaling, overrides, stride=None, split=None):
  """One cached evaluation per length: ``budget(n) / n`` windows of one document each
  (``mode="documents"``: ``data.long_windows``); with ``stride``, sliding windows of the packed
  stream instead, scoring the first window and 4 strides after it; ``split``: the L of the
  regions (a fine-tune's base model's)."""
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
      mode="documents" if step is None else "sliding",
      stride=step,
      split=split,
    )
    path = os.path.join(workdir, "eval", f"{name}_{n}")  # Its per-window regions: _windows.json.
    rows += [r | {"eval": path} for r in summary["rows"]]
  return rows


def niah(
  workdir: str, name: str, preset: Preset, train_len: int, rope_scaling, overrides, horizon=()
):
  """One method's needle grid (``pe_research.niah.grid``): the positive control at L, each of
  ``horizon`` (below L, depth 0) and each of ``preset.niah_lengths`` at the depths beyond L,
  ``preset.niah_trials`` keys per cell, each on its own haystack (the documents of
  ``overrides``' corpus and ``data.eval_split``); cached in the run's eval/."""
  from pe_research import eval_lib
  from pe_research.data import tokenizer_of
  from pe_research.niah import grid
  from pe_research.runs import load_model

  request = {
    "lengths": list(preset.niah_lengths),
    "depths": list(preset.niah_depths),
    "trials": preset.niah_trials,
    "horizon": list(horizon),
    "train_len": train_len,
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
  rows = grid(
    eval_lib.Evaluator(model),
    tokenizer_of(config.data),
    preset.niah_lengths,
    train_len,
    trials=preset.niah_trials,
    depths=preset.niah_depths,
    horizon=horizon,
    data_cfg=config.data,
    split=config.data.eval_split,
  )
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"request": request, "rows": rows}, f, indent=1)
  return rows


def configured(config, rope_scaling: dict | None, overrides: dict):
  """A copy of ``config`` with ``rope_scaling`` and the ``pe.*`` ``overrides`` of a method."""
  config = config_lib.config_from_saved(config_lib.config_to_dict(config))
  config.pe.rope_scaling = json.dumps(rope_scaling) if rope_scaling else ""
  config_lib.override_for_eval(config, overrides, "--methods")
  return config


def unchanged_up_to(config, rope_scaling: dict | None, overrides: dict) -> float:
  """The longest window at which the run ``config`` with ``rope_scaling`` and ``pe.*``
  ``overrides`` is the base model, as its encoding answers (``RoPE.unchanged_up_to``; 0 for an
  encoding that does not say)."""
  from flax import nnx

  from pe_research.encodings.registry import build_encoding
  from pe_research.model_size import resolved_dims

  config = configured(config, rope_scaling, overrides)
  model = config.model
  encoding = build_encoding(
    config.pe,
    num_heads=model.num_heads,
    head_dim=resolved_dims(model)[0],
    model_dim=model.model_dim,
    rngs=nnx.Rngs(0),
  )
  return getattr(encoding, "unchanged_up_to", 0)


def fine_tune_config(workdir: str, method: ExtensionMethod, preset: Preset, train_len: int):
  """PI / YaRN at the fine-tuning window, or PoSE (its short window, positions over s·L, YaRN
  frequencies): the target s = the preset's factor, the same tokens per step for every method,
  warmup 10% of the steps."""
  from configs import finetune

  recipe = method.fine_tune
  seq_len = preset.pose_seq_len if recipe.pose else preset.ft_seq_len
  config = finetune.get_config(f"init_from={workdir},seq_len={seq_len},steps={preset.ft_steps}")
  scaling = BY_SLUG[recipe.base].rope_scaling(float(preset.factor), train_len)
  config.pe.rope_scaling = json.dumps(scaling)
  if recipe.pose:
    config.pe.pose_target_len = preset.factor * train_len
    config.pe.pose_first_chunk = "official"
  config.train.batch_size = max(1, preset.ft_seq_len // seq_len)
  config.train.warmup_steps = preset.ft_steps // 10
  return config


def final_train_loss(workdir: str) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return float(records[-1]["loss"])


PUBLISHED = (".md", ".csv", ".png")  # What --publish copies from OUT (and windows/).


def check_publish_target(dest: str) -> None:
  """Refuses (before any work) a ``--publish`` folder that holds anything ``publish`` did not
  write: publishing replaces the folder."""
  if not os.path.exists(dest):
    return
  if not os.path.isdir(dest):
    raise ValueError(f"--publish={dest!r} is a file; allowed: a new folder or a published one")
  foreign = [
    name for name in os.listdir(dest) if not (name.endswith(PUBLISHED) or name == "windows")
  ]
  unpublished = os.listdir(dest) and not os.path.isfile(os.path.join(dest, "REPORT.md"))
  if foreign or unpublished:
    what = ", ".join(foreign) or "no REPORT.md"
    raise ValueError(
      f"--publish={dest!r} holds files a report did not write ({what}); allowed: a new folder "
      "or one --publish wrote (it is replaced)"
    )


def publish(out: str, dest: str, workdir: str) -> None:
  """Copies OUT's report, tables and figures to ``dest`` (replacing it), with the per-window
  losses of every evaluation in results.csv (``<eval>_windows.json``) in ``dest``/windows/ (a
  fine-tune's prefixed with its run's name); REPORT.md gains a line saying where it came from."""
  check_publish_target(dest)
  with open(os.path.join(out, "results.csv")) as f:
    evals = sorted({r["eval"] for r in csv.DictReader(f) if r.get("eval")})
  shutil.rmtree(dest, ignore_errors=True)
  os.makedirs(dest)
  for name in os.listdir(out):
    if name.endswith(PUBLISHED):
      shutil.copy(os.path.join(out, name), dest)
  base, copied = os.path.abspath(workdir), 0
  for path in evals:
    run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    prefix = "" if run == base else f"{os.path.basename(run)}__"
    if os.path.isfile(f"{path}_windows.json"):
      os.makedirs(os.path.join(dest, "windows"), exist_ok=True)
      target = f"{prefix}{os.path.basename(path)}_windows.json"
      shutil.copy(f"{path}_windows.json", os.path.join(dest, "windows", target))
      copied += 1
  note = f"> Published from `{out}`."
  if copied:
    note += (
      " The per-window token losses behind every interval are in `windows/` (`nll_WxR`, "
      "`weight_WxR`: window × region, inside / beyond L; a fine-tune's files start with its "
      "run's name)."
    )
  report = os.path.join(dest, "REPORT.md")
  with open(report) as f:
    lines = f.read().split("\n")
  lines[1:1] = ["", note]
  with open(report, "w") as f:
    f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  figure_cli.add_common_flags(parser, NAME, tuple(PRESETS))
  parser.add_argument("--workdir", default="runs/pretrained/smollm2-135m")
  parser.add_argument("--data", default="", help="JSON {text kind: data overrides}.")
  parser.add_argument("--methods", default="", help="Comma-separated subset of the methods.")
  parser.add_argument(
    "--lengths", default="", help="Comma-separated lengths replacing the preset's."
  )
  parser.add_argument("--publish", default="", help="Copy the report and windows to DIR.")
  args = parser.parse_args(argv)
  args.command = ["python -m experiments.pretrained_extension", *(argv or sys.argv[1:])]
  runtime.use_low_memory_schedule()  # Before JAX starts (no effect in a process that has).
  preset, start = subset(PRESETS[args.preset], args.methods, args.lengths), time.time()
  if args.publish:
    check_publish_target(args.publish)
  out = figure_cli.out_dir(args, NAME)
  if not os.path.isfile(os.path.join(args.workdir, "config.json")):
    raise ValueError(f"--workdir={args.workdir!r} has no run; allowed: make pretrained first")
  with open(os.path.join(args.workdir, "config.json")) as f:
    base = config_lib.config_from_saved(json.load(f))
  train_len = base.train.seq_len
  texts = json.loads(args.data) if args.data else preset.data
  first = next(iter(texts))
  none = BY_LABEL["none"]

  def budget(n):
    return n * preset.windows

  def run(method: ExtensionMethod, kind: str, lengths, stride=None) -> list[dict]:
    """Rows of ``method`` at ``lengths`` (sliding with ``stride``); at a length where it is
    the base model (its encoding says so) the base model's cached evaluation, ``same_as``."""
    suffix = "" if stride is None else "_sliding"
    out_rows = []
    for n in lengths:
      scaling, pe = method.at(n, preset, train_len)
      same = method is not none and n <= unchanged_up_to(base, scaling, pe)
      who = none if same else method
      scaling, pe = who.at(n, preset, train_len)
      name = f"px_{who.slug}_{kind}{suffix}"
      for r in _evaluate(args.workdir, name, [n], budget, scaling, pe | texts[kind], stride):
        s = method.scale(n, train_len, preset.factor) if method.rope_type else None
        out_rows.append(r | {"s": s} | ({"same_as": "none"} if same else {}))
    return out_rows

  rows = []
  for label in dict.fromkeys((*preset.methods, *preset.other_methods)):
    method = BY_LABEL[label]
    for kind in texts:
      if label not in (preset.methods if kind == first else preset.other_methods):
        continue
      lengths = preset.lengths if kind == first else preset.other_lengths
      fixed = method is none or method.factor is not None
      lengths += preset.inside_lengths if fixed and kind == first else ()
      lengths += preset.long_lengths if kind == first and label in preset.long_methods else ()
      evaluated = run(method, kind, tuple(sorted(set(lengths))))
      if kind == first and preset.sliding_lengths:
        evaluated += run(method, kind, preset.sliding_lengths, stride=preset.stride)
      rows += [{"text": kind, "method": label, "fine_tuned": False} | r for r in evaluated]
      print(f"== {label} on {kind}: done ({(time.time() - start) / 60:.1f} min)", flush=True)
  losses = {}
  for label in preset.ft_methods:
    method = BY_LABEL[label]
    config = fine_tune_config(args.workdir, method, preset, train_len)
    ft_dir = os.path.join(out, "runs", method.slug)
    sweep.train_run(config, ft_dir)
    losses[label] = final_train_loss(ft_dir)
    lengths = sorted({*preset.lengths, *preset.long_lengths})
    evaluate = functools.partial(_evaluate, ft_dir, split=train_len)
    ft_rows = evaluate(f"px_ft_{first}", lengths, budget, None, texts[first])
    if preset.sliding_lengths:
      ft_rows += evaluate(
        f"px_ft_{first}_sliding", preset.sliding_lengths, budget, None, texts[first], preset.stride
      )
    trained = {
      "ft_steps": config.train.steps,
      "ft_tokens": config.train.batch_size * config.train.seq_len,
      "ft_window": config.train.seq_len,
      "ft_warmup": config.train.warmup_steps,
      "ft_positions": config.pe.pose_target_len or config.train.seq_len,
      "train_loss": losses[label],
    }
    rows += [{"text": first, "method": label, "fine_tuned": True} | r | trained for r in ft_rows]
  niah_rows = {}
  for label in preset.niah_methods:  # One model per method: s at the grid's longest length.
    scaling, pe = BY_LABEL[label].at(max(preset.niah_lengths), preset, train_len)
    horizon = preset.niah_horizon if label == "none" else ()  # The base's own horizon.
    niah_rows[label] = niah(
      args.workdir, BY_LABEL[label].slug, preset, train_len, scaling, pe | texts[first], horizon
    )
  write_outputs(out, args, preset, rows, niah_rows, train_len, time.time() - start)
  if args.publish:
    publish(out, args.publish, args.workdir)
    print(f"published {out} to {args.publish}")


if __name__ == "__main__":
  cli.exit_on_value_error(main)
