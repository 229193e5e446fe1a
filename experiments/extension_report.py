"""The report of ``experiments/pretrained_extension.py``: verdicts on the published shapes (stated
only where bootstrap intervals separate), tables, figures and the NIAH grid."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from experiments import figure_report
from pe_research import eval_report, stats

# What the papers measured (docs: ../shared/reference/results_to_reproduce.md), one line per
# shape the findings test.
PUBLISHED = {
  "explodes": "PI (LLaMA-7B, L = 2048, PG19): ppl 7.20 at 2048, > 1e3 at 4096 and beyond",
  "PI inside": "PI at step 0 (no fine-tuning), s = 4: ppl 16.10 at 8192 against 7.20 at 2048",
  "holds": "YaRN / NTK zero-shot: usable to ~2× L (YaRN s = 2 without fine-tuning); dynamic "
  "scaling beats static zero-shot",
  "Self-Extend": "Self-Extend (Llama-2-7B-chat, L = 4k): PG19 ppl flat to 16k (4× L) without "
  "training; passkey 100% over the extended window",
  "fine-tuned": "fine-tuned PI / YaRN (1000 / 400 steps) and PoSE (short windows, skipped "
  "positions): ppl flat to s·L (PI 32k: 7.23 at 2k → 6.77 at 32k)",
}


def per_position(path: str) -> tuple[np.ndarray, np.ndarray] | None:
  """``(nll_L, tokens_L)`` summed over an evaluation's windows at each position, or None."""
  try:
    with open(path + "_per_position.json") as f:
      rows = json.load(f)["rows"]
  except (OSError, KeyError, ValueError):
    return None
  tokens = np.array([r["tokens"] for r in rows], np.float64)
  return np.array([r["loss"] for r in rows], np.float64) * tokens, tokens


def paired_ratio(a, b) -> tuple[float, float, float] | None:
  """``ppl_a / ppl_b`` on the same scored tokens with a 95% paired bootstrap interval: the
  units are ``stats.MIN_UNITS`` blocks of positions carrying ``Σ (nll_a − nll_b)`` and their
  token counts, so the text's own difficulty cancels. ``a``, ``b``: :func:`per_position`."""
  if a is None or b is None or a[1].shape != b[1].shape or not np.array_equal(a[1], b[1]):
    return None
  num_U, den_U = stats.position_blocks(a[0] - b[0], a[1])
  lo, hi = stats.ratio_interval(num_U, den_U)
  mean = float(num_U.sum() / den_U.sum())
  return math.exp(mean), math.exp(lo), math.exp(hi)


def paired_to_base(rows: list[dict], text: str) -> dict[tuple[str, int, str], tuple]:
  """``(method, length, mode) -> paired_ratio(method, none)`` for one text kind's rows (the
  rows' ``eval`` paths), skipping rows that are the base model by construction."""
  base = {
    (r["length"], r["mode"]): r["eval"]
    for r in rows
    if r["text"] == text and r["method"] == "none" and r.get("eval")
  }
  out = {}
  for r in rows:
    key = (r["length"], r["mode"])
    if r["text"] != text or r["method"] == "none" or r.get("same_as") or key not in base:
      continue
    ratio = paired_ratio(per_position(r["eval"]), per_position(base[key]))
    if ratio is not None:
      out[(r["method"], *key)] = ratio
  return out


def _side(ratio) -> bool | None:
  """True where the interval is above 1 (worse than the base), False below, None if it spans."""
  return True if ratio[1] > 1 else False if ratio[2] < 1 else None


