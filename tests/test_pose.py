"""PoSE positions (Zhu et al. 2024): the draw's invariants, the wrapper around any encoding,
training a tiny model with it, and its config validation."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from configs.base import get_config
from pe_research import config_lib, sharding, train
from pe_research.data import make_train_iterator
from pe_research.encodings.alibi import ALiBi
from pe_research.encodings.base import sequential_positions
from pe_research.encodings.pose import PoSEPositions, pose, pose_positions
from pe_research.encodings.registry import build_encoding


def _build(name, **overrides):
  pe = get_config().pe
  pe.update(name=name, **overrides)
  return build_encoding(pe, num_heads=4, head_dim=8, model_dim=16, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("chunks", [2, 3, 32])
def test_pose_positions_are_chunks_of_consecutive_positions_within_target(chunks):
  pos_BxL = np.asarray(pose_positions(jax.random.key(0), 64, 32, 256, chunks))
  assert pos_BxL.dtype == np.int32 and pos_BxL.shape == (64, 32)
  step_BxL = np.diff(pos_BxL, axis=1)
  assert (step_BxL > 0).all()  # Strictly increasing.
  assert (pos_BxL[:, 0] == 0).all() and pos_BxL.max() < 256  # u_0 = 0; last < L_t.
  # Inside a chunk the original distances: steps of 1 except at most N-1 chunk boundaries.
  assert ((step_BxL > 1).sum(axis=1) <= chunks - 1).all()
  assert (step_BxL > 1).any()  # Some rows really skip.
  assert len({tuple(row) for row in pos_BxL}) > 32  # Each row has its own draw.


def test_pose_positions_are_deterministic_per_key():
  a, b = (pose_positions(jax.random.key(3), 4, 16, 100, 2) for _ in range(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, pose_positions(jax.random.key(4), 4, 16, 100, 2))


def test_pose_positions_cover_the_target_length():
  last_B = np.asarray(pose_positions(jax.random.key(1), 1024, 32, 256, 2))[:, -1]
  # u_1 ~ U{0..L_t-L_c}: the last position ranges over [L_c-1, L_t-1], both ends reached.
  assert last_B.max() >= 256 - 4 and last_B.min() <= 32 + 4
  pos_BxL = np.asarray(pose_positions(jax.random.key(2), 512, 32, 64, 2))
  split_B = np.argmax(np.diff(pos_BxL, axis=1) > 1, axis=1)  # 0 where u_1 = 0 (no skip).
  assert len(set(split_B.tolist())) > 16  # The split point varies over the window.


def test_official_first_chunk_is_at_most_half_the_window_and_uniform_is_not():
  """The official code's c_1 ~ U{1..(L_c+1)//2}; the uniform split reaches past the half."""
  first_B = {}
  for mode in ("official", "uniform"):
    pos_BxL = np.asarray(pose_positions(jax.random.key(5), 2048, 33, 4096, 2, mode))
    first_B[mode] = 1 + np.argmax(np.diff(pos_BxL, axis=1) > 1, axis=1)  # u_1 > 0 here
  assert first_B["official"].min() == 1 and first_B["official"].max() == 17
  assert first_B["uniform"].max() > 17  # Must differ: the uniform draw is not the official one.
  with pytest.raises(ValueError, match="pe.pose_chunks=3"):
    pose_positions(jax.random.key(0), 1, 9, 64, 3, "official")


@pytest.mark.parametrize(("chunks", "target_len"), [(1, 16), (1, 200), (4, 16)])
def test_pose_without_room_or_with_one_chunk_is_sequential(chunks, target_len):
  pos_BxL = pose_positions(jax.random.key(0), 3, 16, target_len, chunks)
  np.testing.assert_array_equal(pos_BxL, sequential_positions(3, 16))


def test_pose_positions_reject_bad_lengths():
  with pytest.raises(ValueError, match="pe.pose_target_len=8"):
    pose_positions(jax.random.key(0), 1, 9, 8, 2)
  with pytest.raises(ValueError, match="pe.pose_chunks=10"):
    pose_positions(jax.random.key(0), 1, 9, 64, 10)


def test_pose_wrapper_draws_in_training_and_is_sequential_in_evaluation():
  enc = _build("alibi", pose_target_len=256)
  assert isinstance(enc, PoSEPositions) and isinstance(enc.base, ALiBi)
  assert enc.has_bias and enc.max_length is None
  train_BxL = np.asarray(enc.positions(4, 16, train=True))
  assert train_BxL.shape == (4, 16) and train_BxL.max() < 256
  assert not (train_BxL == np.arange(16)).all()
  np.testing.assert_array_equal(enc.positions(4, 16, train=False), sequential_positions(1, 16))
  np.testing.assert_array_equal(enc.bias(train_BxL, train_BxL), enc.base.bias(train_BxL, train_BxL))


