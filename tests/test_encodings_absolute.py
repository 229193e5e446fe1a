"""Absolute encodings: sinusoidal, learned, NoPE, and randomized positions around any base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import get_config
from pe_research.encodings.alibi import ALiBi
from pe_research.encodings.base import sequential_positions
from pe_research.encodings.learned import LearnedAbsolute
from pe_research.encodings.nope import NoPE
from pe_research.encodings.randomized import (
  RandomizedPositions,
  random_sorted_positions,
  randomize,
)
from pe_research.encodings.registry import build_encoding
from pe_research.encodings.sinusoidal import Sinusoidal, sinusoidal


def _pe_cfg(**overrides):
  pe = get_config().pe
  pe.update(overrides)
  return pe


def _build(name, **overrides):
  pe = _pe_cfg(name=name, **overrides)
  return build_encoding(pe, num_heads=4, head_dim=8, model_dim=16, rngs=nnx.Rngs(0))


def _closed_form_sinusoidal(pos, dim, base):
  theta = base ** (-2.0 * np.arange(dim // 2) / dim)
  angle = np.asarray(pos, np.float64)[..., None] * theta
  return np.sin(angle), np.cos(angle)


POSITIONS = np.array([[0, 1, 5, 100], [7, 2047, 3, 64]])


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_sinusoidal_concat_is_sin_then_cos(base):
  sin, cos = _closed_form_sinusoidal(POSITIONS, 12, base)
  got = sinusoidal(POSITIONS, 12, base=base, layout="concat")
  assert got.dtype == jnp.float32 and got.shape == (2, 4, 12)
  np.testing.assert_allclose(got, np.concatenate([sin, cos], -1), atol=2e-4)


def test_sinusoidal_interleaved_alternates_sin_cos():
  sin, cos = _closed_form_sinusoidal(POSITIONS, 12, 10000.0)
  got = np.asarray(sinusoidal(POSITIONS, 12, layout="interleaved"))
  np.testing.assert_allclose(got[..., 0::2], sin, atol=2e-4)
  np.testing.assert_allclose(got[..., 1::2], cos, atol=2e-4)


def test_sinusoidal_position_zero_is_zeros_then_ones():
  np.testing.assert_array_equal(sinusoidal(jnp.array(0), 6), [0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("dim", [7, 0])
def test_sinusoidal_rejects_odd_or_empty_dim(dim):
  with pytest.raises(ValueError, match="dim"):
    sinusoidal(POSITIONS, dim)


def test_sinusoidal_rejects_unknown_layout():
  with pytest.raises(ValueError, match="concat, interleaved"):
    Sinusoidal(8, layout="half")


def test_sinusoidal_module_adds_table_to_embeddings():
  enc = _build("sinusoidal", sinusoidal_layout="interleaved", sinusoidal_base=100.0)
  x_BxLxD = jnp.ones((2, 4, 16))
  want = 1.0 + sinusoidal(POSITIONS, 16, base=100.0, layout="interleaved")
  np.testing.assert_allclose(enc.embed(x_BxLxD, POSITIONS), want, atol=1e-6)
  assert not enc.has_bias and enc.max_length is None


def test_learned_embeds_table_rows():
  enc = _build("learned", max_len=8)
  pos_BxL = jnp.array([[0, 3, 7]])
  got = enc.embed(jnp.zeros((1, 3, 16)), pos_BxL)
  np.testing.assert_array_equal(got[0], enc.table[...][jnp.array([0, 3, 7])])
  assert enc.max_length == 8


def test_learned_sequence_longer_than_table_raises_at_trace_time():
  enc = LearnedAbsolute(8, 16, rngs=nnx.Rngs(0))
  pos_BxL = sequential_positions(1, 9)
  with pytest.raises(ValueError, match=r"length 9 exceeds pe.max_len=8"):
    enc.embed(jnp.zeros((1, 9, 16)), pos_BxL)
  with pytest.raises(ValueError, match="pe.max_len"):
    jax.jit(enc.embed)(jnp.zeros((1, 9, 16)), pos_BxL)


def test_learned_position_beyond_table_is_nan_not_clamped():
  enc = LearnedAbsolute(8, 16, rngs=nnx.Rngs(0))
  got = enc.embed(jnp.zeros((1, 3, 16)), jnp.array([[6, 7, 8]]))
  assert np.isfinite(got[0, :2]).all() and np.isnan(got[0, 2]).all()


def test_nope_is_identity():
  enc = _build("nope")
  x_BxLxD = jnp.arange(32.0).reshape(1, 2, 16)
  np.testing.assert_array_equal(enc.embed(x_BxLxD, sequential_positions(1, 2)), x_BxLxD)
  assert isinstance(enc, NoPE) and enc.bias(POSITIONS, POSITIONS) is None


def test_random_positions_are_sorted_distinct_in_range():
  pos_BxL = np.asarray(random_sorted_positions(jax.random.key(0), 16, 32, 64))
  assert pos_BxL.dtype == np.int32 and pos_BxL.shape == (16, 32)
  assert (np.diff(pos_BxL, axis=1) > 0).all()  # Strictly increasing: sorted and distinct.
  assert pos_BxL.min() >= 0 and pos_BxL.max() < 64
  assert len({tuple(row) for row in pos_BxL}) > 1  # Each row has its own draw.


def test_random_positions_fill_the_range_when_length_equals_max():
  pos_BxL = random_sorted_positions(jax.random.key(1), 2, 10, 10)
  np.testing.assert_array_equal(pos_BxL, sequential_positions(2, 10))


def test_randomized_train_draws_and_sequential_eval_when_asked():
  # pe.randomize_eval=False is now the explicit option (it was the default until evaluation
  # drew positions like training, as Ruoss et al. do).
  enc = _build("alibi", randomized=True, max_random_len=64, randomize_eval=False)
  assert isinstance(enc, RandomizedPositions) and enc.has_bias
  train_BxL = np.asarray(enc.positions(4, 16, train=True))
  assert not (train_BxL == np.arange(16)).all()
  assert (np.diff(train_BxL, axis=1) > 0).all() and train_BxL.max() < 64
  # Evaluation: the sequential positions, one row shared by (broadcast over) the batch.
  np.testing.assert_array_equal(enc.positions(4, 16, train=False), sequential_positions(1, 16))


def test_randomized_eval_draws_positions_like_training_by_default():
  assert get_config().pe.randomize_eval
  enc = _build("alibi", randomized=True, max_random_len=64)
  eval_BxL = np.asarray(enc.positions(4, 16, train=False))
  assert not (eval_BxL == np.arange(16)).all() and (np.diff(eval_BxL, axis=1) > 0).all()
  assert eval_BxL.min() >= 0 and eval_BxL.max() < 64 and enc.max_length == 64


def test_randomized_is_deterministic_given_seed_and_advances():
  first, second = (_build("nope", randomized=True, max_random_len=100) for _ in range(2))
  a1, a2 = first.positions(2, 8, train=True), first.positions(2, 8, train=True)
  b1 = second.positions(2, 8, train=True)
  np.testing.assert_array_equal(a1, b1)
  assert not np.array_equal(a1, a2)


def test_randomized_draw_is_state_under_jit():
  enc = _build("nope", randomized=True, max_random_len=100)
  draw = nnx.jit(lambda m: m.positions(2, 8, train=True))
  assert not np.array_equal(draw(enc), draw(enc))


def test_build_encoding_wraps_once():
  pe = _pe_cfg(name="alibi", randomized=True, max_random_len=64)
  enc = build_encoding(pe, num_heads=4, head_dim=8, model_dim=16, rngs=nnx.Rngs(0))
  assert isinstance(enc, RandomizedPositions) and isinstance(enc.base, ALiBi)
  assert randomize(pe, enc, rngs=nnx.Rngs(1)) is enc
  assert isinstance(_build("alibi"), ALiBi)  # pe.randomized=False: no wrapper.


def test_randomized_delegates_to_base():
  base = ALiBi(4)
  enc = RandomizedPositions(base, max_random_len=32, randomize_eval=False, rngs=nnx.Rngs(0))
  pos_BxL = enc.positions(2, 8, train=True)
  np.testing.assert_array_equal(enc.bias(pos_BxL, pos_BxL), base.bias(pos_BxL, pos_BxL))


def test_randomized_rejects_length_beyond_range():
  enc = _build("nope", randomized=True, max_random_len=8)
  with pytest.raises(ValueError, match="pe.max_random_len=8"):
    enc.positions(1, 9, train=True)


def test_randomized_rejects_range_beyond_learned_table():
  with pytest.raises(ValueError, match="pe.max_random_len=64 exceeds"):
    _build("learned", max_len=32, randomized=True, max_random_len=64)


def test_randomized_learned_embeds_random_positions():
  enc = _build("learned", max_len=64, randomized=True, max_random_len=64)
  pos_BxL = enc.positions(2, 8, train=True)
  got = enc.embed(jnp.zeros((2, 8, 16)), pos_BxL)
  np.testing.assert_array_equal(got, enc.base.table[...][pos_BxL])