def findings(
  ppl: dict, train_len: int, factor: int, niah_rows: dict, paired: dict | None = None
) -> list[str]:
  """Verdicts on the published shapes, from ``ppl[label][length] = (ppl, lo, hi)`` and the
  ratios to the base on the same tokens, ``paired[(label, length, mode)] = (r, lo, hi)``; a
  shape is confirmed or refuted only where the intervals separate, otherwise "not separated".
  Each line ends with what the paper measured."""
  paired = paired or {}
  out = []

  def interval(label, n):
    return ppl.get(label, {}).get(n, (math.nan, math.nan, math.nan))[1:]

  lengths = sorted(ppl["none"])
  inside = [n for n in lengths if n <= train_len]
  beyond = [n for n in lengths if n > train_len]
  ref = interval("none", max(inside)) if inside else (math.nan, math.nan)

  def say(claim: str, yes: bool | None, published: str = "") -> str:
    word = {True: "**matches**", False: "**does NOT match**", None: "**not separated**"}[yes]
    return f"- {claim} — {word}" + (f" (published: {PUBLISHED[published]})" if published else "")

  def above(a, b, ratio=1.0):  # a's interval entirely above ratio × b's: True/False/None.
    if any(math.isnan(x) for x in (*a, *b)):
      return None
    if a[0] > ratio * b[1]:
      return True
    return False if a[1] < ratio * b[0] else None

  if beyond:
    n = beyond[0]
    claim = f"no extension explodes past L: ppl({n}) > 2× ppl({max(inside)})"
    out.append(say(claim, above(interval("none", n), ref, 2.0), "explodes"))
  if inside and max(inside) in ppl.get("PI", {}):
    n = max(inside)
    hurts = above(interval("PI", n), ref)
    out.append(say(f"PI zero-shot hurts inside L (at {n})", hurts, "PI inside"))
  elif pi := sorted((n, m, v) for (k, n, m), v in paired.items() if k == "PI" and n <= train_len):
    n, mode, ratio = pi[-1]
    claim = (
      f"PI zero-shot hurts inside L ({mode} {n}: ppl ratio to the base on the same tokens "
      f"{ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}])"
    )
    out.append(say(claim, _side(ratio), "PI inside"))
  for label in ("NTK", "dynamic NTK", "YaRN", "Self-Extend", "PI (ft)", "YaRN (ft)", "PoSE (ft)"):
    held = [n for n in ppl.get(label, {}) if train_len < n <= factor * train_len]
    if not held:
      continue
    n = max(held)
    flat = above(interval(label, n), ref, 1.2)
    claim = f"{label} holds to {n} ({n / train_len:g}×L): ppl within 1.2× ppl(L) of the base"
    source = "holds" if label not in ("Self-Extend",) else label
    source = "fine-tuned" if "(ft)" in label else source
    out.append(say(claim, None if flat is None else not flat, source))
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
  figure_report.write_csv(os.path.join(out, "results.csv"), rows)
  flat_niah = [{"method": m} | r for m, rs in niah_rows.items() for r in rs]
  if flat_niah:
    figure_report.write_csv(os.path.join(out, "niah.csv"), flat_niah)
  text = [
    f"# Extending a pretrained RoPE model past L={train_len} (preset `{args.preset}`)",
    "",
    f"Model: `{args.workdir}`. Zero-shot factor s = {preset.factor}; Self-Extend W, G = "
    f"{preset.self_extend}; ReRoPE W = {preset.rerope_window}. Perplexity per token with a 95% "
    "bootstrap interval (over windows, or over 16 blocks of positions when a length has fewer "
    f"than 16 windows), {preset.windows} window(s) per length up to L and one beyond. "
    f"Wall time of this invocation: {wall / 60:.1f} min; the perplexity evaluations behind "
    f"this report measured {_eval_minutes(rows):.1f} min in all (compilation included; cached "
    f"ones kept their own times; NIAH and fine-tuning not included). "
    f"Command: `{' '.join(args.command)}`.",
    "",
  ]
  copied = {(r["text"], r["method"], r["length"], r["mode"]) for r in rows if r.get("same_as")}
  paired = {kind: paired_to_base(rows, kind) for kind in table}
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
    text += figure_report.markdown_table(
      ["method", *lengths],
      [
        [label, *(_cell(v.get(n), (kind, label, n, "nonoverlapping") in copied) for n in lengths)]
        for label, v in by_label.items()
      ],
    )
    text += ["", "(=) the base model by construction at that length (same numbers).", ""]
    sliding = [r for r in rows if r["text"] == kind and r["mode"] == "sliding"]
    if sliding:
      text += [f"Sliding windows, stride {preset.stride} (ppl of each window's last stride):", ""]
      text += figure_report.markdown_table(
        ["method", "length", "scored tokens", "ppl [95%]"],
        [
          [
            r["method"],
            r["length"],
            r["tokens"],
            _cell((r["ppl"], r["ppl_lo"], r["ppl_hi"]), bool(r.get("same_as"))),
          ]
          for r in sliding
        ],
      )
      text.append("")
    if paired[kind]:
      text += [
        "Ratio to the base model's perplexity on the same tokens, with a 95% paired bootstrap "
        "interval over 16 blocks of positions (below 1: better than no extension):",
        "",
      ]
      text += figure_report.markdown_table(
        ["method", "length", "mode", "ppl / ppl(none)", "verdict"],
        [
          [m, n, mode, f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]", _verdict(r)]
          for (m, n, mode), r in sorted(paired[kind].items(), key=lambda x: (x[0][1], x[1][0]))
        ],
      )
      text.append("")
    for n in lengths:
      intervals = {
        label: v[n][1:]
        for label, v in by_label.items()
        if n in v and (kind, label, n, "nonoverlapping") not in copied
      }
      text += [f"At {n} (unpaired intervals): " + "; ".join(stats.rank(intervals))]
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
    text += figure_report.markdown_table(
      ["method", *header],
      [
        [m, *(_acc(cells.get((m, n, d))) for n in preset.niah_lengths for d in preset.niah_depths)]
        for m in niah_rows
      ],
    )
  first = next(iter(table))
  verdicts = findings(table[first], train_len, preset.factor, niah_rows, paired[first])
  figure_report.write_report(out, text, verdicts)
  print(f"wrote {out}/REPORT.md")


def _cell(value, copied: bool = False) -> str:
  if value is None:
    return "–"
  ppl, lo, hi = value
  text = f"{ppl:.2f} [{lo:.2f}, {hi:.2f}]" if math.isfinite(ppl) else "inf"
  return text + (" (=)" if copied else "")


def _eval_minutes(rows) -> float:
  seconds = {r["eval"]: float(r.get("seconds") or 0) for r in rows if r.get("eval")}
  return sum(seconds.values()) / 60


def _verdict(ratio) -> str:
  return {True: "worse than none", False: "better than none", None: "tied with none"}[_side(ratio)]


def _acc(row) -> str:
  if row is None:
    return "–"
  return f"{row['accuracy']:.2f} [{row['accuracy_lo']:.2f}, {row['accuracy_hi']:.2f}]"
