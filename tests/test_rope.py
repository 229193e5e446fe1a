"""apply_rope and the RoPE module: closed forms, relative-position property, layouts."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pe_research.encodings import rope as rope_lib
from pe_research.encodings import rope_scaling as rope_scaling_lib
from pe_research.encodings.registry import build_encoding
from pe_research.encodings.rope import RoPE, interleaved_to_half, rotary_dim_for
from pe_research.encodings.rope import apply_rope as _apply_rope
from pe_research.encodings.rope_scaling import RopeScaling, parse_rope_scaling, rope_frequencies

RNG = np.random.default_rng(0)
# One compile per shape instead of one per primitive: keeps the file fast on 2 CPU cores.
apply_rope = jax.jit(_apply_rope, static_argnames=("layout", "attention_factor"))


def normal(*shape) -> jax.Array:
  return jnp.asarray(RNG.standard_normal(shape, dtype=np.float32))


def score(q_E, k_E, inv_freq, m, n, layout) -> float:
  """⟨R(m) q, R(n) k⟩ for single vectors."""
  q_rot = apply_rope(q_E[None, None], jnp.array([m]), inv_freq, layout=layout)
  k_rot = apply_rope(k_E[None, None], jnp.array([n]), inv_freq, layout=layout)
  return float(jnp.sum(q_rot * k_rot))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_two_dim_rotation_closed_form(layout):
  out = apply_rope(jnp.array([[[1.0, 0.0]]]), jnp.array([2]), jnp.array([0.3]), layout=layout)
  np.testing.assert_allclose(out[0, 0], [np.cos(0.6), np.sin(0.6)], rtol=1e-6)


def test_four_dim_layouts_pair_different_dims():
  x = jnp.array([[[1.0, 2.0, 3.0, 4.0]]])
  inv_freq, pos = jnp.array([np.pi / 2, 0.0]), jnp.array([1])
  # half: pairs (x0, x2), (x1, x3); pair 0 turns by 90°: (1, 3) -> (-3, 1).
  np.testing.assert_allclose(apply_rope(x, pos, inv_freq)[0, 0], [-3, 2, 1, 4], atol=1e-6)
  # interleaved: pairs (x0, x1), (x2, x3); (1, 2) -> (-2, 1).
  got = apply_rope(x, pos, inv_freq, layout="interleaved")[0, 0]
  np.testing.assert_allclose(got, [-2, 1, 3, 4], atol=1e-6)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_score_depends_only_on_relative_position(layout):
  q_E, k_E = normal(16), normal(16)
  inv_freq, _ = rope_frequencies(16, base=100.0)
  for delta in (0, 3, -5):
    scores = [score(q_E, k_E, inv_freq, n + delta, n, layout) for n in (5, 17, 40)]
    np.testing.assert_allclose(scores, scores[0], atol=2e-5)
  assert (
    abs(score(q_E, k_E, inv_freq, 3, 0, layout) - score(q_E, k_E, inv_freq, 0, 0, layout)) > 1e-3
  )


def test_layouts_agree_after_qk_permutation():
  rot = 6  # partial rotary: 3 pairs of an 8-dim head
  q, k = normal(2, 5, 3, 8), normal(2, 5, 3, 8)
  pos = jnp.asarray(RNG.integers(0, 50, size=(2, 5)))
  inv_freq, _ = rope_frequencies(rot)
  q_i, k_i = (apply_rope(t, pos, inv_freq, layout="interleaved") for t in (q, k))
  q_h, k_h = (apply_rope(interleaved_to_half(t, rot), pos, inv_freq) for t in (q, k))
  np.testing.assert_allclose(interleaved_to_half(q_i, rot), q_h, atol=1e-6)
  logits_i = jnp.einsum("bqhd,bkhd->bhqk", q_i, k_i)
  logits_h = jnp.einsum("bqhd,bkhd->bhqk", q_h, k_h)
  np.testing.assert_allclose(logits_i, logits_h, atol=1e-5)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_partial_rotary_leaves_tail_untouched_and_keeps_norm(layout):
  x = normal(2, 4, 3, 10)
  out = apply_rope(x, jnp.arange(4), rope_frequencies(4)[0], layout=layout)
  np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
  assert not np.allclose(out[..., :4], x[..., :4])
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_attention_factor_scales_rotated_dims_only():
  x, pos, inv_freq = normal(1, 4, 2, 8), jnp.arange(4), rope_frequencies(6)[0]
  plain = apply_rope(x, pos, inv_freq)
  scaled = apply_rope(x, pos, inv_freq, attention_factor=1.5)
  np.testing.assert_allclose(scaled[..., :6], 1.5 * plain[..., :6], rtol=1e-6)
  np.testing.assert_array_equal(scaled[..., 6:], x[..., 6:])


def test_dtype_is_preserved():
  x = normal(1, 4, 2, 8).astype(jnp.bfloat16)
  out = apply_rope(x, jnp.arange(4), rope_frequencies(8)[0])
  assert out.dtype == jnp.bfloat16


def test_apply_rope_bad_input():
  with pytest.raises(ValueError, match="layout"):
    apply_rope(normal(1, 2, 1, 4), jnp.arange(2), jnp.ones(2), layout="neox")
  with pytest.raises(ValueError, match="inv_freq"):
    apply_rope(normal(1, 2, 1, 4), jnp.arange(2), jnp.ones(3))


@pytest.mark.parametrize("head_dim, pct, expected", [(64, 1.0, 64), (64, 0.25, 16), (10, 0.4, 4)])
def test_rotary_dim_is_int_of_head_dim_times_pct(head_dim, pct, expected):
  assert rotary_dim_for(head_dim, pct) == expected


@pytest.mark.parametrize("pct", [0.0, 1.5, 0.01])
def test_bad_rotary_pct(pct):
  with pytest.raises(ValueError, match="rotary_pct"):
    rotary_dim_for(64, pct)


@pytest.mark.parametrize("head_dim, pct", [(10, 0.5), (5, 1.0), (3, 0.5)])
def test_odd_or_too_small_rotated_part_is_rejected_naming_head_dim(head_dim, pct):
  with pytest.raises(ValueError, match=r"^model\.head_dim="):
    rotary_dim_for(head_dim, pct)


def pe_config(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(
    name="rope",
    rope_base=10000.0,
    rope_scaling="",
    rope_layout="half",
    rotary_pct=1.0,
    train_len=8,
    xpos_gamma=512.0,
  )
  return ml_collections.ConfigDict(dict(cfg, **overrides))


def test_registry_builds_rope_matching_apply_rope():
  cfg = pe_config(rope_layout="interleaved", rotary_pct=0.5)
  enc = build_encoding(cfg, num_heads=2, head_dim=8, model_dim=16, rngs=nnx.Rngs(0))
  assert isinstance(enc, RoPE) and not enc.has_bias
  x, pos = normal(2, 6, 2, 8), jnp.asarray(RNG.integers(0, 99, size=(2, 6)))
  want = apply_rope(x, pos, rope_frequencies(4)[0], layout="interleaved")
  q_rot = enc.rotate(x, pos, is_query=True)
  np.testing.assert_allclose(q_rot, want, atol=1e-6)
  np.testing.assert_array_equal(q_rot, enc.rotate(x, pos, is_query=False))


def test_module_dynamic_uses_train_len_and_static_length_under_jit():
  cfg = pe_config(rope_scaling='{"rope_type": "dynamic", "factor": 2.0}')
  enc = build_encoding(cfg, num_heads=1, head_dim=8, model_dim=8, rngs=nnx.Rngs(0))
  x = normal(1, 16, 1, 8)
  pos = jnp.arange(16)[None]
  scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}
  inv_freq, _ = rope_frequencies(8, scaling=parse_rope_scaling(scaling), seq_len=16)
  graph, state = nnx.split(enc)
  jitted = jax.jit(lambda s, x, p: nnx.merge(graph, s).rotate(x, p, is_query=True))
  np.testing.assert_allclose(jitted(state, x, pos), apply_rope(x, pos, inv_freq), atol=1e-6)
  short = apply_rope(x[:, :8], pos[:, :8], rope_frequencies(8)[0])
  np.testing.assert_allclose(jitted(state, x[:, :8], pos[:, :8]), short, atol=1e-6)


def test_module_validates_scaling_at_build_time():
  bad = pe_config(
    rope_scaling='{"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0], '
    '"long_factor": [1.0]}'
  )
  with pytest.raises(ValueError, match="short_factor"):
    build_encoding(bad, num_heads=1, head_dim=8, model_dim=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="layout"):
    build_encoding(
      pe_config(rope_layout="neox"), num_heads=1, head_dim=8, model_dim=8, rngs=nnx.Rngs(0)
    )


def test_module_parses_rope_scaling_once(monkeypatch):
  cfg = pe_config(rope_scaling='{"rope_type": "dynamic", "factor": 2.0}')
  enc = build_encoding(cfg, num_heads=1, head_dim=8, model_dim=8, rngs=nnx.Rngs(0))
  assert isinstance(enc.scaling, RopeScaling) and enc.scaling.original_max_position_embeddings == 8

  def parse_again(*args, **kwargs):
    raise AssertionError("rope_scaling parsed again after the module was built")

  monkeypatch.setattr(rope_lib, "parse_rope_scaling", parse_again)
  monkeypatch.setattr(rope_scaling_lib, "parse_rope_scaling", parse_again)
  inv_freq, _ = enc.frequencies(16)
  want, _ = rope_frequencies(8, scaling=RopeScaling("dynamic", 2.0, 8), seq_len=16)
  np.testing.assert_array_equal(inv_freq, want)
