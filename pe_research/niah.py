"""Needle in a haystack beyond the training length L, with a positive control at L.

A cell ``(n, depth)`` holds ``trials`` passkey prompts of ``n`` input tokens
(``passkey.make_example``). Trial ``t`` has its own 5-digit key and its own haystack: the
``t``-th window of ``data.long_windows`` (one document or stated series each) when a corpus is
given, else the repeated filler. With fewer long units than trials the haystacks repeat
(``haystacks`` in a row counts the distinct ones). A key whose digits occur in its haystack's
text is redrawn. Keys and haystacks depend on ``(seed, n, t)`` only, so every depth of a length
and every method see the same prompts up to the needle's place.

``gap`` = question start − needle end, the tokens between the needle and the question. A cell
is *beyond L* when every prompt's gap is at least L: every answer position is then more than L
positions after every needle token, a distance the model never trained on.
:func:`beyond_depths` picks those depths of a grid (depth ≤ (F − L) / F for a filler budget of F
tokens): at n = 12,288 and L = 8,192 a needle at depth 0.5 is ~6k tokens before the question,
inside L, and is not among them. The positive control is the same construction at n = L.

Each cell's accuracy comes with its exact 95% Clopper–Pearson interval (``stats``). The report
lines (:func:`verdicts`) pool the control cells, and the beyond-L cells of each length:

  control passes       its pooled CP lower bound >= 0.5 (``passkey.CONTROL_MIN_ACCURACY``)
  retrieves beyond L   control passes and the pooled beyond-L CP lower bound >= 0.5
  fails beyond L       control passes and the pooled beyond-L CP upper bound < 0.5
  inconclusive         otherwise (the interval straddles 0.5)
  vs a base model      control passes and the two CP intervals separate (same prompts)

"evidence" is written only where the control passed and the intervals separate.

A control that fails at L asks how far back the model does retrieve. The *horizon* cells
(``grid``'s ``horizon``: lengths below L, depth 0, the control's construction and keys) put the
needle ``gap`` tokens before the question for a ladder of gaps; :func:`horizon_verdict` reads
them with the depth-0 control cell (each cell: passes, fails or straddles 0.5 as above):

  located       some cell passes, some fails, and every passing gap is shorter than every
                failing one: the horizon lies between the longest passing and the shortest
                failing gap (evidence; a straddling cell between them is named)
  beyond        every cell passes: the horizon is at least the longest gap tried
  below         every cell fails: the horizon is shorter than the shortest gap tried
  not located   a failing gap shorter than a passing one, or no cell that passes or fails
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pe_research import passkey, stats
from pe_research.data.long_windows import long_windows
from pe_research.data.tokenizer import Tokenizer

DEPTHS = tuple(round(0.1 * i, 1) for i in range(11))
THRESHOLD = passkey.CONTROL_MIN_ACCURACY


def gap(length: int, depth: float, key: int, encode, header: str = passkey.HEADER) -> int:
  """Tokens between the needle's end and the question in the prompt ``(length, depth, key)``."""
  budget = length - passkey.min_length(encode, key, header)
  return budget - round(depth * budget)


def beyond_depths(
  length: int,
  train_len: int,
  encode,
  depths: Sequence[float] = DEPTHS,
  keys: Sequence[int] = (10_000, 99_999),
  header: str = passkey.HEADER,
) -> tuple[float, ...]:
  """The depths of ``depths`` at which the needle sits at least ``train_len`` tokens before the
  question for each of ``keys`` (the rows also record the gap each prompt had)."""
  return tuple(
    d for d in depths if all(gap(length, d, k, encode, header) >= train_len for k in keys)
  )


def cell_examples(
  length: int,
  depth: float,
  tokenizer: Tokenizer,
  *,
  trials: int,
  haystacks: Sequence[np.ndarray] = (),
  seed: int = 0,
  header: str = passkey.HEADER,
) -> list[passkey.PasskeyExample]:
  """The ``trials`` prompts of one cell: trial ``t`` on haystack ``t mod len(haystacks)`` (the
  filler when there is none) with its own key, never one whose digits are in the haystack."""
  rng = np.random.default_rng([seed, length])
  examples = []
  for t in range(trials):
    haystack = haystacks[t % len(haystacks)] if haystacks else None
    key = int(rng.integers(10_000, 100_000))
    if haystack is not None:
      text = tokenizer.decode(haystack)  # All of it: the prompt uses a prefix.
      while str(key) in text:
        key = int(rng.integers(10_000, 100_000))
    examples.append(
      passkey.make_example(length, depth, key, tokenizer.encode, header, haystack=haystack)
    )
  return examples


