"""The analytic demo figure: files are written and RoPE's bound decays as in RoFormer Fig. 2."""

import csv

import numpy as np

from experiments import rope_decay


def test_rope_bound_closed_form_at_zero_and_decay():
  bound_X = rope_decay.rope_relative_upper_bound(np.arange(301), 128, 10000.0)
  assert bound_X[0] == 32.5  # S_j(0) = j: mean of 1..64.
  assert bound_X[100] < bound_X[0] / 2 and bound_X[200:].mean() < bound_X[:20].mean() / 2


def test_experiment_writes_png_csv_report(tmp_path):
  rope_decay.main(["--out", str(tmp_path), "--r_max", "256", "--num_heads", "4"])
  png, table, report = (
    tmp_path / n for n in ("rope_decay.png", "bias_vs_distance.csv", "REPORT.md")
  )
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with table.open() as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 257 and [int(rows[r]["distance"]) for r in (0, 256)] == [0, 256]
  rope = np.array([float(row["rope_bound"]) for row in rows])
  assert rope[0] == 32.5 and rope[100] < rope[0] / 2
  alibi_h1 = np.array([float(row["alibi_h1"]) for row in rows])
  np.testing.assert_allclose(alibi_h1, -0.25 * np.arange(257))  # 4 heads: m_1 = 2^(−2).
  kerple_h1 = np.array([float(row["kerple_log_h1"]) for row in rows])
  assert kerple_h1[0] == 0 and (np.diff(kerple_h1) <= 0).all()
  assert {"t5_bucket", "fire_h4", "kerple_power_h4"} <= set(rows[0])
  text = report.read_text()
  assert "it decays, as in RoFormer" in text and "r=100" in text


def test_learned_lines_call_alibi_slopes_fixed_not_learned():
  distance_X = np.arange(129)
  falling_XxH = -np.outer(distance_X, [0.5, 0.25])
  lines = rope_decay.learned_lines(
    distance_X, {"a@1": ("alibi", falling_XxH), "k@1": ("kerple", falling_XxH)}
  )
  (alibi,) = [line for line in lines if line.startswith("- a@1")]
  (kerple,) = [line for line in lines if line.startswith("- k@1")]
  assert "alibi (fixed slopes, not learned)" in alibi and "not learned" not in kerple
