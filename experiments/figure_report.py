"""What every figure script writes: ``OUT/results.csv``, markdown tables with 95% intervals and
``OUT/REPORT.md`` with a verdict per published claim (ties called ties). Its flags and output
folder come from ``figure_cli.py``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from typing import Any


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """One line per row; the columns are the union of the rows' keys in first-seen order."""
  columns = list(dict.fromkeys(key for row in rows for key in row))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def fmt(value: Any) -> str:
  """Numbers to 2 decimals (4 significant digits when small), None as a dash."""
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3g}"
  return str(value)


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
  """Lines of a markdown table."""
  lines = ["| " + " | ".join(str(h) for h in header) + " |", "|---" * len(header) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return lines


def ppl_curves(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict:
  """``{label: (lengths, ppls[, lo, hi])}`` from evaluation rows, for
  ``eval_report.plot_curves`` (the 95% interval as a band when the rows carry one)."""
  curves = {}
  for label, rows in results.items():
    curve = ([r["length"] for r in rows], [r["ppl"] for r in rows])
    if all("ppl_lo" in r for r in rows):
      curve += ([r["ppl_lo"] for r in rows], [r["ppl_hi"] for r in rows])
    curves[label] = curve
  return curves


def ppl_cell(row: Mapping[str, Any]) -> str:
  """``ppl [lo, hi]`` when the row carries its 95% interval, else ``ppl``."""
  if "ppl_lo" not in row:
    return fmt(row["ppl"])
  return f"{fmt(row['ppl'])} [{fmt(row['ppl_lo'])}, {fmt(row['ppl_hi'])}]"


def ppl_table(first: str, results: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
  """A markdown table of perplexity [95% interval]: one row per label, one column per length."""
  lengths = [r["length"] for r in next(iter(results.values()))]
  return markdown_table(
    [first, *lengths], [[k, *(ppl_cell(r) for r in rows)] for k, rows in results.items()]
  )


def interval(row: Mapping[str, Any]) -> tuple[float, float]:
  """The row's 95% ppl interval (a point when it has none)."""
  return row.get("ppl_lo", row["ppl"]), row.get("ppl_hi", row["ppl"])


def above(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """Row ``a``'s ppl interval lies wholly above row ``b``'s."""
  return interval(a)[0] > interval(b)[1]


def exceeds(a: Mapping[str, Any], b: Mapping[str, Any], factor: float = 1.0) -> bool | None:
  """Is ppl(a) > factor·ppl(b)? True when a's 95% interval lies above factor × b's, False when it
  lies below, None when they overlap (rows without an interval compare as points)."""
  (a_lo, a_hi), (b_lo, b_hi) = interval(a), interval(b)
  return True if a_lo > factor * b_hi else (False if a_hi < factor * b_lo else None)


def stays_flat(rows: list[dict], tolerance: float) -> bool | None:
  """No length above ``tolerance``·ppl(L): True when every later interval lies below it, False
  when one lies above, None otherwise."""
  rises = [exceeds(r, rows[0], tolerance) for r in rows[1:]]
  return False if True in rises else (True if all(r is False for r in rises) else None)


NO_VERDICT = "**not separated**: the 95% intervals overlap, no verdict"


def checked(claim: str, ok: bool | None, measured: str) -> str:
  """A bullet: ``ok`` True (matches), False (does NOT match) or None (intervals overlap)."""
  return f"- {claim}: {measured} — {NO_VERDICT if ok is None else verdict(ok)}."


def write_report(out: str, lines: Sequence[str], checks: Sequence[str]) -> None:
  """``OUT/REPORT.md``: ``lines``, then the section of shape ``checks`` (one bullet each)."""
  section = ["", "## Does the published shape appear?", "", *checks]
  with open(os.path.join(out, "REPORT.md"), "w") as f:
    f.write("\n".join([*lines, *section]) + "\n")


def verdict(ok: bool, yes: str = "matches the paper", no: str = "does NOT match the paper") -> str:
  return f"**{yes}**" if ok else f"**{no}**"
