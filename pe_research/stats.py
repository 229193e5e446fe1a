"""Bootstrap intervals for the quantities the evaluator writes, and rankings that respect them.

Perplexity is a ratio estimator, ``ppl = exp(Σ_u nll_u / Σ_u w_u)`` over units ``u`` (evaluation
windows, or contiguous blocks of positions when there are too few windows). Its percentile
bootstrap resamples the units with replacement ``reps`` times::

  loss*_r = Σ_u c_ru nll_u / Σ_u c_ru w_u,   c_r ~ Multinomial(U, 1/U),
  interval = exp(percentiles 2.5 and 97.5 of loss*)

Accuracies (passkey, synthetic exact match) use the same bootstrap over examples (a mean of 0/1).
Two methods are ranked only when their intervals do not overlap; otherwise they are tied.

Counts of successes (needle retrieval, ``clopper_pearson``) get the exact binomial interval of
Clopper & Pearson (1934): with k of n correct and α = 1 − level,
``lo = B⁻¹(α/2; k, n − k + 1)`` (0 when k = 0) and ``hi = B⁻¹(1 − α/2; k + 1, n − k)`` (1 when
k = n), B⁻¹ the Beta quantile; its coverage is at least ``level`` for every true rate.

Across training seeds (``seed_interval``) the unit is the run: the mean of U per-seed values
with a Student-t interval ``mean ± t_{0.975, U-1} · sd / sqrt(U)`` (U = 1 gives a point).

Paired comparisons (``paired_ratio``) resample the units (documents) jointly for two
quantities measured on the same units, a and b, and report the ratio of their perplexities::

  ratio*_r = exp(Σ_u c_ru a_u / Σ_u c_ru w^a_u − Σ_u c_ru b_u / Σ_u c_ru w^b_u)

On the same tokens (w^a = w^b: one method against another) this is the ratio on those tokens;
on the same documents but other tokens (the region beyond L against the region inside L) the
documents' own difficulty is shared by both terms of every draw. ``compare`` reads such an
interval with a margin of practical equivalence: within ``1 ± EQUIVALENCE`` is "equivalent",
whatever its width on the other side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

LEVEL = 0.95
REPS = 2000
# Fewer windows than this: the units are MIN_UNITS contiguous blocks of scored positions.
MIN_UNITS = 16
# Margin of practical equivalence of two perplexities: a ratio whose 95% interval lies within
# [1 / (1 + EQUIVALENCE), 1 + EQUIVALENCE] is "equivalent" even when it excludes 1.
EQUIVALENCE = 0.02


def ratio_interval(
  num_U: np.ndarray, den_U: np.ndarray, *, reps: int = REPS, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
  """Percentile bootstrap interval of ``Σ num / Σ den`` over resampled units."""
  num_U, den_U = np.asarray(num_U, np.float64), np.asarray(den_U, np.float64)
  keep = den_U > 0
  num_U, den_U = num_U[keep], den_U[keep]
  if len(num_U) < 2:
    ratio = float(num_U.sum() / den_U.sum()) if len(num_U) else math.nan
    return ratio, ratio
  rng = np.random.default_rng(seed)
  counts_IxU = rng.multinomial(len(num_U), np.full(len(num_U), 1 / len(num_U)), size=reps)
  ratios_I = (counts_IxU @ num_U) / (counts_IxU @ den_U)
  tail = (1 - level) / 2 * 100
  lo, hi = np.percentile(ratios_I, [tail, 100 - tail])
  return float(lo), float(hi)


def position_blocks(
  nll_L: np.ndarray, weight_L: np.ndarray, blocks: int = MIN_UNITS
) -> tuple[np.ndarray, np.ndarray]:
  """``(nll_U, weight_U)`` summed over ``blocks`` contiguous blocks of the scored positions."""
  scored = np.flatnonzero(np.asarray(weight_L) > 0)
  if not len(scored):
    return np.zeros(0), np.zeros(0)
  parts = np.array_split(scored, min(blocks, len(scored)))
  return (
    np.array([np.asarray(nll_L)[p].sum() for p in parts]),
    np.array([np.asarray(weight_L)[p].sum() for p in parts]),
  )


def loss_units(
  nll_W: np.ndarray,
  weight_W: np.ndarray,
  nll_L: np.ndarray,
  weight_L: np.ndarray,
  min_windows: int = MIN_UNITS,
) -> tuple[np.ndarray, np.ndarray, str]:
  """The bootstrap units of one evaluated length: its windows when there are at least
  ``min_windows`` scored ones, else ``MIN_UNITS`` blocks of positions (summed over windows).
  Windows that are documents are the unit whatever their number (``min_windows=2``)."""
  if int(np.sum(np.asarray(weight_W) > 0)) >= min_windows:
    return np.asarray(nll_W), np.asarray(weight_W), "windows"
  return (*position_blocks(nll_L, weight_L), "position blocks")


def ppl_interval(nll_U, weight_U, **kwargs) -> tuple[float, float]:
  """The bootstrap interval of ``exp(Σ nll / Σ w)``."""
  lo, hi = ratio_interval(nll_U, weight_U, **kwargs)
  return _exp(lo), _exp(hi)


def accuracy_interval(correct_U, **kwargs) -> tuple[float, float]:
  """The bootstrap interval of a mean of 0/1 outcomes."""
  correct_U = np.asarray(correct_U, np.float64)
  return ratio_interval(correct_U, np.ones_like(correct_U), **kwargs)


def seed_interval(values_U: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
  """``(mean, lo, hi)`` of per-seed values: a Student-t interval across the U seeds."""
  from scipy import stats as scipy_stats  # A JAX dependency; imported here, when needed.

  values_U = np.asarray(values_U, np.float64)
  mean = float(values_U.mean())
  if len(values_U) < 2:
    return mean, mean, mean
  half = scipy_stats.t.ppf(0.5 + level / 2, len(values_U) - 1) * values_U.std(ddof=1)
  half /= math.sqrt(len(values_U))
  return mean, mean - float(half), mean + float(half)


def clopper_pearson(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
  """The exact (Clopper–Pearson) interval of a binomial rate from ``successes`` of ``trials``."""
  from scipy.special import betaincinv  # The Beta quantile; scipy.stats costs 2 s to import.

  if not 0 <= successes <= trials or trials < 1:
    raise ValueError(f"need 0 <= successes <= trials and trials >= 1; got {successes}/{trials}")
  k, n, alpha = successes, trials, 1 - level
  lo = betaincinv(k, n - k + 1, alpha / 2) if k else 0.0
  hi = betaincinv(k + 1, n - k, 1 - alpha / 2) if k < n else 1.0
  return float(lo), float(hi)


def _exp(x: float) -> float:
  return math.exp(x) if x < 700 else math.inf


def separated(a: tuple[float, float], b: tuple[float, float]) -> bool:
  """True when the two intervals do not overlap."""
  return a[1] < b[0] or b[1] < a[0]


def rank(intervals: Mapping[str, tuple[float, float]], lower_is_better: bool = True) -> list[str]:
  """Sentences ranking methods by interval: ``A < B`` only when separated, else ``A ~ B`` (tied).

  Methods are ordered by interval midpoint; each adjacent pair is joined by ``<`` (or ``>``) if
  the intervals separate and ``~`` (tied) otherwise."""
  order = sorted(intervals, key=lambda k: sum(intervals[k]) / 2, reverse=not lower_is_better)
  if not order:
    return []
  text = [order[0]]
  for prev, name in zip(order, order[1:], strict=False):
    joint = (
      ("<" if lower_is_better else ">") if separated(intervals[prev], intervals[name]) else "~"
    )
    text.append(f" {joint} {name}")
  return ["".join(text)]


def best(intervals: Mapping[str, tuple[float, float]], lower_is_better: bool = True) -> str | None:
  """The one method whose interval separates from every other's in the right direction, or
  None when the best is tied with another."""
  order: Sequence[str] = sorted(
    intervals, key=lambda k: sum(intervals[k]) / 2, reverse=not lower_is_better
  )
  if len(order) < 2:
    return order[0] if order else None
  top = order[0]
  return top if all(separated(intervals[top], intervals[k]) for k in order[1:]) else None


def paired_ratio(
  a_U: np.ndarray,
  wa_U: np.ndarray,
  b_U: np.ndarray,
  wb_U: np.ndarray,
  *,
  reps: int = REPS,
  seed: int = 0,
  level: float = LEVEL,
) -> tuple[float, float, float]:
  """``(ratio, lo, hi)``: ``exp(Σa/Σw^a − Σb/Σw^b)`` and its percentile bootstrap interval,
  the units (documents) resampled jointly for a and b (module docstring). Units scored in
  neither are dropped; one unit gives a point."""
  a_U, wa_U, b_U, wb_U = (np.asarray(x, np.float64) for x in (a_U, wa_U, b_U, wb_U))
  keep = (wa_U > 0) | (wb_U > 0)
  a_U, wa_U, b_U, wb_U = a_U[keep], wa_U[keep], b_U[keep], wb_U[keep]
  if not len(a_U) or not wa_U.sum() or not wb_U.sum():
    return math.nan, math.nan, math.nan
  ratio = _exp(a_U.sum() / wa_U.sum() - b_U.sum() / wb_U.sum())
  if len(a_U) < 2:
    return ratio, ratio, ratio
  rng = np.random.default_rng(seed)
  counts_IxU = rng.multinomial(len(a_U), np.full(len(a_U), 1 / len(a_U)), size=reps)
  with np.errstate(invalid="ignore", divide="ignore"):
    log_I = (counts_IxU @ a_U) / (counts_IxU @ wa_U) - (counts_IxU @ b_U) / (counts_IxU @ wb_U)
  log_I = log_I[np.isfinite(log_I)]  # A draw without a's (or b's) tokens has no ratio.
  tail = (1 - level) / 2 * 100
  lo, hi = np.percentile(log_I, [tail, 100 - tail])
  return ratio, _exp(float(lo)), _exp(float(hi))


def compare(lo: float, hi: float, margin: float = EQUIVALENCE) -> str:
  """An interval of a ratio a/b read with a margin: "equivalent" when it lies within
  ``[1/(1+margin), 1+margin]``, "higher" when it lies above 1, "lower" below 1, else
  "not separated" (it spans 1 and leaves the margin)."""
  if any(math.isnan(x) for x in (lo, hi)):
    return "not separated"
  if 1 / (1 + margin) <= lo and hi <= 1 + margin:
    return "equivalent"
  return "higher" if lo > 1 else "lower" if hi < 1 else "not separated"