def grid(
  evaluator,
  tokenizer: Tokenizer,
  lengths: Sequence[int],
  train_len: int,
  *,
  trials: int = 10,
  depths: Sequence[float] = DEPTHS,
  data_cfg=None,
  split: str = "validation",
  batch_size: int = 1,
  seed: int = 0,
  horizon: Sequence[int] = (),
) -> list[dict]:
  """Rows of the control (``n = train_len``, every depth), of each ``n`` of ``horizon`` (below
  L, depth 0: ``horizon`` True) and of each ``n`` of ``lengths`` at its :func:`beyond_depths`,
  all prompts with ``passkey.control_header`` (no control when no prompt fits in ``train_len``);
  haystacks from ``data_cfg``'s corpus when given (the filler at a length where it has no long
  unit; ``note`` says so). ``evaluator`` is an ``eval_lib.Evaluator`` (``score_all`` gives
  ``correct`` of ``examples``)."""
  rows = []
  fits = passkey.control_header(tokenizer.encode, train_len)
  header = passkey.HEADER if fits is None else fits  # Every cell: the same kind of prompt.
  shortest = passkey.min_length(tokenizer.encode, header=header)
  if bad := [n for n in horizon if not shortest <= n < train_len]:
    raise ValueError(
      f"niah horizon: {bad} not in [{shortest}, {train_len}): the horizon's lengths lie below "
      f"L = {train_len} and hold a prompt ({shortest} tokens)"
    )
  ladder = sorted(set(horizon)) if fits is not None else []  # No control: nothing to locate.
  rest = [n for n in lengths if n != train_len and n not in ladder]
  for i, n in enumerate(ladder + ([] if fits is None else [train_len]) + rest):
    control, below = n == train_len, i < len(ladder)
    if below:
      cell_depths = (0.0,)
    elif control:
      cell_depths = depths
    else:
      cell_depths = beyond_depths(n, train_len, tokenizer.encode, depths, header=header)
    found = long_windows(data_cfg, tokenizer, n, trials, split) if data_cfg else None
    haystacks = [w.tokens for w in found.windows] if found else []
    for depth in cell_depths:
      examples = cell_examples(
        n, depth, tokenizer, trials=trials, haystacks=haystacks, seed=seed, header=header
      )
      batches = passkey.stack_rows([e.as_batch_row() for e in examples], batch_size)
      totals = evaluator.score_all(batches, batch_size=batch_size, desc=f"niah {n}@{depth}")
      lo, hi = stats.clopper_pearson(totals.correct, totals.examples)
      gap_min = min(e.gap for e in examples)
      rows.append(
        {
          "length": n,
          "depth": depth,
          "control": control,
          "horizon": below,
          "trials": totals.examples,
          "correct": totals.correct,
          "accuracy": totals.correct / totals.examples,
          "accuracy_lo": lo,
          "accuracy_hi": hi,
          "gap_min": gap_min,
          "beyond": gap_min >= train_len,
          "haystack": f"{data_cfg.name} {split}" if haystacks else "filler",
          "haystacks": len(haystacks) or 1,  # Distinct: one unit per window.
          "note": found.note if found else "",
          "seconds": totals.seconds + totals.compile_seconds,  # scoring, compilation included
        }
      )
  return rows


def _pooled(rows: Sequence[dict]) -> tuple[int, int, float, float]:
  """(correct, trials, CP lo, CP hi) over ``rows``."""
  correct, trials = sum(r["correct"] for r in rows), sum(r["trials"] for r in rows)
  return correct, trials, *stats.clopper_pearson(correct, trials)


def _reading(lo: float, hi: float) -> str:
  """A cell's (or pool's) CP interval against THRESHOLD: "passes", "fails" or "straddles"."""
  return "passes" if lo >= THRESHOLD else "fails" if hi < THRESHOLD else "straddles"


def _beyond_by_length(rows: Sequence[dict]) -> dict[int, list[dict]]:
  cells: dict[int, list[dict]] = {}
  for r in rows:
    if not r["control"] and r["beyond"]:
      cells.setdefault(r["length"], []).append(r)
  return dict(sorted(cells.items()))


