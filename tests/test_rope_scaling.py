"""rope_frequencies / parse_rope_scaling: closed forms, the YaRN worked example, bad input; the
verdicts of experiments/context_extension.py on made-up rows (match, fail, stay unseparated)."""

import csv
import json
import math
import types

import numpy as np
import pytest

from experiments import context_extension as experiment
from pe_research.encodings.rope_scaling import (
  RopeScaling,
  parse_rope_scaling,
  rope_frequencies,
  short_label,
  yarn_correction_range,
)

L = "original_max_position_embeddings"


def freqs(dim, scaling=None, **kwargs) -> np.ndarray:
  inv_freq, _ = rope_frequencies(dim, scaling=parse_rope_scaling(scaling), **kwargs)
  return np.asarray(inv_freq, np.float64)


def test_default_is_base_power():
  np.testing.assert_allclose(freqs(4, base=100.0), [1.0, 0.1], rtol=1e-7)
  inv_freq, attention_factor = rope_frequencies(64)
  assert inv_freq.shape == (32,) and inv_freq.dtype == np.float32 and attention_factor == 1.0
  np.testing.assert_allclose(inv_freq, 10000.0 ** (-np.arange(0, 64, 2) / 64), rtol=3e-7)


def test_linear_divides_by_factor():
  np.testing.assert_allclose(
    freqs(8, scaling={"rope_type": "linear", "factor": 4.0}), freqs(8) / 4, rtol=1e-7
  )


def test_ntk_rescales_base():
  # d = 4: b' = 100 · 4^(4/2) = 1600, θ = [1, 1/40].
  got = freqs(4, base=100.0, scaling={"rope_type": "ntk", "factor": 4.0})
  np.testing.assert_allclose(got, [1.0, 1 / 40], rtol=1e-7)


@pytest.mark.parametrize("seq_len", [None, 1, 100, 2048])
def test_dynamic_reverts_to_base_up_to_original_length(seq_len):
  scaling = {"rope_type": "dynamic", "factor": 4.0, L: 2048}
  np.testing.assert_array_equal(freqs(16, scaling=scaling, seq_len=seq_len), freqs(16))


def test_dynamic_grows_base_beyond_original_length():
  # s = 2, n = 2L, d = 4: b' = b · (2·2 − 1)^2 = 9b.
  got = freqs(4, base=100.0, scaling={"rope_type": "dynamic", "factor": 2.0, L: 10}, seq_len=20)
  np.testing.assert_allclose(got, [1.0, 1 / 30], rtol=1e-7)


def test_yarn_worked_example():
  assert yarn_correction_range(64, 10000.0, 2048, 32, 1) == (8, 21)
  inv_freq, attention_factor = rope_frequencies(
    64, scaling=parse_rope_scaling({"rope_type": "yarn", "factor": 4.0, L: 2048})
  )
  assert attention_factor == pytest.approx(1.1386294361, abs=1e-10)
  theta = freqs(64)
  got = np.asarray(inv_freq, np.float64)
  np.testing.assert_allclose(got[:9], theta[:9], rtol=1e-7)  # i <= low: extrapolated
  np.testing.assert_allclose(got[21:], theta[21:] / 4, rtol=1e-7)  # i >= high: interpolated
  ramp = (np.arange(9, 21) - 8) / 13
  np.testing.assert_allclose(got[9:21], theta[9:21] * (1 - ramp + ramp / 4), rtol=1e-6)


def test_yarn_options():
  base = {"rope_type": "yarn", "factor": 4.0, L: 2048}
  low, high = yarn_correction_range(64, 10000.0, 2048, 32, 1, truncate=False)
  assert 8 < low < 8.1 and 20 < high < 21
  mscale = parse_rope_scaling(dict(base, mscale=1.0, mscale_all_dim=0.5))
  _, mscaled = rope_frequencies(64, scaling=mscale)
  assert mscaled == pytest.approx((0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))
  _, explicit = rope_frequencies(64, scaling=parse_rope_scaling(dict(base, attention_factor=1.5)))
  assert explicit == 1.5
  _, unscaled = rope_frequencies(64, scaling=parse_rope_scaling(dict(base, factor=1.0)))
  assert unscaled == 1.0


def test_llama3_bands():
  scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
  got = freqs(128, base=500000.0, scaling=dict(scaling, **{L: 8192}))
  theta = freqs(128, base=500000.0)
  wavelen = 2 * math.pi / theta
  high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
  medium = ~high & ~low
  assert high.any() and low.any() and medium.any()
  np.testing.assert_allclose(got[high], theta[high], rtol=1e-7)
  np.testing.assert_allclose(got[low], theta[low] / 8, rtol=1e-7)
  smooth = (8192 / wavelen[medium] - 1) / 3
  np.testing.assert_allclose(
    got[medium], (1 - smooth) * theta[medium] / 8 + smooth * theta[medium], rtol=1e-6
  )


