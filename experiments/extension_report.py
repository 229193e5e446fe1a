"""The report of ``experiments/pretrained_extension.py``: tables of every long window's
perplexity inside and beyond L, figures, the NIAH grid, the run's machine and model, and the
verdicts of ``experiments.extension_verdicts`` (paired on the same windows or tokens, 95%
intervals over windows).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess

from experiments import figure_report
from experiments.extension_methods import BY_LABEL, FIXED_S, METHODS, RECIPE_MIN_STEPS
from experiments.extension_verdicts import (
  READING,
  beyond_over_inside,
  findings,
  fmt_ratio,
  follows_recipe,
  interval_row,
  is_fine_tuned,
  label,
  region_ppl,
  versus,
  windows,
)
from pe_research import eval_report, runtime, stats


def _ppl_cell(value) -> str:
  return (
    "–" if value is None or math.isnan(value[0]) else figure_report.ppl_cell(interval_row(value))
  )


def code() -> str:
  """The code that ran: the git commit of this checkout (and whether tracked files differ from
  it) when there is one, and the hash of the ``pe_research`` sources the evaluations are cached
  under (``sweep.code_version``)."""
  from pe_research.launch import sweep

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args) -> str:
    try:
      done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
      return ""
    return done.stdout.strip() if done.returncode == 0 else ""

  commit = git("rev-parse", "--short=7", "HEAD")
  dirty = (
    " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
  )
  where = f"git commit {commit}{dirty}" if commit else "not a git checkout"
  return f"Code: {where}; pe_research sources {sweep.code_version()} (``sweep.code_version``)."


def run_conditions() -> str:
  """The machine this invocation ran on, its load and its peak resident memory (a timing is
  only read with them: the CPU here changes between days, and other jobs slow a run), and the
  code that ran."""
  m = runtime.machine()
  cores, load = m["cores"], os.getloadavg()
  shared = "other jobs shared the cores" if load[2] > cores + 0.5 else "no other load to speak of"
  peak = max(
    resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
  )
  return (
    f"Machine: {m['cpu']} (family/model {m['family_model']}; {', '.join(m['isa']) or 'no AVX'}), "
    f"{cores} cores; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 "
    f"/ 15 min: {shared}); peak RSS of this invocation {peak / 2**20:.2f} GiB. {code()}"
  )


def provenance(workdir: str) -> str:
  """The model, where its weights came from and its tokenizer, from the imported run."""
  try:
    with open(os.path.join(workdir, "imported.json")) as f:
      imported = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return f"Model: `{workdir}` (not an imported run: no imported.json)."
  source = os.path.basename(imported["source"].rstrip("/"))
  name, _, quant = source.removesuffix(".gguf").rpartition(".")
  weights = (
    f"{quant} GGUF `{source}`, dequantized to float32 on import"
    if imported["format"] == "gguf"
    else f"HF folder `{source}` (its own dtype, cast to float32)"
  )
  tokenizer = os.path.basename(config["data"]["tokenizer"])
  return (
    f"Model: **{name or source}** ({weights}); tokenizer: the source's own ({tokenizer}, "
    f"vocabulary {config['model']['vocab_size']:,}); trained length L = "
    f"{config['train']['seq_len']}."
  )


def _regions_table(kind_rows: list[dict], train_len: int) -> list[str]:
  """Per method and length beyond L: ppl inside / beyond L and their ratio, and the ratio to
  the base on the same beyond-L tokens."""
  base = {r["length"]: windows(r) for r in kind_rows if r["method"] == "none"}
  table = []
  for r in kind_rows:
    regions = windows(r)
    if r["mode"] == "sliding" or r["length"] <= train_len or regions is None:
      continue
    ratio = beyond_over_inside(regions)
    to_base = None if r["method"] == "none" else versus(regions, base.get(r["length"]), 1)
    reading = "–" if to_base is None else READING[stats.compare(*to_base[1:])]
    s = r.get("s")
    table.append(
      [
        label(r) + (" (=)" if r.get("same_as") else ""),
        r["length"],
        "–" if s in (None, "") else f"{float(s):g}",
        len(regions[1]),
        _ppl_cell(region_ppl(regions, 0)),
        _ppl_cell(region_ppl(regions, 1)),
        fmt_ratio(ratio),
        fmt_ratio(to_base),
        reading,
      ]
    )
  header = ["method", "n", "s", "windows", "ppl inside L", "ppl beyond L", "beyond / inside"]
  return figure_report.markdown_table([*header, "beyond: ppl / ppl(none)", "vs none"], table)


def _inside_table(kind_rows: list[dict], train_len: int) -> list[str]:
  """Windows at or below L: ppl and the ratio to the base on the same tokens."""
  base = {(r["length"], r["mode"]): windows(r) for r in kind_rows if r["method"] == "none"}
  table = []
  for r in kind_rows:
    regions = windows(r)
    if r["length"] > train_len or regions is None or r["method"] == "none" or r.get("same_as"):
      continue
    ratio = versus(regions, base.get((r["length"], r["mode"])), 0)
    reading = "–" if ratio is None else READING[stats.compare(*ratio[1:])]
    table.append([label(r), r["length"], r["mode"], fmt_ratio(ratio), reading])
  if not table:
    return []
  header = ["method", "n", "mode", "ppl / ppl(none), same tokens", "reading"]
  return ["Windows at or below L, against the base on the same tokens:", ""] + (
    figure_report.markdown_table(header, table) + [""]
  )


def _sliding_table(kind_rows: list[dict], stride: int) -> list[str]:
  sliding = [r for r in kind_rows if r["mode"] == "sliding"]
  if not sliding:
    return []
  n = sliding[0]["length"]
  text = [
    f"Sliding windows of n tokens, stride {stride}: the first window is scored whole (its n "
    f"targets, with 0 to n − 1 tokens of context), each later window only its last {stride} "
    f"targets (n − {stride} to n − 1 tokens of context); at n = {n}, {n} of the "
    f"{sliding[0]['tokens']} scored tokens come from the first window. Intervals over blocks "
    "of positions (one stream):",
    "",
  ]
  cells = [
    [
      label(r),
      r["length"],
      r["tokens"],
      figure_report.ppl_cell(r) + (" (=)" if r.get("same_as") else ""),
    ]
    for r in sliding
  ]
  return (
    text + figure_report.markdown_table(["method", "n", "scored tokens", "ppl [95%]"], cells) + [""]
  )


def _fine_tune_table(rows: list[dict], train_len: int, factor: int) -> list[str]:
  tuned = {r["method"]: r for r in rows if is_fine_tuned(r)}
  if not tuned:
    return []
  table = []
  for method, r in tuned.items():
    ok, why = follows_recipe(r, train_len, factor)
    table.append(
      [
        label(r),
        r["ft_window"],
        r["ft_positions"],
        r["ft_warmup"],
        f"{float(r['train_loss']):.3f}",
        "yes" if ok else f"no: minimal adaptation ({why})",
        BY_LABEL[method].fine_tune.recipe,
      ]
    )
  header = ["fine-tune", "window", "positions over", "warmup", "final train loss"]
  return [
    "## Fine-tuning",
    "",
    f"A published-shape verdict needs the recipe: at least {RECIPE_MIN_STEPS} steps (the "
    "shortest run any of the papers reports: YaRN's 200-step continuation to 128k), the "
    "recipe's window (PI / YaRN: the target s·L, so the positions beyond L are trained; PoSE: "
    "positions skipped over s·L) and warmup at most 10% of the steps.",
    "",
    *figure_report.markdown_table([*header, "follows the recipe?", "the recipe"], table),
    "",
  ]


def _method_notes(preset, rows: list[dict]) -> list[str]:
  shown = dict.fromkeys(r["method"] for r in rows)
  notes = [f"- **{m.label}**: {m.note}" for m in METHODS if m.label in shown and m.note]
  return [
    "Methods: PI, NTK, YaRN and Llama-3 use s = n / L at each length n > L (the papers' "
    f"protocol; rows labelled (s={FIXED_S}) keep s fixed); Self-Extend W, G = "
    f"{preset.self_extend}; ReRoPE W = {preset.rerope_window}; fine-tunes at target s = "
    f"{preset.factor}. PoSE: {_POSE_NOTE}",
    *notes,
    "",
  ]


_POSE_NOTE = (
  "two chunks, the first chunk's length drawn from U{1..(L_c+1)//2} and the skip from "
  "U{0..s·L − L_c} as in the official code (``pe.pose_first_chunk='official'``); the official "
  "code's content skip (dropping the text between the chunks) is not implemented: the "
  "training windows are contiguous text."
)


def _curves(kind_rows: list[dict]) -> dict:
  """Whole-window ppl against length per method, with its interval over windows."""
  points: dict[str, list] = {}
  for r in kind_rows:
    regions = windows(r)
    if r["mode"] != "sliding" and regions is not None:
      points.setdefault(label(r), []).append((r["length"], *region_ppl(regions, None)))
  return {k: tuple(zip(*sorted(v), strict=True)) for k, v in points.items()}


def write_outputs(out, args, preset, rows, niah_rows, train_len, wall) -> None:
  figure_report.write_csv(os.path.join(out, "results.csv"), rows)
  flat_niah = [{"method": m} | r for m, rs in niah_rows.items() for r in rs]
  if flat_niah:
    figure_report.write_csv(os.path.join(out, "niah.csv"), flat_niah)
  texts = list(dict.fromkeys(r["text"] for r in rows))
  data = json.loads(args.data) if args.data else preset.data
  text = [
    f"# Extending a pretrained RoPE model past L={train_len} (preset `{args.preset}`)",
    "",
    provenance(args.workdir),
    "",
    f"Texts (data overrides): {', '.join(f'{k} `{json.dumps(v)}`' for k, v in data.items())}; "
    f"{preset.windows} window(s) per length. Every window beyond L is split at L: ppl inside L "
    "(its first L targets) and beyond L (the rest), with 95% bootstrap intervals over windows "
    "(the unit: one window, one document where the data gives documents; one window gives a "
    f"point). Margin of practical equivalence: ±{stats.EQUIVALENCE:.0%} "
    f"(``stats.EQUIVALENCE``). Wall time of this invocation: {wall / 60:.1f} min; the "
    f"evaluations behind this report measured {_eval_minutes(rows, niah_rows)} "
    "(compilation included; cached ones kept their own times; fine-tuning not included). "
    f"Command: `{' '.join(args.command)}`.",
    "",
    run_conditions(),
    "",
    *_method_notes(preset, rows),
  ]
  for kind in texts:
    kind_rows = [r for r in rows if r["text"] == kind]
    eval_report.plot_curves(
      os.path.join(out, f"{kind}.png"),
      _curves(kind_rows),
      ylabel="perplexity (tokens)",
      title=f"{kind}: ppl per token against window length",
      train_len=train_len,
    )
    text += [f"## {kind}", "", f"![{kind}]({kind}.png)", ""]
    text += [
      "Beyond L, per method: ppl inside and beyond L of the same windows, their ratio, and "
      "the ratio to the base model on the same beyond-L tokens ((=): the base model by "
      "construction at that length):",
      "",
      *_regions_table(kind_rows, train_len),
      "",
      *sorted(
        {f"Windows at {r['length']}: {r['units_note']}" for r in kind_rows if r.get("units_note")}
      ),
      "",
      *_inside_table(kind_rows, train_len),
      *_sliding_table(kind_rows, preset.stride),
    ]
  text += _fine_tune_table(rows, train_len, preset.factor)
  text += _niah_table(preset, niah_rows, train_len)
  first = [r for r in rows if r["text"] == texts[0]] if texts else []  # cpu-niah: NIAH only.
  figure_report.write_report(out, text, findings(first, train_len, preset.factor, niah_rows))
  print(f"wrote {out}/REPORT.md")


def _eval_minutes(rows, niah_rows: dict) -> str:
  """The measured minutes of the perplexity evaluations (each cached evaluation once) and of
  the NIAH grids, each part named only where the report has it."""
  seconds = {r["eval"]: float(r.get("seconds") or 0) for r in rows if r.get("eval")}
  niah = [float(r.get("seconds") or 0) for cells in niah_rows.values() for r in cells]
  parts = [f"{sum(seconds.values()) / 60:.1f} min of perplexity"] if rows else []
  parts += [f"{sum(niah) / 60:.1f} min of NIAH"] if niah_rows else []
  return " and ".join(parts) or "no evaluation"


def _niah_table(preset, niah_rows: dict, train_len: int) -> list[str]:
  """Retrieved / trials per cell (the control at L, the lengths beyond L at the depths beyond
  L) with exact intervals; the verdicts are among the findings."""
  if not niah_rows:
    return []
  cells = {(m, r["length"], r["depth"]): r for m, rs in niah_rows.items() for r in rs}
  columns = sorted({(n, d) for _, n, d in cells})
  first = next(iter(niah_rows.values()))
  by_length = {r["length"]: r for r in first}
  haystacks = [f"{n}: {r['haystacks']} from {r['haystack']}" for n, r in sorted(by_length.items())]
  notes = [f"Haystacks at {n}: {r['note']}" for n, r in sorted(by_length.items()) if r["note"]]
  return [
    "## Needle in a haystack",
    "",
    f"Greedy exact retrieval of a 5-digit key, {preset.niah_trials} prompts per cell, each "
    "with its own key and haystack (distinct haystacks per length: "
    f"{'; '.join(haystacks)}); n@depth, retrieved / prompts [95% Clopper–Pearson]. The "
    f"cells at n = L = {train_len} are the positive control; beyond L only the depths that "
    "put the needle more than L tokens before the question (``niah.beyond_depths``); below L "
    "the base model's horizon cells (depth 0, ``niah.horizon_verdict``). One model per method: "
    "its s at the grid's longest length, the control included.",
    "",
    *(f"{note}\n" for note in notes),
    *figure_report.markdown_table(
      ["method", *(f"{n}@{d}" for n, d in columns)],
      [[m, *(_acc(cells.get((m, n, d))) for n, d in columns)] for m in niah_rows],
    ),
    "",
  ]


def _acc(row) -> str:
  if row is None:
    return "–"
  lo, hi = row["accuracy_lo"], row["accuracy_hi"]
  return f"{row['correct']}/{row['trials']} [{lo:.2f}, {hi:.2f}]"
