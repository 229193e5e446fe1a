"""Attention-logit biases: ALiBi, T5, KERPLE, FIRE (closed forms, properties, blockwise use)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import get_config
from pe_research import backend
from pe_research.encodings import t5 as t5_lib
from pe_research.encodings.alibi import ALiBi, alibi_bias, alibi_slopes
from pe_research.encodings.fire import Fire, fire_normalized_distance
from pe_research.encodings.kerple import Kerple, kerple_bias, project_kerple
from pe_research.encodings.randomized import random_sorted_positions
from pe_research.encodings.registry import build_encoding, encoding_names
from pe_research.encodings.t5 import T5RelativeBias, t5_relative_position_bucket

NUM_HEADS = 4
POS_1xL = jnp.arange(10)[None, :]


def _build(name, **overrides):
  pe = get_config().pe
  pe.update(dict(name=name, **overrides))
  return build_encoding(pe, num_heads=NUM_HEADS, head_dim=8, model_dim=16, rngs=nnx.Rngs(0))


def _distance(q_pos_BxQ, k_pos_BxK):
  return np.asarray(q_pos_BxQ)[:, None, :, None] - np.asarray(k_pos_BxK)[:, None, None, :]


# ALiBi ----------------------------------------------------------------------------------------


def test_alibi_slopes_closed_form_for_eight_heads():
  np.testing.assert_allclose(alibi_slopes(8), [2.0**-k for k in range(1, 9)], rtol=0)


@pytest.mark.parametrize("n", [1, 2, 4, 16, 32, 64])
def test_alibi_slopes_geometric_for_powers_of_two(n):
  slopes = alibi_slopes(n)
  assert slopes.dtype == jnp.float32 and slopes.shape == (n,)
  slopes, ratio = np.asarray(slopes, np.float64), 2.0 ** (-8.0 / n)
  np.testing.assert_allclose(slopes[0], ratio, rtol=1e-6)
  np.testing.assert_allclose(slopes[1:] / slopes[:-1], ratio, rtol=1e-5)


def test_alibi_slopes_six_heads_reference_case():
  np.testing.assert_array_equal(alibi_slopes(6), [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125])


def test_alibi_slopes_twelve_heads_interleave_the_next_power():
  want = [2.0 ** (-k) for k in range(1, 9)] + [2.0 ** (-k / 2) for k in (1, 3, 5, 7)]
  np.testing.assert_allclose(alibi_slopes(12), want, rtol=1e-6)


@pytest.mark.parametrize("n", [0, -3])
def test_alibi_rejects_fewer_than_one_head(n):
  with pytest.raises(ValueError, match="num_heads"):
    alibi_slopes(n)
  with pytest.raises(ValueError, match="num_heads"):
    ALiBi(n)


def test_alibi_bias_is_minus_slope_times_distance():
  enc = _build("alibi")
  got = enc.bias(POS_1xL, POS_1xL)
  assert enc.has_bias and got.dtype == jnp.float32 and got.shape == (1, NUM_HEADS, 10, 10)
  want = -np.asarray(alibi_slopes(NUM_HEADS))[None, :, None, None] * _distance(POS_1xL, POS_1xL)
  np.testing.assert_allclose(got, want, rtol=1e-6)


# T5 -------------------------------------------------------------------------------------------

# (relative_position = key − query, bidirectional, expected bucket), num_buckets=32,
# max_distance=128, computed by hand from the closed form in formulas.md.
T5_CASES = [
  (0, False, 0),
  (-1, False, 1),
  (-15, False, 15),
  (-16, False, 16),
  (-32, False, 21),  # 16 + int(ln 2 / ln 8 · 16) = 16 + 5
  (-64, False, 26),  # 16 + int(2/3 · 16)
  (-127, False, 31),
  (-5000, False, 31),
  (7, False, 0),  # Causal: keys after the query share bucket 0.
  (-3, True, 3),
  (3, True, 19),  # 16 + 3
  (8, True, 24),  # 16 + 8
  (-20, True, 10),  # 8 + int(ln 2.5 / ln 16 · 8)
  (100, True, 31),  # 16 + 8 + int(ln 12.5 / ln 16 · 8) = 16 + 15
  (-200, True, 15),
]


@pytest.mark.parametrize("rel, bidirectional, want", T5_CASES)
def test_t5_bucket_closed_form(rel, bidirectional, want):
  got = t5_relative_position_bucket(jnp.array(rel), bidirectional=bidirectional)
  assert got.dtype == jnp.int32 and int(got) == want


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 1000)])
def test_t5_buckets_monotone_in_distance(bidirectional, num_buckets, max_distance):
  n = jnp.arange(0, 3000)
  kw = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
  past = np.asarray(t5_relative_position_bucket(-n, **kw))
  assert (np.diff(past) >= 0).all() and past.min() == 0 and past.max() < num_buckets
  if bidirectional:
    future = np.asarray(t5_relative_position_bucket(n[1:], **kw))
    assert (np.diff(future) >= 0).all() and future.min() == num_buckets // 2 + 1  # rel = +1.
    assert future.max() == num_buckets - 1


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(bidirectional=True, num_buckets=32, max_distance=8), "t5_max_distance"),
    (dict(bidirectional=True, num_buckets=7, max_distance=128), "t5_num_buckets"),
    (dict(bidirectional=False, num_buckets=1, max_distance=128), "t5_num_buckets"),
  ],
)
def test_t5_rejects_bad_bucket_settings(kw, match):
  with pytest.raises(ValueError, match=match):
    t5_relative_position_bucket(jnp.array(0), **kw)


def test_t5_bias_gathers_one_scalar_per_bucket_and_head():
  enc = _build("t5", t5_num_buckets=8, t5_max_distance=20)
  assert isinstance(enc, T5RelativeBias) and enc.table[...].shape == (8, NUM_HEADS)
  got = enc.bias(POS_1xL, POS_1xL)
  assert got.dtype == jnp.float32 and got.shape == (1, NUM_HEADS, 10, 10)
  buckets = t5_relative_position_bucket(
    POS_1xL[0][None, :] - POS_1xL[0][:, None], bidirectional=False, num_buckets=8, max_distance=20
  )
  np.testing.assert_array_equal(
    got[0], np.asarray(enc.table[...])[np.asarray(buckets)].transpose(2, 0, 1)
  )


def test_t5_bias_matmul_and_gather_lookups_agree(monkeypatch):
  """Small calls look the table up by a one-hot matmul, large ones gather: same values and
  same table gradient (per-row positions, batch 2)."""
  table_ZxH = jax.random.normal(jax.random.key(0), (8, NUM_HEADS))
  q_pos_BxQ = jnp.array([[0, 3, 7, 40], [5, 6, 9, 90]])
  k_pos_BxK = jnp.array([[0, 1, 2, 3, 30], [4, 5, 70, 80, 90]])
  kw = dict(bidirectional=False, num_buckets=8, max_distance=20)
  cotangent = jax.random.normal(jax.random.key(1), (2, NUM_HEADS, 4, 5))

  def value_and_grad():
    f = lambda t: jnp.sum(t5_lib.t5_bias(q_pos_BxQ, k_pos_BxK, t, **kw) * cotangent)
    return t5_lib.t5_bias(q_pos_BxQ, k_pos_BxK, table_ZxH, **kw), jax.grad(f)(table_ZxH)

  by_matmul = value_and_grad()
  monkeypatch.setattr(backend, "LOOKUP_MAX", 0)
  t5_lib.t5_bias.clear_cache()
  by_gather = value_and_grad()
  t5_lib.t5_bias.clear_cache()
  np.testing.assert_array_equal(by_matmul[0], by_gather[0])
  np.testing.assert_allclose(by_matmul[1], by_gather[1], rtol=1e-6, atol=1e-6)


# KERPLE ---------------------------------------------------------------------------------------


def test_kerple_log_at_init_matches_formula_and_reference_ranges():
  enc = _build("kerple", kerple_variant="log")
  r1, r2 = np.asarray(enc.r1[...]), np.asarray(enc.r2[...])
  assert r1.shape == r2.shape == (NUM_HEADS,)
  assert (r1 >= 0).all() and (r1 < 2).all() and (r2 >= 0).all() and (r2 < 1).all()
  got = enc.bias(POS_1xL, POS_1xL)
  assert got.dtype == jnp.float32 and got.shape == (1, NUM_HEADS, 10, 10)
  d = np.maximum(_distance(POS_1xL, POS_1xL), 0)
  r1c, r2c = (np.maximum(r, 1e-2)[None, :, None, None] for r in (r1, r2))
  np.testing.assert_allclose(got, -r1c * np.log1p(r2c * d), rtol=1e-5, atol=1e-6)


def test_kerple_power_at_init_matches_formula():
  enc = _build("kerple", kerple_variant="power")
  r1, r2 = np.asarray(enc.r1[...]), np.asarray(enc.r2[...])
  assert (r1 < 1).all() and (r2 < 2).all()
  d = np.maximum(_distance(POS_1xL, POS_1xL), 0)
  r1c, r2c = (np.maximum(r, 1e-2)[None, :, None, None] for r in (r1, r2))
  np.testing.assert_allclose(enc.bias(POS_1xL, POS_1xL), -r1c * d**r2c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_decreases_with_distance_at_init(variant):
  enc = Kerple(8, variant=variant, rngs=nnx.Rngs(3))
  q_pos_1x1, k_pos_1xK = jnp.array([[300]]), jnp.arange(300, -1, -1)[None, :]
  row_HxK = np.asarray(enc.bias(q_pos_1x1, k_pos_1xK))[0, :, 0, :]  # Distance 0 .. 300.
  assert (row_HxK[:, 0] == 0).all() and (np.diff(row_HxK, axis=1) < 0).all()


def test_kerple_projection_clamps_parameters_into_their_bounds():
  # Was test_kerple_clamps_parameters: the bounds moved from the forward pass (which froze a
  # parameter below its bound: zero gradient) to a projection after each step (issue #20).
  r1, r2 = project_kerple(jnp.array([-1.0, 0.5]), jnp.array([-5.0, 5.0]), "log")
  np.testing.assert_allclose(r1, [1e-2, 0.5])
  np.testing.assert_allclose(r2, [1e-2, 5.0])
  _, r2 = project_kerple(jnp.array([0.5]), jnp.array([5.0]), "power")
  np.testing.assert_allclose(r2, [2.0])
  enc = Kerple(2, variant="power", rngs=nnx.Rngs(0))
  enc.r1[...], enc.r2[...] = jnp.array([-1.0, 0.5]), jnp.array([0.0, 3.0])
  enc.project()
  np.testing.assert_allclose(enc.r1[...], [1e-2, 0.5])
  np.testing.assert_allclose(enc.r2[...], [1e-2, 2.0])


def test_kerple_forward_uses_parameters_as_is():
  d_K = np.array([0, 1, 4])
  q_1x1, k_1xK = jnp.array([[4]]), jnp.asarray(4 - d_K)[None, :]
  log = kerple_bias(q_1x1, k_1xK, jnp.array([1e-3]), jnp.array([1e-3]), variant="log")
  np.testing.assert_allclose(log[0, 0, 0], -1e-3 * np.log1p(1e-3 * d_K), rtol=1e-5)
  power = kerple_bias(q_1x1, k_1xK, jnp.array([0.5]), jnp.array([3.0]), variant="power")
  np.testing.assert_allclose(power[0, 0, 0], [0.0, -0.5, -32.0], rtol=1e-6)


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_parameters_below_the_bound_get_a_gradient(variant):
  def total(r1, r2):
    return kerple_bias(POS_1xL, POS_1xL, r1, r2, variant=variant).sum()

  grad_r1, grad_r2 = jax.grad(total, argnums=(0, 1))(jnp.full((2,), 1e-3), jnp.full((2,), 1e-3))
  assert (np.abs(grad_r1) > 0).all() and (np.abs(grad_r2) > 0).all()


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_gradients_are_finite_including_masked_entries(variant):
  def total(r1, r2):
    return kerple_bias(POS_1xL, POS_1xL, r1, r2, variant=variant).sum()

  grads = jax.grad(total, argnums=(0, 1))(jnp.full((2,), 0.5), jnp.full((2,), 0.5))
  assert all(np.isfinite(g).all() for g in grads)


def test_kerple_rejects_unknown_variant():
  with pytest.raises(ValueError, match="log, power"):
    _build("kerple", kerple_variant="exp")


# FIRE -----------------------------------------------------------------------------------------


def test_fire_normalized_distance_closed_form():
  q_pos_1x2, k_pos_1x3 = jnp.array([[10, 1000]]), jnp.array([[0, 10, 40]])
  got = fire_normalized_distance(q_pos_1x2, k_pos_1x3, jnp.array(0.1), jnp.array(512.0))

  def psi(x):
    return math.log(0.1 * x + 1)

  want = [
    [psi(10) / psi(512), 0.0, 0.0],  # Query 10 < L_thr: normalised by ψ(L_thr).
    [psi(1000) / psi(1000), psi(990) / psi(1000), psi(960) / psi(1000)],
  ]
  np.testing.assert_allclose(got[0], want, rtol=1e-5)


def test_fire_at_init_shape_zero_diagonal_and_mlp_formula():
  enc = _build("fire", fire_hidden=16, fire_c_init=0.2, fire_l_thr_init=64.0)
  assert isinstance(enc, Fire) and float(enc.threshold()) == 64.0 and enc.c[...] == np.float32(0.2)
  got = enc.bias(POS_1xL, POS_1xL)
  assert got.dtype == jnp.float32 and got.shape == (1, NUM_HEADS, 10, 10)
  # Zero-initialised MLP biases: MLP(0) = 0, so distance 0 (and masked j > i) gets no bias.
  np.testing.assert_allclose(np.diagonal(got[0], axis1=1, axis2=2), 0.0, atol=1e-7)
  x = np.asarray(fire_normalized_distance(POS_1xL, POS_1xL, 0.2, 64.0))[..., None]
  w1, w2 = np.asarray(enc.hidden.kernel[...]), np.asarray(enc.out.kernel[...])
  want = np.maximum(x @ w1, 0.0) @ w2
  np.testing.assert_allclose(got, want.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-6)


# Every bias encoding --------------------------------------------------------------------------

BIAS_ENCODINGS = [
  ("alibi", {}),
  ("t5", dict(t5_num_buckets=8, t5_max_distance=20)),
  ("kerple", dict(kerple_variant="log")),
  ("kerple", dict(kerple_variant="power")),
  ("fire", dict(fire_l_thr_init=16.0)),
]


def test_every_bias_encoding_in_the_registry_is_in_bias_encodings():
  with_bias = {name for name in encoding_names() if _build(name).has_bias}
  assert with_bias == {name for name, _ in BIAS_ENCODINGS}


@pytest.mark.parametrize("name, overrides", BIAS_ENCODINGS)
def test_bias_per_block_equals_slice_of_full_bias(name, overrides):
  enc = _build(name, **overrides)
  pos_BxL = random_sorted_positions(jax.random.key(0), 2, 12, 40)  # Not 0..L-1 on purpose.
  full = np.asarray(enc.bias(pos_BxL, pos_BxL))
  assert full.shape == (2, NUM_HEADS, 12, 12) and full.dtype == np.float32
  for q0, k0 in [(0, 0), (4, 0), (8, 4), (8, 8)]:
    block = enc.bias(pos_BxL[:, q0 : q0 + 4], pos_BxL[:, k0 : k0 + 4])
    np.testing.assert_allclose(block, full[:, :, q0 : q0 + 4, k0 : k0 + 4], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, overrides", BIAS_ENCODINGS)
def test_relative_bias_is_translation_invariant(name, overrides):
  enc = _build(name, **overrides)
  pos_BxL = jnp.stack([jnp.arange(6), jnp.arange(6) + 3])  # Row 1 shifted: same distances.
  got = np.asarray(enc.bias(pos_BxL, pos_BxL))
  if name == "fire":  # FIRE also depends on the query position through max(L_thr, i).
    np.testing.assert_allclose(got[0], got[1], atol=1e-6)  # i < L_thr here, so no change.
  else:
    np.testing.assert_array_equal(got[0], got[1])


def test_alibi_bias_function_accepts_explicit_slopes():
  got = alibi_bias(jnp.array([[5]]), jnp.array([[5, 3, 0]]), jnp.array([1.0, 0.5]))
  np.testing.assert_array_equal(got[0, :, 0], [[0, -2, -5], [0, -1, -2.5]])