def test_longrope_switches_factors_after_original_length():
  short, long = [1.0, 2.0], [4.0, 8.0]
  spec = dict(rope_type="longrope", factor=16.0, short_factor=short, long_factor=long, **{L: 64})
  scaling = parse_rope_scaling(spec)
  theta = freqs(4, base=100.0)
  for seq_len, factors in ((None, short), (64, short), (65, long)):
    inv_freq, attention_factor = rope_frequencies(4, base=100.0, scaling=scaling, seq_len=seq_len)
    np.testing.assert_allclose(inv_freq, theta / factors, rtol=1e-7)
    assert attention_factor == pytest.approx(math.sqrt(1 + math.log(16) / math.log(64)))
  explicit_spec = parse_rope_scaling(dict(spec, attention_factor=0.9))
  _, explicit = rope_frequencies(4, scaling=explicit_spec, seq_len=65)
  assert explicit == 0.9


def test_parse_rope_scaling_text_defaults_and_aliases():
  assert parse_rope_scaling("") is None and parse_rope_scaling(None) is None
  linear = parse_rope_scaling('{"type": "linear", "factor": 2}')
  assert linear == RopeScaling(rope_type="linear", factor=2)
  assert linear.as_dict() == {"rope_type": "linear", "factor": 2}
  spec = {"rope_type": "yarn", "factor": 4.0}
  parsed = parse_rope_scaling(spec, original_max_position_embeddings=512)
  assert parsed.original_max_position_embeddings == 512 and L not in spec
  given = parse_rope_scaling(dict(spec, **{L: 64}), original_max_position_embeddings=512)
  assert given.original_max_position_embeddings == 64
  ntk = parse_rope_scaling('{"rope_type": "ntk", "factor": 2}', original_max_position_embeddings=8)
  assert ntk.original_max_position_embeddings is None


def test_parsed_rope_scaling_is_frozen_hashable_and_reparses_to_itself():
  spec = dict(rope_type="longrope", factor=4.0, short_factor=[1.0] * 2, long_factor=[2.0] * 2)
  parsed = parse_rope_scaling(dict(spec, **{L: 8}))
  assert parsed.short_factor == (1.0, 1.0) and hash(parsed) == hash(parse_rope_scaling(parsed))
  assert parse_rope_scaling(parsed.as_dict()) == parsed and parsed.uses_seq_len
  with pytest.raises(AttributeError):
    parsed.factor = 2.0


def test_frequencies_take_the_parsed_object_not_text():
  with pytest.raises(TypeError, match="parse_rope_scaling"):
    rope_frequencies(8, scaling='{"rope_type": "linear", "factor": 2}')


LONGROPE = dict(
  rope_type="longrope", factor=4.0, short_factor=[1.0] * 4, long_factor=[2.0] * 4, **{L: 8}
)
YARN = {"rope_type": "yarn", "factor": 4.0, L: 2048}


@pytest.mark.parametrize(
  "dim, scaling, key",
  [
    (8, {"rope_type": "rope"}, "rope_type"),
    (8, {"factor": 2.0}, "rope_type"),
    (8, {"rope_type": "linear", "factor": 2.0, "beta_fast": 32}, "beta_fast"),
    (8, {"rope_type": "default", "factor": 2.0}, "factor"),
    (8, {"rope_type": "linear"}, "factor"),
    (8, {"rope_type": "yarn", "factor": 2.0}, L),
    (8, {"rope_type": "llama3", "factor": 8.0, L: 64, "low_freq_factor": 1.0}, "high_freq_factor"),
    (8, {"rope_type": "linear", "factor": 0.5}, "factor"),
    (8, {"rope_type": "linear", "factor": "2"}, "factor"),
    (8, {"rope_type": "dynamic", "factor": 2.0, L: 0}, L),
    (8, {"rope_type": "dynamic", "factor": 2.0, L: 64.0}, L),
    (8, dict(YARN, beta_fast=1.0, beta_slow=1.0), "beta_fast"),
    (8, dict(YARN, beta_slow=64), "beta_fast"),
    (8, dict(YARN, beta_fast=-1), "beta_fast"),
    (8, dict(YARN, mscale=1.0), "mscale"),
    (8, dict(YARN, truncate="no"), "truncate"),
    (8, dict(YARN, attention_factor=0.0), "attention_factor"),
    (
      8,
      dict(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0, **{L: 64}),
      "high_freq_factor",
    ),
    (8, dict(LONGROPE, short_factor=[1.0] * 3), "short_factor"),
    (8, dict(LONGROPE, long_factor=[2.0] * 5), "long_factor"),
    (8, dict(LONGROPE, long_factor=[2.0, 2.0, 2.0, -1.0]), "long_factor"),
    (8, "{not json", "rope_scaling"),
    (8, "[1, 2]", "rope_scaling"),
    (7, None, "dim"),
    (0, None, "dim"),
    (2, {"rope_type": "ntk", "factor": 2.0}, "dim"),
  ],
)
def test_bad_input_raises_value_error_naming_the_key(dim, scaling, key):
  with pytest.raises(ValueError, match=key) as info:
    rope_frequencies(dim, scaling=parse_rope_scaling(scaling))
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, key", [({"base": 1.0}, "base"), ({"seq_len": 0}, "seq_len")])
def test_bad_base_or_seq_len(kwargs, key):
  with pytest.raises(ValueError, match=key):
    rope_frequencies(8, **kwargs)


