"""The verdicts of ``experiments/pretrained_extension.py``'s report: every long window split at
L into the region inside L and the region beyond it, each verdict paired on the same windows or
tokens with 95% intervals over windows (documents):

  explodes      the base's ppl beyond L / its own ppl inside L, same windows: above EXPLODES
  holds         a method's ppl beyond L / its own ppl inside L, same windows: below 1 + margin
  X beats Y     ppl_X / ppl_Y on the same beyond-L tokens (``stats.compare``, with the margin
                of practical equivalence ``stats.EQUIVALENCE``)

A verdict is stated only where the interval decides it (``figure_report.exceeds``); one window
gives a point and no verdict. Fine-tunes earn a published-shape verdict only when they follow
the recipe (``extension_methods.RECIPE_MIN_STEPS`` steps or more, the recipe's window, warmup
at most 10% of the steps); otherwise their rows are "minimal adaptation" and shown without one.
The needle grid's lines are ``pe_research.niah.verdicts`` (each method's control at L, its
beyond-L cells, and the comparison with the base on the same prompts, exact intervals) and
``niah.horizon_verdict`` (the base's retrieval horizon below L).
"""

from __future__ import annotations

import json
import math

import numpy as np

from experiments import figure_report
from experiments.extension_methods import BY_LABEL, RECIPE_MIN_STEPS
from pe_research import niah, stats

EXPLODES = 2.0  # "Explodes past L": ppl beyond L more than twice ppl inside L, same windows.
READING = {
  "higher": "worse",
  "lower": "better",
  "equivalent": f"equivalent (±{stats.EQUIVALENCE:.0%})",
  "not separated": "not separated",
}


def windows(row: dict) -> tuple[np.ndarray, np.ndarray] | None:
  """``(nll_WxR, weight_WxR)`` of an evaluation row (regions inside / beyond L), or None."""
  try:
    with open(row["eval"] + "_windows.json") as f:
      lengths = json.load(f)["lengths"]
    per_window = lengths[str(row["length"])]
  except (OSError, KeyError, ValueError, TypeError):
    return None
  return np.array(per_window["nll_WxR"]), np.array(per_window["weight_WxR"])


def interval_row(value: tuple[float, float, float]) -> dict:
  """A (ppl or ratio, lo, hi) triple as the row ``figure_report``'s helpers read."""
  return dict(zip(("ppl", "ppl_lo", "ppl_hi"), value, strict=True))


def region_ppl(regions, r: int | None) -> tuple[float, float, float]:
  """ppl of region ``r`` (0 inside, 1 beyond, None both) with its interval over windows."""
  nll_WxR, weight_WxR = regions
  nll_W, weight_W = (x.sum(1) if r is None else x[:, r] for x in (nll_WxR, weight_WxR))
  if not weight_W.sum():
    return math.nan, math.nan, math.nan
  lo, hi = stats.ppl_interval(nll_W, weight_W)
  return math.exp(nll_W.sum() / weight_W.sum()), lo, hi


def beyond_over_inside(regions) -> tuple[float, float, float]:
  """ppl beyond L / ppl inside L on the same windows (bootstrap over windows)."""
  nll_WxR, weight_WxR = regions
  return stats.paired_ratio(nll_WxR[:, 1], weight_WxR[:, 1], nll_WxR[:, 0], weight_WxR[:, 0])


def versus(a, b, r: int) -> tuple[float, float, float] | None:
  """ppl_a / ppl_b in region ``r`` on the same tokens (None unless a and b scored the same
  windows' tokens), bootstrap over windows."""
  if a is None or b is None or not np.array_equal(a[1], b[1]) or not a[1][:, r].sum():
    return None
  return stats.paired_ratio(a[0][:, r], a[1][:, r], b[0][:, r], b[1][:, r])


def fmt_ratio(value) -> str:
  return "–" if value is None else f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"


def is_fine_tuned(row: dict) -> bool:
  return row.get("fine_tuned") in (True, "True")


def label(row: dict) -> str:
  """The row's method as shown: fine-tunes with their steps and tokens."""
  if not is_fine_tuned(row):
    return row["method"]
  return f"{row['method'][:-5]} (ft: {row['ft_steps']} steps × {int(row['ft_tokens']):,} tokens)"


def follows_recipe(row: dict, train_len: int, factor: int) -> tuple[bool, str]:
  """Whether a fine-tune row follows its paper's recipe, and why not."""
  method = BY_LABEL[row["method"]]
  window, steps = int(row["ft_window"]), int(row["ft_steps"])
  target = factor * train_len
  problems = []
  if steps < RECIPE_MIN_STEPS:
    problems.append(f"{steps} steps < {RECIPE_MIN_STEPS}")
  if method.fine_tune.pose and int(row["ft_positions"]) < target:
    problems.append(f"positions over {row['ft_positions']} < s·L = {target}")
  if not method.fine_tune.pose and window < target:
    problems.append(f"window {window} < s·L = {target}: positions >= {window} untrained")
  if int(row["ft_warmup"]) > steps // 10:
    problems.append(f"warmup {row['ft_warmup']} > 10% of the steps")
  return not problems, "; ".join(problems)