def test_pose_draw_is_model_state_and_advances():
  first, second = (_build("rope", pose_target_len=100) for _ in range(2))
  np.testing.assert_array_equal(
    first.positions(2, 8, train=True), second.positions(2, 8, train=True)
  )
  draw = nnx.jit(lambda m: m.positions(2, 8, train=True))
  assert not np.array_equal(draw(first), draw(first))


def test_build_encoding_wraps_once_and_only_when_on():
  pe = get_config().pe
  pe.update(name="alibi", pose_target_len=64)
  enc = build_encoding(pe, num_heads=4, head_dim=8, model_dim=16, rngs=nnx.Rngs(0))
  assert pose(pe, enc, rngs=nnx.Rngs(1)) is enc
  assert isinstance(_build("alibi"), ALiBi)  # pe.pose_target_len=0: no wrapper.


def test_pose_wrapper_rejects_randomized_and_a_short_learned_table():
  with pytest.raises(ValueError, match="pe.pose_target_len=64 is invalid with pe.randomized"):
    _build("rope", pose_target_len=64, randomized=True, max_random_len=64)
  with pytest.raises(ValueError, match="pe.pose_target_len=64 exceeds"):
    _build("learned", max_len=32, pose_target_len=64)


@pytest.mark.parametrize("name", ["rope", "alibi"])
def test_tiny_byte_model_trains_with_pose_and_evaluates_sequentially(name):
  config = tiny.get_config(f"pe={name}")
  config.pe.pose_target_len = 4 * config.train.seq_len
  config_lib.validate(config, device_count=jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = train.make_optimizer(config.train)
  graphdef, state = train.create_train_state(config, mesh, tx)
  step_fn = train.jit_train_step(graphdef, tx, schedule, state, mesh)
  data = make_train_iterator(config)
  losses = []
  for _ in range(2):
    state, metrics = step_fn(state, sharding.global_batch(next(data), mesh))
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all()
  model = nnx.merge(graphdef, state.params, state.model_state)
  inputs_BxL = np.zeros((2, 2 * config.train.seq_len), np.int32)  # Beyond the training window.
  _, pos_BxL = model.embed_tokens(inputs_BxL, train=False)
  np.testing.assert_array_equal(pos_BxL, sequential_positions(1, 2 * config.train.seq_len))
  _, train_pos_BxL = model.embed_tokens(inputs_BxL[:, : config.train.seq_len], train=True)
  assert train_pos_BxL.shape == (2, config.train.seq_len)
  assert int(train_pos_BxL.max()) < config.pe.pose_target_len
  assert np.isfinite(np.asarray(model(inputs_BxL, train=False))).all()


def _pose_config(**pe):
  config = tiny.get_config()  # train.seq_len = 32
  config.pe.update(pe)
  return config


@pytest.mark.parametrize(
  ("pe", "field"),
  [
    ({"pose_target_len": 16}, "pe.pose_target_len"),
    ({"pose_target_len": -1}, "pe.pose_target_len"),
    ({"pose_target_len": 64, "randomized": True}, "pe.pose_target_len"),
    ({"pose_chunks": 0}, "pe.pose_chunks"),
    ({"pose_target_len": 64, "pose_chunks": 33}, "pe.pose_chunks"),
    ({"pose_target_len": 64, "pose_chunks": 3, "pose_first_chunk": "official"}, "pe.pose_chunks"),
    ({"pose_first_chunk": "halves"}, "pe.pose_first_chunk"),
    ({"name": "learned", "max_len": 128, "pose_target_len": 256}, "pe.max_len"),
  ],
)
def test_invalid_pose_config_is_one_line_error_naming_the_field(pe, field):
  with pytest.raises(ValueError, match=re.escape(field)) as error:
    config_lib.validate(_pose_config(**pe), device_count=8)
  assert "\n" not in str(error.value) and "allowed" in str(error.value)


def test_valid_pose_configs_pass():
  config_lib.validate(_pose_config(pose_target_len=32, pose_chunks=32), device_count=8)
  config_lib.validate(_pose_config(pose_target_len=64, pose_first_chunk="official"), device_count=8)
  config_lib.validate(
    _pose_config(name="learned", max_len=128, pose_target_len=128), device_count=8
  )
