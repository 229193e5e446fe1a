"""Parity of rope_frequencies and apply_rope with HF transformers 5.24 (torch, CPU).

HF takes RoPE settings from ``config.rope_parameters`` (v5's name for ``rope_scaling``, with
``rope_theta`` inside). Our ``ntk`` has no HF type: it is HF ``default`` with
b' = b·s^(d/(d-2)). HF's ``dynamic`` reads L from ``config.max_position_embeddings``.
"""

import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip(
  "transformers", reason="HF parity tests need transformers (pip install -r requirements-dev.txt)"
)
torch = pytest.importorskip("torch", reason="HF parity tests need torch (requirements-dev.txt)")

from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
  LlamaRotaryEmbedding,
  apply_rotary_pos_emb,
)

from pe_research.encodings.rope import apply_rope  # noqa: E402
from pe_research.encodings.rope_scaling import parse_rope_scaling, rope_frequencies  # noqa: E402

_RNG = np.random.default_rng(0)
_LONGROPE_32 = dict(
  rope_type="longrope",
  factor=16.0,
  original_max_position_embeddings=4096,
  short_factor=[float(f) for f in 1 + _RNG.random(16) * 0.1],
  long_factor=[float(f) for f in 1 + np.sort(_RNG.random(16)) * 40],
)
_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048)

# id -> (dim, base, scaling, seq_len)
CASES = {
  "default-d64": (64, 10000.0, None, None),
  "default-d128-b5e5": (128, 500000.0, None, None),
  "default-d8": (8, 10000.0, {"rope_type": "default"}, None),
  "linear-s4": (64, 10000.0, {"rope_type": "linear", "factor": 4.0}, None),
  "linear-s2.5-d96": (96, 10000.0, {"rope_type": "linear", "factor": 2.5}, None),
  "ntk-s4": (64, 10000.0, {"rope_type": "ntk", "factor": 4.0}, None),
  "ntk-s8-d128": (128, 500000.0, {"rope_type": "ntk", "factor": 8.0}, None),
  **{
    f"dynamic-s4-len{n}": (
      64,
      10000.0,
      {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 2048},
      n,
    )
    for n in (None, 1000, 2048, 2049, 4096, 10000)
  },
  "yarn-s4": (64, 10000.0, _YARN, None),
  "yarn-s16-d128-b5e5": (
    128,
    500000.0,
    dict(_YARN, factor=16.0, original_max_position_embeddings=4096),
    None,
  ),
  "yarn-no-truncate": (64, 10000.0, dict(_YARN, truncate=False), None),
  "yarn-mscale": (64, 10000.0, dict(_YARN, mscale=1.0, mscale_all_dim=0.5), None),
  "yarn-deepseek": (
    64,
    10000.0,
    dict(_YARN, factor=40.0, mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1),
    None,
  ),
  "yarn-betas-attn": (
    64,
    10000.0,
    dict(_YARN, beta_fast=16.0, beta_slow=2.0, attention_factor=1.25),
    None,
  ),
  "llama3.1": (
    128,
    500000.0,
    dict(
      rope_type="llama3",
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=8192,
    ),
    None,
  ),
  "llama3.2-d64": (
    64,
    500000.0,
    dict(
      rope_type="llama3",
      factor=32.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=8192,
    ),
    None,
  ),
  "longrope-short": (32, 10000.0, _LONGROPE_32, None),
  "longrope-short-len4096": (32, 10000.0, _LONGROPE_32, 4096),
  "longrope-long": (32, 10000.0, _LONGROPE_32, 4097),
  "longrope-long-attn": (32, 10000.0, dict(_LONGROPE_32, attention_factor=1.5), 10000),
}


def hf_config(dim: int, base: float, scaling: dict | None) -> tuple[LlamaConfig, str]:
  """A minimal LlamaConfig carrying our spec in HF's vocabulary, and the HF rope_type."""
  params = dict(scaling or {"rope_type": "default"})
  rope_type = params["rope_type"]
  max_len = params.get("original_max_position_embeddings", 2048)
  if rope_type == "ntk":
    params = {"rope_type": "default"}
    base = base * scaling["factor"] ** (dim / (dim - 2))
  elif rope_type == "dynamic":
    del params["original_max_position_embeddings"]
  elif rope_type != "default":
    max_len = int(max_len * params.get("factor", 1.0))
  params["rope_theta"] = base
  config = LlamaConfig(
    hidden_size=2 * dim,
    num_attention_heads=2,
    head_dim=dim,
    max_position_embeddings=max_len,
    rope_parameters=params,
  )
  return config, params["rope_type"]


def hf_frequencies(dim, base, scaling, seq_len) -> tuple[np.ndarray, float]:
  config, rope_type = hf_config(dim, base, scaling)
  if rope_type == "default":
    inv_freq, attention_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
  else:
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
  return inv_freq.numpy(), float(attention_factor)


def max_relative_errors(case: str) -> tuple[float, float]:
  """(max relative error of inv_freq, relative error of attention_factor) vs HF."""
  dim, base, scaling, seq_len = CASES[case]
  parsed = parse_rope_scaling(scaling)
  ours, ours_factor = rope_frequencies(dim, base=base, scaling=parsed, seq_len=seq_len)
  ref, ref_factor = hf_frequencies(dim, base, scaling, seq_len)
  assert np.asarray(ours).dtype == ref.dtype == np.float32
  freq_err = float(np.max(np.abs(np.asarray(ours, np.float64) - ref) / np.abs(ref)))
  return freq_err, abs(ours_factor - ref_factor) / ref_factor


@pytest.mark.parametrize("case", list(CASES))
def test_rope_frequencies_match_hf(case):
  freq_err, factor_err = max_relative_errors(case)
  assert freq_err <= 2.5e-7  # two float32 ulps
  assert factor_err <= 1e-12


@pytest.mark.parametrize("case", ["default-d64", "yarn-s4", "llama3.1", "longrope-long-attn"])
def test_apply_rope_matches_hf_apply_rotary_pos_emb(case):
  dim, base, scaling, seq_len = CASES[case]
  config, _ = hf_config(dim, base, scaling)
  rotary = LlamaRotaryEmbedding(config)
  batch, length, heads = 2, 7, 3
  pos_BxL = np.sort(_RNG.integers(0, seq_len or 5000, size=(batch, length)), axis=-1)
  q_BxLxHxE = _RNG.standard_normal((batch, length, heads, dim), dtype=np.float32)
  k_BxLxHxE = _RNG.standard_normal((batch, length, heads, dim), dtype=np.float32)
  pos_t = torch.from_numpy(pos_BxL)
  if scaling and scaling["rope_type"] == "longrope":  # HF picks long factors from max(pos) + 1
    pos_t[:, -1] = seq_len - 1
    pos_BxL = pos_t.numpy()
  cos, sin = rotary(torch.zeros(1), pos_t)
  q_ref, k_ref = apply_rotary_pos_emb(
    torch.from_numpy(q_BxLxHxE), torch.from_numpy(k_BxLxHxE), cos, sin, unsqueeze_dim=2
  )
  parsed = parse_rope_scaling(scaling)
  inv_freq, attention_factor = rope_frequencies(dim, base=base, scaling=parsed, seq_len=seq_len)
  for x, ref in ((q_BxLxHxE, q_ref), (k_BxLxHxE, k_ref)):
    ours = apply_rope(
      jnp.asarray(x), jnp.asarray(pos_BxL), inv_freq, attention_factor=attention_factor
    )
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6, atol=1e-6)
