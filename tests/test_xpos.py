"""xPos: ζ closed form, relative-position property, decay with distance, no overflow."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pe_research.encodings.registry import build_encoding
from pe_research.encodings.rope import apply_rope, interleaved_to_half
from pe_research.encodings.rope_scaling import rope_frequencies
from pe_research.encodings.xpos import XPos, xpos_zeta
from pe_research.encodings.xpos import apply_xpos as _apply_xpos

RNG = np.random.default_rng(0)
# One compile per shape instead of one per primitive: keeps the file fast on 2 CPU cores.
apply_xpos = jax.jit(_apply_xpos, static_argnames=("is_query", "gamma", "layout"))


def normal(*shape) -> jnp.ndarray:
  return jnp.asarray(RNG.standard_normal(shape, dtype=np.float32))


def pair_score(q_E, k_E, inv_freq, m, n, *, gamma, layout="half") -> float:
  """q at position m against k at position n, both rotated with the row positions [m, n]."""
  pos = jnp.array([m, n])
  q_2x1xE = jnp.broadcast_to(q_E, (2, 1, q_E.shape[-1]))
  k_2x1xE = jnp.broadcast_to(k_E, (2, 1, k_E.shape[-1]))
  q_rot = apply_xpos(q_2x1xE, pos, inv_freq, is_query=True, gamma=gamma, layout=layout)
  k_rot = apply_xpos(k_2x1xE, pos, inv_freq, is_query=False, gamma=gamma, layout=layout)
  return float(jnp.sum(q_rot[0] * k_rot[1]))


def test_zeta_closed_form():
  np.testing.assert_allclose(xpos_zeta(4), [1.6 / 5.6, 3.6 / 5.6], rtol=1e-6)


def test_single_pair_closed_form():
  # D = 2: score = |q||k| cos((m − n)θ) ζ_0^((m − n)/γ) for q = k = e_0, ζ_0 = 0.8/2.8.
  e0 = jnp.array([1.0, 0.0])
  got = pair_score(e0, e0, jnp.array([0.1]), 30, 10, gamma=16.0)
  np.testing.assert_allclose(got, np.cos(2.0) * (0.8 / 2.8) ** (20 / 16), rtol=1e-5)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_score_depends_only_on_relative_position(layout):
  q_E, k_E = normal(8), normal(8)
  inv_freq, _ = rope_frequencies(8, base=100.0)
  for delta in (0, 4, 9):
    scores = [
      pair_score(q_E, k_E, inv_freq, n + delta, n, gamma=32.0, layout=layout) for n in (0, 7, 50)
    ]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-5)


def test_score_decays_with_distance():
  ones = jnp.ones(8)
  scores = [pair_score(ones, ones, jnp.zeros(4), d, 0, gamma=8.0) for d in range(0, 40, 4)]
  assert np.all(np.diff(scores) < 0)
  want = [2 * np.sum(np.asarray(xpos_zeta(8)) ** (d / 8.0)) for d in range(0, 40, 4)]
  np.testing.assert_allclose(scores, want, rtol=1e-5)


def test_far_positions_do_not_overflow():
  # Uncentred, ζ_0^(p/γ) at p = 10^6, γ = 512 is exp(−2446): 0 for q and inf for k.
  ones = jnp.ones(8)
  near = pair_score(ones, ones, jnp.zeros(4), 25, 5, gamma=512.0)
  far = pair_score(ones, ones, jnp.zeros(4), 1_000_025, 1_000_005, gamma=512.0)
  assert np.isfinite(far)
  np.testing.assert_allclose(far, near, rtol=1e-5)


def test_layouts_agree_after_qk_permutation_and_tail_untouched():
  x, pos = normal(2, 5, 3, 10), jnp.asarray(RNG.integers(0, 40, size=(2, 5)))
  inv_freq, _ = rope_frequencies(6)
  for is_query in (True, False):
    inter = apply_xpos(x, pos, inv_freq, is_query=is_query, gamma=8.0, layout="interleaved")
    half = apply_xpos(interleaved_to_half(x, 6), pos, inv_freq, is_query=is_query, gamma=8.0)
    np.testing.assert_allclose(interleaved_to_half(inter, 6), half, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(inter[..., 6:], x[..., 6:])


def test_query_scaled_up_key_scaled_down_relative_to_rope():
  x, pos, inv_freq = normal(1, 4, 1, 4), jnp.arange(4)[None], jnp.array([0.2, 0.02])
  rope = apply_rope(x, pos, inv_freq)
  q = apply_xpos(x, pos, inv_freq, is_query=True, gamma=4.0)
  k = apply_xpos(x, pos, inv_freq, is_query=False, gamma=4.0)
  np.testing.assert_allclose(q * k, rope * rope, rtol=1e-5, atol=1e-6)  # scales cancel
  # Row positions 0..3, centre 1: position 3 is 2/γ past the centre, so q shrinks there (ζ < 1).
  assert np.all(np.abs(q[0, 3]) < np.abs(rope[0, 3]))


def test_registry_builds_xpos():
  cfg = ml_collections.ConfigDict(
    dict(
      name="xpos",
      rope_base=10000.0,
      rope_scaling="",
      rope_layout="half",
      rotary_pct=1.0,
      train_len=16,
      xpos_gamma=64.0,
    )
  )
  enc = build_encoding(cfg, num_heads=2, head_dim=8, model_dim=16, rngs=nnx.Rngs(0))
  assert isinstance(enc, XPos) and enc.gamma == 64.0
  x, pos = normal(2, 6, 2, 8), jnp.broadcast_to(jnp.arange(6), (2, 6))
  want = apply_xpos(x, pos, rope_frequencies(8)[0], is_query=False, gamma=64.0)
  np.testing.assert_allclose(enc.rotate(x, pos, is_query=False), want, atol=1e-6)
  with pytest.raises(ValueError, match="xpos_gamma"):
    XPos(8, gamma=0.0)
