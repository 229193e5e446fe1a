"""Bootstrap intervals and interval-respecting rankings (pe_research.stats), and the intervals
the evaluator attaches to every perplexity and accuracy."""

import math

import numpy as np
import pytest

from pe_research import eval_lib, stats


def test_ratio_interval_covers_the_truth_and_shrinks_with_more_units():
  rng = np.random.default_rng(0)
  true_loss, covered, widths = 2.0, 0, {}
  for units in (20, 320):
    for seed in range(40):
      w_U = rng.integers(50, 150, units).astype(float)
      nll_U = w_U * (true_loss + rng.normal(0, 0.3, units))
      lo, hi = stats.ratio_interval(nll_U, w_U, reps=500, seed=seed)
      covered += lo <= true_loss <= hi
      widths.setdefault(units, []).append(hi - lo)
  assert covered >= 0.85 * 80  # Nominal 95%; a broken bootstrap covers far less or always.
  assert np.median(widths[320]) < 0.4 * np.median(widths[20])


def test_one_unit_gives_a_point_and_empty_units_are_ignored():
  assert stats.ratio_interval([6.0], [3.0]) == (2.0, 2.0)
  assert stats.ratio_interval([6.0, 5.0], [3.0, 0.0]) == (2.0, 2.0)
  lo, hi = stats.ppl_interval([1.0, 3.0], [1.0, 1.0], reps=200)
  assert math.exp(1) <= lo <= hi <= math.exp(3)


def test_position_blocks_partition_the_scored_positions():
  nll_L, w_L = np.arange(100.0), np.r_[np.zeros(10), np.ones(90)]
  nll_U, w_U = stats.position_blocks(nll_L, w_L, blocks=16)
  assert len(nll_U) == 16 and w_U.sum() == 90 and nll_U.sum() == nll_L[10:].sum()
  units = stats.loss_units(np.ones(3), np.ones(3), nll_L, w_L)
  assert units[2] == "position blocks" and len(units[0]) == 16
  assert stats.loss_units(np.ones(20), np.ones(20), nll_L, w_L)[2] == "windows"


@pytest.mark.parametrize(
  "intervals, ranking, winner",
  [
    ({"a": (1.0, 2.0), "b": (3.0, 4.0), "c": (3.5, 5.0)}, "a < b ~ c", "a"),
    ({"a": (1.0, 2.0), "b": (1.5, 4.0)}, "a ~ b", None),  # Overlap: must NOT rank.
    ({"a": (5.0, 6.0), "b": (1.0, 2.0)}, "b < a", "b"),
  ],
)
def test_rankings_separate_only_non_overlapping_intervals(intervals, ranking, winner):
  assert stats.rank(intervals) == [ranking]
  assert stats.best(intervals) == winner


def test_accuracy_interval_and_higher_is_better():
  lo, hi = stats.accuracy_interval([1, 1, 1, 0] * 10, reps=500)
  assert 0.5 < lo < 0.75 < hi <= 1.0
  assert stats.rank({"x": (0.8, 0.9), "y": (0.1, 0.2)}, lower_is_better=False) == ["x > y"]
  assert stats.best({"x": (0.8, 0.9), "y": (0.85, 0.95)}, lower_is_better=False) is None


def test_totals_rows_carry_an_interval_around_the_estimate():
  totals = eval_lib.Totals(np.full(8, 4.0), np.full(8, 2.0))
  totals.nll_W, totals.weight_W = [1.0, 2.0, 3.0, 2.0] * 5, [1.0] * 20
  row = totals.lm_row()
  assert row["interval_units"] == "windows" and row["windows"] == 20
  assert row["ppl_lo"] < math.exp(2.0) < row["ppl_hi"]


def test_seed_interval_is_the_student_t_interval_and_a_point_for_one_seed():
  mean, lo, hi = stats.seed_interval([1.0, 2.0, 3.0])
  half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t_{0.975, 2} * sd / sqrt(S)
  assert mean == 2.0 and np.isclose(lo, 2.0 - half) and np.isclose(hi, 2.0 + half)
  assert stats.seed_interval([5.0]) == (5.0, 5.0, 5.0)
  narrow = stats.seed_interval([2.0, 2.0, 2.01, 1.99])
  assert narrow[2] - narrow[1] < hi - lo  # Less spread across seeds, a narrower interval.


