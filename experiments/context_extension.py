r"""Extending a RoPE model trained here past its training length L to s·L (YaRN Table 1 / PI
Table 3 shape); ``pretrained_extension.py`` does the same for a pretrained model.

  python -m experiments.context_extension --preset=cpu          # 18.8 min after make demo
  python -m experiments.context_extension --preset=paper --print_commands

Starts from the preset's RoPE run (``experiments/lm_presets.py``, shared with the ALiBi
figure) and compares six HF ``rope_scaling`` methods with factor s:

  PI (linear), NTK (static), dynamic NTK, YaRN, Llama-3 (low/high freq factor 1/4), LongRoPE

(1) zero-shot: the base run's parameters with new frequencies; (2) after a short fine-tune at
s·L (``init_from`` = the base run, ``train.seq_len`` = s·L, same bytes per step, a quarter of
the base learning rate), plus "fine-tune only" without scaling (PI's baseline). Every model
is scored on the same validation bytes at lengths up to 4·s·L and on passkey retrieval
(``pe_research.passkey``). Writes ``OUT/results.csv``, ``OUT/passkey.csv``, ``OUT/zero_shot.png``,
``OUT/fine_tuned.png`` and ``OUT/REPORT.md``.

LongRoPE's factors come from a search in the paper; here they are deterministic: short_factor
= 1 (no change inside L) and long_factor_i = 1 + (s − 1)·ramp_i with YaRN's ramp (β_fast=32,
β_slow=1), i.e. high-frequency dims are kept and low-frequency dims divided by s — the same
end points as YaRN, but blending the divisor instead of the frequency, with LongRoPE's
attention factor sqrt(1 + ln s / ln L).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from experiments import figure_cli, figure_report, lm_presets
from pe_research import cli, eval_report, passkey, stats
from pe_research.encodings.registry import encoding_spec
from pe_research.encodings.rope_scaling import yarn_correction_range
from pe_research.launch import grid, sweep
from pe_research.launch.grid import Run
from pe_research.model_size import resolved_dims

NAME = "context_extension"
_L = "original_max_position_embeddings"
PUBLISHED = [  # YaRN Table 1 (Llama-2 7B, 4k -> 8k, fine-tuned; sliding S=256), lengths below.
  ("PI (s=2)", 3.92, 3.51, 3.51, 3.34, 8.07),
  ("NTK (θ=20k)", 4.20, 3.75, 3.74, 3.59, 6.24),
  ("YaRN (s=2)", 3.91, 3.50, 3.51, 3.35, 6.04),
]
PUBLISHED_LENGTHS = (2048, 4096, 6144, 8192, 10240)


@dataclasses.dataclass(frozen=True)
class Preset:
  factor: int  # s: the extended length is s·L.
  methods: tuple[str, ...]  # Compared zero-shot (keys of ``methods()``).
  ft_methods: tuple[str, ...]  # Also fine-tuned (with "fine-tune only"); PI and YaRN at least.
  lengths: tuple[int, ...]  # L first; include s·L and at least one length beyond it.
  ft_steps: int
  max_tokens: int
  mode: str  # PI and YaRN report sliding windows with stride 256.
  stride: int | None
  batch_size: int
  passkey_trials: int


ALL = ("PI", "NTK", "dynamic NTK", "YaRN", "Llama-3", "LongRoPE")
# Lengths: L..s·L, then 1.25·s·L (YaRN's 10240 for 8192), 2·s·L and 4·s·L.
PRESETS = {
  "smoke": Preset(
    2,
    ("PI", "NTK", "dynamic NTK", "YaRN"),
    ("PI", "YaRN"),
    (32, 64, 256),
    10,
    512,
    "nonoverlapping",
    None,
    1,
    1,
  ),
  "cpu": Preset(
    4, ALL, ALL, (128, 256, 512, 640, 2048), 100, 262_144, "nonoverlapping", None, 4, 4
  ),
  "paper": Preset(
    4, ALL, ALL, (512, 1024, 2048, 2560, 4096, 8192), 1000, 65536, "sliding", 256, 8, 20
  ),
}


def longrope_factors(factor: float, train_len: int, dim: int, base: float) -> list[float]:
  """``1 + (s − 1)·ramp_i`` for i < d/2, with YaRN's ramp between its correction dims."""
  low, high = yarn_correction_range(dim, base, train_len, 32, 1)
  ramp_F = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)
  return [round(float(f), 6) for f in 1.0 + (factor - 1.0) * ramp_F]


