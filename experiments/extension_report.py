"""The report of ``experiments/pretrained_extension.py``: verdicts on the published shapes (stated
only where bootstrap intervals separate), tables, figures and the NIAH grid."""

from __future__ import annotations

import math
import os

from experiments import report
from pe_research import eval_report, stats


def findings(ppl: dict, train_len: int, factor: int, niah_rows: dict) -> list[str]:
  """Verdicts on the published shapes, from ``ppl[label][length] = (ppl, lo, hi)``; a shape is
  confirmed or refuted only where the intervals separate, otherwise "not separated"."""
  out = []

  def interval(label, n):
    return ppl.get(label, {}).get(n, (math.nan, math.nan, math.nan))[1:]

  lengths = sorted(ppl["none"])
  inside = [n for n in lengths if n <= train_len]
  beyond = [n for n in lengths if n > train_len]
  ref = interval("none", max(inside)) if inside else (math.nan, math.nan)

  def say(claim: str, yes: bool | None) -> str:
    word = {True: "**matches**", False: "**does NOT match**", None: "**not separated**"}[yes]
    return f"- {claim} — {word}"

  def above(a, b, ratio=1.0):  # a's interval entirely above ratio × b's: True/False/None.
    if any(math.isnan(x) for x in (*a, *b)):
      return None
    if a[0] > ratio * b[1]:
      return True
    return False if a[1] < ratio * b[0] else None

  if beyond:
    n = beyond[0]
    claim = f"no extension explodes past L: ppl({n}) > 2× ppl({max(inside)})"
    out.append(say(claim, above(interval("none", n), ref, 2.0)))
  if inside and max(inside) in ppl.get("PI", {}):
    n = max(inside)
    out.append(say(f"PI zero-shot hurts inside L (at {n})", above(interval("PI", n), ref)))
  for label in ("NTK", "dynamic NTK", "YaRN", "Self-Extend", "PI (ft)", "YaRN (ft)", "PoSE (ft)"):
    held = [n for n in ppl.get(label, {}) if train_len < n <= factor * train_len]
    if not held:
      continue
    n = max(held)
    flat = above(interval(label, n), ref, 1.2)
    claim = f"{label} holds to {n} ({n / train_len:g}×L): ppl within 1.2× ppl(L) of the base"
    out.append(say(claim, None if flat is None else not flat))
  control = [r for r in niah_rows.get("none", []) if r["length"] <= train_len]
  if control:
    ok = min(r["accuracy"] for r in control) >= 0.5
    out.append(
      f"- Positive control (base model, needle inside L): min accuracy "
      f"{min(r['accuracy'] for r in control):.2f} — "
      + ("the grid is evidence" if ok else "**the base model fails inside L: grid not evidence**")
    )
  return out


def _curves(table: dict) -> dict:
  return {
    label: tuple(zip(*[(n, *v) for n, v in sorted(rows.items())], strict=True))
    for label, rows in table.items()
  }


def write_outputs(out, args, preset, table, rows, niah_rows, losses, train_len, wall) -> None:
  report.write_csv(os.path.join(out, "results.csv"), rows)
  flat_niah = [{"method": m} | r for m, rs in niah_rows.items() for r in rs]
  if flat_niah:
    report.write_csv(os.path.join(out, "niah.csv"), flat_niah)
  text = [
    f"# Extending a pretrained RoPE model past L={train_len} (preset `{args.preset}`)",
    "",
    f"Model: `{args.workdir}`. Zero-shot factor s = {preset.factor}; Self-Extend W, G = "
    f"{preset.self_extend}; ReRoPE W = {preset.rerope_window}. Perplexity per token with a 95% "
    "bootstrap interval (over windows, or over 16 blocks of positions when a length has fewer "
    f"than 16 windows), {preset.windows} window(s) per length up to L and one beyond. "
    f"Wall time of this invocation: {wall / 60:.1f} min. Command: `{' '.join(args.command)}`.",
    "",
  ]
  for kind, by_label in table.items():
    eval_report.plot_curves(
      os.path.join(out, f"{kind}.png"),
      _curves(by_label),
      ylabel="perplexity (tokens)",
      title=f"{args.workdir}: {kind}",
      train_len=train_len,
    )
    lengths = sorted({n for v in by_label.values() for n in v})
    text += [f"## {kind}", "", f"![{kind}]({kind}.png)", ""]
    text += report.markdown_table(
      ["method", *lengths],
      [[label, *(_cell(v.get(n)) for n in lengths)] for label, v in by_label.items()],
    )
    for n in lengths:
      intervals = {label: v[n][1:] for label, v in by_label.items() if n in v}
      text += ["", f"At {n}: " + "; ".join(stats.rank(intervals))]
    text.append("")
  if losses:
    text += [
      "Final training loss of each fine-tune: "
      + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()),
      "",
    ]
  if niah_rows:
    text += [
      "## Needle in a haystack (greedy exact retrieval; accuracy [95% bootstrap interval over "
      f"{preset.niah_trials} prompt(s) per cell: with one prompt the interval is the point])",
      "",
    ]
    cells = {(m, r["length"], r["depth"]): r for m, rs in niah_rows.items() for r in rs}
    header = [f"{n}@{d}" for n in preset.niah_lengths for d in preset.niah_depths]
    text += report.markdown_table(
      ["method", *header],
      [
        [m, *(_acc(cells.get((m, n, d))) for n in preset.niah_lengths for d in preset.niah_depths)]
        for m in niah_rows
      ],
    )
  first = next(iter(table))
  report.write_report(out, text, findings(table[first], train_len, preset.factor, niah_rows))
  print(f"wrote {out}/REPORT.md")


def _cell(value) -> str:
  if value is None:
    return "–"
  ppl, lo, hi = value
  return f"{ppl:.2f} [{lo:.2f}, {hi:.2f}]" if math.isfinite(ppl) else "inf"


def _acc(row) -> str:
  if row is None:
    return "–"
  return f"{row['accuracy']:.2f} [{row['accuracy_lo']:.2f}, {row['accuracy_hi']:.2f}]"