def test_over_seeds_combines_rows_per_length_and_refuses_other_lengths():
  from pe_research.launch import sweep

  rows = {
    0: [{"length": 8, "ppl": 10.0}, {"length": 16, "ppl": 20.0}],
    1: [{"length": 8, "ppl": 12.0}, {"length": 16, "ppl": 22.0}],
  }
  combined = sweep.over_seeds(rows)
  assert [r["length"] for r in combined] == [8, 16]
  assert combined[0]["ppl"] == 11.0 and combined[0]["seeds"] == 2
  assert combined[0]["ppl_lo"] < 10.0 and combined[0]["ppl_hi"] > 12.0
  assert combined[1]["ppl_by_seed"] == {0: 20.0, 1: 22.0}
  with pytest.raises(ValueError, match="other lengths"):
    sweep.over_seeds({0: rows[0], 1: rows[1][:1]})


def _documents(rng, units, shift, spread=0.5):
  """Per-document NLL sums and tokens of two quantities a, b on the same documents: the
  documents' difficulty varies a lot, a = b + ``shift`` nats per token plus noise."""
  w_U = rng.integers(200, 400, units).astype(float)
  hard_U = rng.gamma(2.0, spread, units)  # Shared by a and b on each document.
  b_U = w_U * hard_U
  a_U = w_U * (hard_U + shift + rng.normal(0, 0.002, units))
  return a_U, w_U, b_U, w_U


@pytest.mark.parametrize(
  "shift, reading",
  [
    (0.2, "higher"),  # exp(0.2) = 1.22: separated and outside the margin.
    (-0.2, "lower"),
    (0.004, "equivalent"),  # 1.004: separated from 1 but inside ±2%: equivalent.
  ],
)
def test_paired_ratio_cancels_document_difficulty_and_reads_with_the_margin(shift, reading):
  a_U, wa_U, b_U, wb_U = _documents(np.random.default_rng(0), 12, shift)
  ratio, lo, hi = stats.paired_ratio(a_U, wa_U, b_U, wb_U)
  assert ratio == pytest.approx(np.exp(shift), rel=2e-3) and lo <= ratio <= hi
  assert hi / lo < 1.01  # Difficulty cancels: an unpaired interval would be far wider.
  assert stats.compare(lo, hi) == reading


def test_compare_ties_wide_intervals_and_a_single_document_gives_a_point():
  assert stats.compare(0.9, 1.1) == "not separated"  # Spans 1 and leaves the margin.
  assert stats.compare(1.005, 1.03) == "higher"  # Excludes 1, partly beyond the margin.
  assert stats.compare(0.99, 1.019) == "equivalent"
  assert stats.compare(float("nan"), float("nan")) == "not separated"
  assert stats.paired_ratio([3.0], [1.0], [2.0], [1.0]) == (np.e, np.e, np.e)
  # Other tokens on the same documents (beyond L against inside L): the ratio of the means.
  ratio, _, _ = stats.paired_ratio([6.0, 6.0], [2.0, 2.0], [1.0, 1.0], [1.0, 1.0])
  assert ratio == pytest.approx(np.exp(2.0))


def test_clopper_pearson_matches_closed_forms_and_published_values():
  # k = 0 and k = n have closed forms: hi = 1 - (α/2)^(1/n), lo = (α/2)^(1/n).
  assert stats.clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025**0.1, abs=1e-12))
  assert stats.clopper_pearson(10, 10) == (pytest.approx(0.025**0.1, abs=1e-12), 1.0)
  # 5 of 10 (Clopper & Pearson 1934 tables; R binom.test): [0.1871, 0.8129].
  lo, hi = stats.clopper_pearson(5, 10)
  assert lo == pytest.approx(0.18708, abs=1e-5) and hi == pytest.approx(0.81292, abs=1e-5)
  lo, hi = stats.clopper_pearson(9, 10)  # binom.test(9, 10): [0.5550, 0.9975].
  assert lo == pytest.approx(0.55498, abs=1e-5) and hi == pytest.approx(0.99747, abs=1e-5)
  assert stats.clopper_pearson(1, 2, level=0.5)[1] < stats.clopper_pearson(1, 2)[1]
  with pytest.raises(ValueError, match="successes <= trials"):
    stats.clopper_pearson(3, 2)


def test_documents_are_the_bootstrap_units_however_few():
  nll_W, weight_W = np.array([10.0, 20.0, 30.0]), np.array([5.0, 5.0, 5.0])
  nll_L, weight_L = np.arange(40.0), np.ones(40)
  assert stats.loss_units(nll_W, weight_W, nll_L, weight_L)[2] == "position blocks"
  nll_U, weight_U, units = stats.loss_units(nll_W, weight_W, nll_L, weight_L, min_windows=2)
  assert units == "windows" and list(nll_U) == [10.0, 20.0, 30.0]