@pytest.mark.parametrize(
  "spec, label",
  [
    (None, "none"),
    ("", "none"),
    ('{"rope_type": "default"}', "none"),
    ({"rope_type": "linear", "factor": 2.0}, "PI s=2"),
    ({"rope_type": "dynamic", "factor": 4, L: 8192}, "dynamic NTK s=4"),
    (json.dumps({"rope_type": "yarn", "factor": 4.0, "beta_fast": 16, L: 8192}), "YaRN s=4"),
    (RopeScaling("llama3", 8.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0), "Llama-3 s=8"),
    ({"rope_type": "ntk", "factor": 1.5}, "NTK s=1.5"),
    ('{"rope_type":"yarn","factor":8}', "YaRN s=8"),  # L comes from pe.train_len.
  ],
)
def test_short_label_names_the_method_and_factor_only(spec, label):
  assert short_label(spec) == label


def test_unknown_key_message_lists_allowed_keys():
  with pytest.raises(ValueError, match="allowed: rope_type, factor$"):
    parse_rope_scaling({"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0})


# experiments/context_extension.py findings(): the cpu preset's lengths, L = 128, s = 4, so
# s·L = 512, inside (L, s·L] = 256, 512; beyond s·L = 640 (1.25·s·L), 2048 (4·s·L).
LENGTHS = experiment.PRESETS["cpu"].lengths
TRAIN_LEN, FACTOR = LENGTHS[0], experiment.PRESETS["cpu"].factor
ZERO_SHOT = {  # Every published shape holds, intervals (±0.5) separated where it matters.
  "none": [10, 20, 100, 200, 1000],
  "PI": [11, 12, 14, 30, 60],
  "NTK": [10, 11, 13, 30, 80],
  "dynamic NTK": [10, 10.5, 12, 20, 40],
  "YaRN": [10, 10.5, 11, 20, 50],
  "Llama-3": [10, 11, 12, 25, 60],
  "LongRoPE": [10, 11, 12, 25, 60],
}
FINE_TUNED = {
  "fine-tune only": [10, 10, 10, 30, 100],
  "PI": [10, 9, 8, 12, 20],
  "NTK": [10, 9, 8.5, 14, 30],
  "dynamic NTK": [10, 9, 8.5, 14, 30],
  "YaRN": [10, 7, 6, 9, 12],
  "Llama-3": [10, 9, 8.5, 13, 25],
  "LongRoPE": [10, 9, 8.5, 13, 25],
}


def _ppl_rows(ppls, width=0.5):
  return [
    {
      **{"length": n, "mode": "nonoverlapping", "loss": math.log(p), "windows": 16},
      **{"ppl": p, "ppl_lo": p - width, "ppl_hi": p + width},
    }
    for n, p in zip(LENGTHS, ppls, strict=True)
  ]


def _tables(zs=None, ft=None):
  as_rows = lambda v: v if isinstance(v[0], dict) else _ppl_rows(v)  # noqa: E731
  return (
    {k: as_rows(v) for k, v in (ZERO_SHOT | (zs or {})).items()},
    {k: as_rows(v) for k, v in (FINE_TUNED | (ft or {})).items()},
  )


def _findings(zs=None, ft=None):
  return experiment.findings(*_tables(zs, ft), TRAIN_LEN, FACTOR)


def _line(lines, start):
  (line,) = [x for x in lines if x.startswith(f"- {start}")]
  return line


CLAIMS = (
  "No extension",
  "Zero-shot, beyond s·L",
  "PI at s·L",
  "Fine-tuned at s·L",
  "Fine-tuned, inside",
  "Fine-tuned, just past",
)


def test_rope_scaling_findings_match_when_every_shape_holds():
  lines = _findings()
  assert len(lines) == len(CLAIMS) + 1
  for claim in CLAIMS:
    assert _line(lines, claim).endswith("— **matches the paper**."), claim
  assert "below at 2, above at 0, tied at 0 of 2 lengths" in _line(lines, "Zero-shot, beyond")
  assert "below at 2, above at 0, tied at 0 of 2 lengths" in _line(lines, "Fine-tuned, inside")
  assert "(640)" in _line(lines, "Fine-tuned, just past")
  lowest = _line(lines, "Fine-tuned, lowest ppl at 2048")
  assert "YaRN, separated from every other method" in lowest
  assert "YaRN < PI <" in lowest


@pytest.mark.parametrize(
  "zs, ft, claim",
  [
    ({"none": [10, 11, 12, 13, 14]}, {}, "No extension"),  # 1.1× at 2L, separated below 1.5×
    ({"dynamic NTK": [10, 10.5, 12, 40, 120]}, {}, "Zero-shot, beyond"),  # above NTK at both
    ({"PI": [11, 12, 6, 30, 60]}, {}, "PI at s·L"),  # zero-shot already below fine-tuned
    ({}, {"fine-tune only": [10, 10, 6, 30, 100]}, "Fine-tuned at s·L"),  # below PI
    ({}, {"YaRN": [10, 11, 10, 9, 12]}, "Fine-tuned, inside"),  # above PI at 256 and 512
    ({}, {"YaRN": [10, 7, 6, 15, 12]}, "Fine-tuned, just past"),  # above PI at 640
  ],
)
def test_rope_scaling_findings_fail_on_contrary_rows(zs, ft, claim):
  line = _line(_findings(zs, ft), claim)
  assert line.endswith("— **does NOT match the paper**."), line
  if claim == "Zero-shot, beyond":
    assert "below at 0, above at 2, tied at 0 of 2 lengths" in line


@pytest.mark.parametrize(
  "zs, ft, claim",
  [
    # The point estimates all favour the paper; only the intervals overlap.
    ({"none": _ppl_rows([10, 16, 100, 200, 1000], width=4)}, {}, "No extension"),
    ({"dynamic NTK": _ppl_rows([10, 10.5, 12, 28, 78], width=3)}, {}, "Zero-shot, beyond"),
    ({"PI": [11, 12, 8.6, 30, 60]}, {}, "PI at s·L"),
    ({}, {"fine-tune only": [10, 10, 8.8, 30, 100]}, "Fine-tuned at s·L"),
    ({}, {"YaRN": [10, 8.8, 7.8, 9, 12]}, "Fine-tuned, inside"),
    ({}, {"YaRN": [10, 7, 6, 11.5, 12]}, "Fine-tuned, just past"),
    # Separated, but in both directions across lengths.
    ({"dynamic NTK": [10, 10.5, 12, 20, 120]}, {}, "Zero-shot, beyond"),
    ({}, {"YaRN": [10, 7, 10, 9, 12]}, "Fine-tuned, inside"),
  ],
)
def test_rope_scaling_findings_give_no_verdict_without_separation(zs, ft, claim):
  line = _line(_findings(zs, ft), claim)
  assert line.endswith("— **not separated**: the 95% intervals overlap, no verdict."), line
  assert "matches" not in line and "NOT match" not in line


def test_rope_scaling_lowest_ppl_is_tied_when_the_best_intervals_overlap():
  line = _line(_findings(ft={"LongRoPE": [10, 9, 8.5, 13, 12.6]}), "Fine-tuned, lowest")
  assert "tied (no single best)" in line and "YaRN ~ LongRoPE" in line


def test_rope_scaling_results_csv_carries_the_intervals(tmp_path):
  zs, ft = _tables()
  preset = experiment.PRESETS["cpu"]
  base = types.SimpleNamespace(config_file="configs/tiny.py", workdir="runs/rope")
  args = types.SimpleNamespace(preset="cpu")
  experiment.write_outputs(tmp_path, zs, ft, {}, args, preset, base, TRAIN_LEN, 60.0)
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(LENGTHS) * (len(zs) + len(ft))
  assert {"ppl", "ppl_lo", "ppl_hi", "windows"} <= set(rows[0])
  first = rows[0]
  assert first["model"] == "zero-shot: none" and float(first["ppl_lo"]) == 9.5
  assert "**does NOT match" not in (tmp_path / "REPORT.md").read_text()