def verdicts(
  rows: Sequence[dict], train_len: int, label: str, base: tuple[str, Sequence[dict]] | None = None
) -> list[str]:
  """The report lines of one method's :func:`grid` rows (see the module docstring); ``base`` =
  (label, rows) of the model to compare with on the same prompts."""
  control = [r for r in rows if r["control"]]
  if not control:
    return [f"{label}: no positive control at L={train_len}: the needle grid is not evidence"]
  k, m, lo, hi = _pooled(control)
  passed = _reading(lo, hi) == "passes"
  lines = [
    f"{label}: positive control at L={train_len} {'passed' if passed else 'FAILED'}: {k}/{m} "
    f"retrieved, 95% CP [{lo:.2f}, {hi:.2f}] (passes when the lower bound >= {THRESHOLD})"
  ]
  base_cells = _beyond_by_length(base[1]) if base else {}
  for n, cells in _beyond_by_length(rows).items():
    k, m, lo, hi = _pooled(cells)
    gap = min(r["gap_min"] for r in cells)
    line = f"{label} at {n} (needle >= {gap} tokens before the question): {k}/{m}, "
    line += f"CP [{lo:.2f}, {hi:.2f}]"
    reading = _reading(lo, hi)
    if not passed:
      line += ": not evidence, the control failed"
    elif reading == "passes":
      line += f": retrieves beyond L (evidence: the interval lies above {THRESHOLD})"
    elif reading == "fails":
      line += f": fails beyond L (evidence: the interval lies below {THRESHOLD})"
    else:
      line += f": inconclusive (the interval straddles {THRESHOLD})"
    lines.append(line)
    if passed and n in base_cells:
      b_k, b_m, b_lo, b_hi = _pooled(base_cells[n])
      if not stats.separated((lo, hi), (b_lo, b_hi)):
        word = f"not separated from {base[0]}"
      else:
        word = f"{'above' if lo > b_hi else 'below'} {base[0]} (evidence: the intervals separate)"
      lines.append(
        f"{label} vs {base[0]} beyond L at {n}: {k}/{m} vs {b_k}/{b_m}, "
        f"CP [{lo:.2f}, {hi:.2f}] vs [{b_lo:.2f}, {b_hi:.2f}]: {word}"
      )
  return lines


def horizon_verdict(rows: Sequence[dict], train_len: int, label: str) -> list[str]:
  """The line locating ``label``'s retrieval horizon from its :func:`grid` rows: the
  ``horizon`` cells and the depth-0 control (module docstring); none without horizon cells."""
  if not any(r.get("horizon") for r in rows):
    return []
  ladder = [r for r in rows if r.get("horizon") or (r["control"] and r["depth"] == 0.0)]
  cells = []
  for r in sorted(ladder, key=lambda r: r["gap_min"]):
    k, m, lo, hi = _pooled([r])
    said = f"{k}/{m} [{lo:.2f}, {hi:.2f}] at {r['gap_min']}"
    cells.append((r["gap_min"], _reading(lo, hi), said))
  passing = [c[0] for c in cells if c[1] == "passes"]
  failing = [c[0] for c in cells if c[1] == "fails"]
  head = f"{label}'s retrieval horizon (the needle at depth 0 of n <= L = {train_len}; "
  head += f"retrieved [95% CP] at a gap of tokens: {'; '.join(c[2] for c in cells)}): "
  if passing and failing and max(passing) > min(failing):
    return [head + "not located: a shorter gap fails where a longer one retrieves"]
  if not passing and not failing:
    return [head + f"not located: no gap tried is separated from {THRESHOLD}"]
  low, high = max(passing, default=None), min(failing, default=None)
  if low is not None and high is not None:
    line = f"between {low} and {high} tokens (evidence: retrieves with the needle {low} tokens "
    line += f"back, fails at {high})"
  elif low is not None:
    line = f"at least {low} tokens (evidence: retrieves with the needle {low} tokens back)"
  else:
    line = f"shorter than {high} tokens (evidence: fails with the needle {high} tokens back)"
  open_ = [c[2] for c in cells if c[1] == "straddles" and (low or 0) < c[0] < (high or 1 << 62)]
  return [head + line + (f"; undecided: {', '.join(open_)}" if open_ else "")]