def methods(factor: int, train_len: int, dim: int, base: float) -> dict[str, dict]:
  """Label -> HF ``rope_scaling`` dict extending ``train_len`` by ``factor``."""
  s = float(factor)
  return {
    "PI": {"rope_type": "linear", "factor": s},
    "NTK": {"rope_type": "ntk", "factor": s},
    "dynamic NTK": {"rope_type": "dynamic", "factor": s, _L: train_len},
    "YaRN": {"rope_type": "yarn", "factor": s, _L: train_len},
    "Llama-3": {
      **{"rope_type": "llama3", "factor": s, _L: train_len},
      **{"low_freq_factor": 1.0, "high_freq_factor": 4.0},
    },
    "LongRoPE": {
      **{"rope_type": "longrope", "factor": s, _L: train_len},
      "short_factor": [1.0] * (dim // 2),
      "long_factor": longrope_factors(s, train_len, dim, base),
    },
  }


def fine_tune_run(base: Run, label: str, scaling: dict | None, preset: Preset) -> Run:
  """``base`` continued at s·L with ``scaling`` (same bytes per step, lr / 4)."""
  slug = label.lower().replace(" ", "_").replace("-", "")
  steps, train = preset.ft_steps, base.config().train
  overrides = (
    ("init_from", base.workdir),
    ("pe.rope_scaling", json.dumps(scaling) if scaling else ""),
    ("train.seq_len", train.seq_len * preset.factor),
    ("train.batch_size", max(1, train.batch_size // preset.factor)),
    ("train.steps", steps),
    ("train.warmup_steps", steps // 10),
    ("train.lr", train.lr / 4),
    ("train.checkpoint_every", steps),
  )
  workdir = f"{os.path.dirname(base.workdir)}/rope_ft{preset.factor}x_{slug}"
  return Run(base.config_file, base.variant, workdir, (*base.overrides, *overrides))


def per_length(a: list[dict], b: list[dict], keep) -> tuple[bool | None, str]:
  """Is method ``a`` below method ``b`` at the lengths ``keep`` selects? Counts the lengths where
  a's 95% interval lies below b's, above it, or overlaps it. True when a is never separated
  above and separated below at least once, False when separated above somewhere and never
  below, None otherwise; with the counts and the mean log-ppl (point estimates) as text."""
  b_at = {r["length"]: r for r in b}
  pairs = [(r, b_at[r["length"]]) for r in a if keep(r["length"]) and r["length"] in b_at]
  below = sum(figure_report.above(y, x) for x, y in pairs)
  above = sum(figure_report.above(x, y) for x, y in pairs)
  ok = True if below and not above else (False if above and not below else None)
  mean_log = [np.mean([np.log(p[i]["ppl"]) for p in pairs]) if pairs else np.nan for i in (0, 1)]
  text = (
    f"below at {below}, above at {above}, tied at {len(pairs) - below - above} of "
    f"{len(pairs)} lengths (mean log-ppl {mean_log[0]:.3f} vs {mean_log[1]:.3f})"
  )
  return ok, text


def findings(zs: dict[str, list[dict]], ft: dict[str, list[dict]], train_len: int, factor: int):
  """Sentences checking the published shapes (PI Table 3, YaRN Table 1) against these rows
  (``ppl`` with its 95% interval ``ppl_lo``/``ppl_hi`` per length): a shape is claimed or denied
  only where the intervals separate, otherwise the line says "not separated"."""
  top = train_len * factor

  def row(rows, length):
    return next(r for r in rows if r["length"] == length)

  inside = lambda n: train_len < n <= top  # noqa: E731
  beyond = lambda n: n > top  # noqa: E731
  none_l, none_2l = row(zs["none"], train_len), row(zs["none"], 2 * train_len)
  pi_zs, pi_ft, ft_only = row(zs["PI"], top), row(ft["PI"], top), row(ft["fine-tune only"], top)
  dyn_ok, dyn_text = per_length(zs["dynamic NTK"], zs["NTK"], beyond)
  yarn_ok, yarn_text = per_length(ft["YaRN"], ft["PI"], inside)
  lengths = [r["length"] for r in ft["PI"]]
  last, past = max(lengths), min(n for n in lengths if n > top)
  yarn_past, pi_past = row(ft["YaRN"], past), row(ft["PI"], past)
  at_last = {k: figure_report.interval(row(rows, last)) for k, rows in ft.items()}
  best = stats.best(at_last)
  cell = figure_report.ppl_cell
  return [
    figure_report.checked(
      "No extension: ppl(2L) > 1.5·ppl(L) (paper: 7.20 -> >1000)",
      figure_report.exceeds(none_2l, none_l, 1.5),
      f"ppl(2L)/ppl(L) = {none_2l['ppl'] / none_l['ppl']:.2f}, ppl(L) {cell(none_l)}, "
      f"ppl(2L) {cell(none_2l)}",
    ),
    figure_report.checked(
      "Zero-shot, beyond s·L: dynamic NTK below static NTK "
      "(paper: dynamic beats static without fine-tuning)",
      dyn_ok,
      "dynamic NTK " + dyn_text,
    ),
    figure_report.checked(
      f"PI at s·L: {factor}× fine-tuning lowers ppl (paper: 16.10 -> 6.95)",
      figure_report.exceeds(pi_zs, pi_ft),
      f"{cell(pi_zs)} zero-shot -> {cell(pi_ft)} fine-tuned",
    ),
    figure_report.checked(
      "Fine-tuned at s·L: PI below fine-tune only (paper: 6.95 vs 7.69)",
      figure_report.exceeds(ft_only, pi_ft),
      f"PI {cell(pi_ft)} vs fine-tune only {cell(ft_only)}",
    ),
    figure_report.checked(
      "Fine-tuned, inside (L, s·L]: YaRN below PI (paper: YaRN ≤ PI)",
      yarn_ok,
      "YaRN " + yarn_text,
    ),
    figure_report.checked(
      f"Fine-tuned, just past s·L ({past}): YaRN below PI (paper, at 1.25·s·L: 6.04 vs 8.07)",
      figure_report.exceeds(pi_past, yarn_past),
      f"YaRN {cell(yarn_past)} vs PI {cell(pi_past)}",
    ),
    f"- Fine-tuned, lowest ppl at {last} (4·s·L): "
    + (f"{best}, separated from every other method." if best else "tied (no single best).")
    + f" Order by interval (`<` separated, `~` tied): {stats.rank(at_last)[0]}"
    + " (paper, at 1.25·s·L: YaRN).",
  ]


def passkey_table(summaries: dict[str, dict]) -> tuple[list[dict], list[int]]:
  """Rows (model, length, accuracy averaged over depths) and the passkey lengths; the positive
  control's rows are left out (``passkey_controls``)."""
  rows = []
  for label, summary in summaries.items():
    by_length: dict[int, list[float]] = {}
    for r in summary.get("passkey", []):
      if not r.get("control"):
        by_length.setdefault(r["length"], []).append(r["accuracy"])
    rows += [
      {"model": label, "length": n, "accuracy": float(np.mean(a))} for n, a in by_length.items()
    ]
  return rows, sorted({r["length"] for r in rows})


def passkey_controls(summaries: dict[str, dict]) -> list[str]:
  """One line per model on its positive control (``passkey.control_verdict``): the prompt at
  its training length (``train_len`` of the evaluation summary)."""
  lines = []
  for label, summary in summaries.items():
    control = [r for r in summary.get("passkey", []) if r.get("control")]
    verdict = passkey.control_verdict(control, summary["train_len"])
    lines.append(f"- Passkey, {label}: {verdict}.")
  return lines


def write_outputs(out, zs, ft, summaries, args, preset, base: Run, train_len: int, wall) -> None:
  rows = [
    {
      "model": f"{kind}: {label}",
      "length": r["length"],
      "mode": r["mode"],
      "ppl": r["ppl"],
      **{k: r[k] for k in ("ppl_lo", "ppl_hi") if k in r},
      "loss": r["loss"],
      **({"windows": r["windows"]} if "windows" in r else {}),
    }
    for kind, table in (("zero-shot", zs), ("fine-tuned", ft))
    for label, t in table.items()
    for r in t
  ]
  figure_report.write_csv(os.path.join(out, "results.csv"), rows)
  pk_rows, pk_lengths = passkey_table(summaries)
  figure_report.write_csv(os.path.join(out, "passkey.csv"), pk_rows)
  top = train_len * preset.factor
  for file, table in (("zero_shot", zs), ("fine_tuned", ft)):
    eval_report.plot_curves(
      os.path.join(out, f"{file}.png"),
      figure_report.ppl_curves(table),
      ylabel="validation perplexity (bytes)",
      title=f"RoPE L={train_len} extended ×{preset.factor} ({file.replace('_', '-')})",
      train_len=top if file == "fine_tuned" else train_len,
    )
  accuracy = {(r["model"], r["length"]): r["accuracy"] for r in pk_rows}
  text = [
    f"# Extending RoPE ×{preset.factor}: zero-shot and fine-tuned (preset `{args.preset}`)",
    "",
    f"Base: {base.config_file} RoPE run trained at L={train_len} (`{base.workdir}`); "
    f"fine-tunes: {preset.ft_steps} steps at {top}. Perplexity per byte, {preset.mode}"
    + (f" (stride {preset.stride})" if preset.stride else "")
    + f", {preset.max_tokens} bytes per length. Wall time of this invocation: {wall / 60:.1f} min.",
    "",
    "![zero-shot](zero_shot.png) ![fine-tuned](fine_tuned.png)",
    "",
    "## Zero-shot (base parameters, new frequencies)",
    *figure_report.ppl_table("method", zs),
    "",
    f"## After fine-tuning at {top}",
    *figure_report.ppl_table("method", ft),
    "",
    f"## Passkey retrieval (greedy exact match, mean over needle depths, {preset.passkey_trials} "
    "prompt(s) per cell)",
    *figure_report.markdown_table(
      ["model", *pk_lengths], [[m, *(accuracy.get((m, n)) for n in pk_lengths)] for m in summaries]
    ),
    "",
    "Positive control: the prompt at the model's training length (without the header when only",
    "that fits); a model that fails it cannot show retrieval beyond L, so its row is not evidence.",
    "",
    *passkey_controls(summaries),
    "",
    "## Published: YaRN Table 1 (fine-tuned 4k -> 8k, word-piece ppl)",
    *figure_report.markdown_table(["method", *PUBLISHED_LENGTHS], PUBLISHED),
    "",
    "PI Table 3 (LLaMA 7B 2048 -> 8192, PG-19): no extension 7.20 / >1e3 at 4096; fine-tune only "
    "7.21 / 7.34 / 7.69 at 2048 / 4096 / 8192; PI 7.13 / 6.96 / 6.95 (16.10 at 8192 before "
    "fine-tuning).",
  ]
  figure_report.write_report(out, text, findings(zs, ft, train_len, preset.factor))


def main(argv: list[str] | None = None) -> None:
  args = figure_cli.parse_experiment_args(
    __doc__, NAME, argv, lambda preset: lm_presets.PRESETS[preset].runs
  )
  start, preset = time.time(), PRESETS[args.preset]
  base = lm_presets.lm_run(args.preset, "rope", args.runs, grid.parse_overrides(args.set))
  config = base.config()
  train_len = config.train.seq_len
  rotary_dim = encoding_spec(config.pe.name).rotary_dim(resolved_dims(config.model)[0], config.pe)
  every = methods(preset.factor, train_len, rotary_dim, config.pe.rope_base)
  scalings = {label: every[label] for label in preset.methods}
  ft_runs = {
    label: fine_tune_run(base, label, every.get(label), preset)
    for label in ("fine-tune only", *preset.ft_methods)
  }
  out = figure_cli.run_or_print([base, *ft_runs.values()], args, NAME)
  if out is None:
    return
  request = {
    "lengths": preset.lengths,
    "max_tokens": preset.max_tokens,
    "mode": preset.mode,
    "stride": preset.stride,
    "batch_size": preset.batch_size,
    "passkey_trials": preset.passkey_trials,
  }
  summaries, zs, ft = {}, {}, {}
  for label, scaling in {"none": None, **scalings}.items():
    print(f"== zero-shot {label}", flush=True)
    name = f"rs_zeroshot_{scaling['rope_type'] if scaling else 'none'}{preset.factor}"
    summaries[f"zero-shot: {label}"] = sweep.evaluate(
      base.workdir, name, rope_scaling=scaling, **request
    )
    zs[label] = summaries[f"zero-shot: {label}"]["rows"]
  for label, run in ft_runs.items():
    print(f"== fine-tuned {label}", flush=True)
    summaries[f"fine-tuned: {label}"] = sweep.evaluate(run.workdir, "rs_finetuned", **request)
    ft[label] = summaries[f"fine-tuned: {label}"]["rows"]
  write_outputs(out, zs, ft, summaries, args, preset, base, train_len, time.time() - start)
  print(f"wrote {out}/REPORT.md, results.csv, passkey.csv, zero_shot.png, fine_tuned.png")


if __name__ == "__main__":
  cli.exit_on_value_error(main)