def findings(rows: list[dict], train_len: int, factor: int, niah_rows: dict) -> list[str]:
  """Verdicts on the published shapes from one text kind's non-overlapping rows, each paired
  on the same windows or tokens (module docstring); ends with what the paper measured."""
  at = {(r["method"], r["length"]): r for r in rows if r["mode"] != "sliding"}
  regions = {key: windows(r) for key, r in at.items()}
  out = []

  def check(claim: str, ok: bool | None, measured: str, method: str) -> None:
    line = figure_report.checked(claim, ok, measured)
    published = BY_LABEL[method].published
    out.append(line + (f" (published: {published})" if published else ""))

  def minimal(claim: str, ratio, *tuned: dict) -> bool:
    """Writes the no-verdict line when a fine-tune among ``tuned`` is not the recipe."""
    recipes = {r["method"]: follows_recipe(r, train_len, factor) for r in tuned if is_fine_tuned(r)}
    why = "; ".join(f"{m}: {w}" for m, (followed, w) in recipes.items() if not followed)
    if why:
      out.append(f"- {claim}: {fmt_ratio(ratio)} — no verdict: minimal adaptation ({why})")
    return bool(why)

  present = dict.fromkeys(m for m, _ in at)
  for method in (BY_LABEL[m] for m in present):
    lengths = sorted(n for m, n in at if m == method.label and regions[(m, n)] is not None)
    if method.claim == "explodes" and (beyond := [n for n in lengths if n > train_len]):
      n = beyond[-1]
      ratio = beyond_over_inside(regions[(method.label, n)])
      exploded = figure_report.exceeds(interval_row(ratio), {"ppl": EXPLODES})
      claim = f"no extension explodes past L: at {n}, ppl beyond L > {EXPLODES:g}× ppl inside L"
      check(claim, exploded, f"ratio {fmt_ratio(ratio)} on the same windows", method.label)
    inside = [n for n in lengths if n <= train_len and regions.get(("none", n)) is not None]
    if method.claim == "hurts inside L" and inside:
      n = inside[-1]
      ratio = versus(regions[(method.label, n)], regions[("none", n)], 0)
      if ratio is not None:
        word = stats.compare(*ratio[1:])
        ok = {"higher": True, "lower": False, "equivalent": False}.get(word)
        claim = f"{method.label} zero-shot hurts inside L (at {n}, ppl / ppl(none), same tokens)"
        check(claim, ok, f"{fmt_ratio(ratio)}: {READING[word]}", method.label)
    held = [n for n in lengths if train_len < n <= factor * train_len]
    if method.claim == "holds" and held:
      n, row = held[-1], at[(method.label, held[-1])]
      ratio = beyond_over_inside(regions[(method.label, n)])
      claim = (
        f"{label(row)} holds to {n} ({n / train_len:g}×L): ppl beyond L ≤ "
        f"{1 + stats.EQUIVALENCE:g}× its own ppl inside L"
      )
      if not minimal(claim, ratio, row):
        rises = figure_report.exceeds(interval_row(ratio), {"ppl": 1 + stats.EQUIVALENCE})
        ok = None if rises is None else not rises
        check(claim, ok, f"ratio {fmt_ratio(ratio)}", method.label)
    if method.rival is None:
      continue
    rival, confirming, sentence = method.rival
    common = [n for n in lengths if n > train_len and regions.get((rival, n)) is not None]
    ratio = (
      versus(regions[(method.label, common[-1])], regions[(rival, common[-1])], 1)
      if common
      else None
    )
    if ratio is None:
      continue
    n, word = common[-1], stats.compare(*ratio[1:])
    rows_n = (at[(method.label, n)], at[(rival, n)])
    claim = f"{sentence} ({label(rows_n[0])} vs {label(rows_n[1])} beyond L at {n}, same tokens)"
    if not minimal(claim, ratio, *rows_n):
      ok = None if word == "not separated" else word in confirming
      check(claim, ok, f"{fmt_ratio(ratio)}: {READING[word]}", method.label)
  base = ("none", niah_rows["none"]) if "none" in niah_rows else None
  for method, cells in niah_rows.items():  # Control at L, beyond-L cells, exact intervals.
    versus_base = None if method == "none" else base
    lines = niah.verdicts(cells, train_len, method, versus_base)
    lines += niah.horizon_verdict(cells, train_len, method)
    out += [f"- NIAH: {line}" for line in lines]
  return out
