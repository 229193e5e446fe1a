"""rope_frequencies / parse_rope_scaling: closed forms, the YaRN worked example, bad input."""

import math

import numpy as np
import pytest

from pe_research.encodings.rope_scaling import (
  parse_rope_scaling,
  rope_frequencies,
  yarn_correction_range,
)

L = "original_max_position_embeddings"


def freqs(dim, **kwargs) -> np.ndarray:
  inv_freq, _ = rope_frequencies(dim, **kwargs)
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
    64, scaling={"rope_type": "yarn", "factor": 4.0, L: 2048}
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
  _, mscaled = rope_frequencies(64, scaling=dict(base, mscale=1.0, mscale_all_dim=0.5))
  assert mscaled == pytest.approx((0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))
  _, explicit = rope_frequencies(64, scaling=dict(base, attention_factor=1.5))
  assert explicit == 1.5
  _, unscaled = rope_frequencies(64, scaling=dict(base, factor=1.0))
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
  scaling = dict(rope_type="longrope", factor=16.0, short_factor=short, long_factor=long, **{L: 64})
  theta = freqs(4, base=100.0)
  for seq_len, factors in ((None, short), (64, short), (65, long)):
    inv_freq, attention_factor = rope_frequencies(4, base=100.0, scaling=scaling, seq_len=seq_len)
    np.testing.assert_allclose(inv_freq, theta / factors, rtol=1e-7)
    assert attention_factor == pytest.approx(math.sqrt(1 + math.log(16) / math.log(64)))
  _, explicit = rope_frequencies(4, scaling=dict(scaling, attention_factor=0.9), seq_len=65)
  assert explicit == 0.9


def test_parse_rope_scaling_text_defaults_and_aliases():
  assert parse_rope_scaling("") is None and parse_rope_scaling(None) is None
  assert parse_rope_scaling('{"type": "linear", "factor": 2}') == {
    "rope_type": "linear",
    "factor": 2,
  }
  spec = {"rope_type": "yarn", "factor": 4.0}
  parsed = parse_rope_scaling(spec, original_max_position_embeddings=512)
  assert parsed[L] == 512 and L not in spec
  assert parse_rope_scaling(dict(spec, **{L: 64}), original_max_position_embeddings=512)[L] == 64
  assert L not in parse_rope_scaling(
    '{"rope_type": "ntk", "factor": 2}', original_max_position_embeddings=8
  )


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
    rope_frequencies(dim, scaling=scaling)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, key", [({"base": 1.0}, "base"), ({"seq_len": 0}, "seq_len")])
def test_bad_base_or_seq_len(kwargs, key):
  with pytest.raises(ValueError, match=key):
    rope_frequencies(8, **kwargs)


def test_unknown_key_message_lists_allowed_keys():
  with pytest.raises(ValueError, match="allowed: rope_type, factor$"):
    parse_rope_scaling({"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0})
