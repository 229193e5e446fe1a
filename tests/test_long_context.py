"""Self-Extend and ReRoPE (a far logit set) and log-n scaling: blockwise = dense = the formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from pe_research import config_lib
from pe_research.attention import attend
from pe_research.encodings.rope import RoPE
from pe_research.model import Transformer

B, H, E = 2, 4, 8
BASE = 10000.0


def _extension(method: str, window: int) -> dict:
  if method == "self_extend":
    return dict(self_extend_window=window, self_extend_group=3)
  return dict(rerope_window=window)


def _raw(length: int, kv_heads: int, seed: int = 0):
  """Unrotated q ``[B, L, H, E]``, k, v ``[B, L, G, E]`` and an output cotangent."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q_shape, kv_shape = (B, length, H, E), (B, length, kv_heads, E)
  shapes = [q_shape, kv_shape, kv_shape, q_shape]
  return [jax.random.normal(key, shape) for key, shape in zip(keys, shapes, strict=True)]


def _rope_attention(enc: RoPE, q, k, v, *, impl: str, block_size: int = 4):
  """Attention as ``model.Attention`` runs it: rotated q, k and, with a window, the far set."""
  pos = jnp.arange(q.shape[1], dtype=jnp.int32)[None]
  q_rot, k_rot = enc.rotate(q, pos, is_query=True), enc.rotate(k, pos, is_query=False)
  far = enc.far_set(q, k, pos)
  return attend(
    q_rot, k_rot, v, q_pos_BxL=pos, k_pos_BxL=pos, impl=impl, block_size=block_size, **far
  )


@functools.cache
def _output_and_grads(method: str, window: int, impl: str, block_size: int):
  enc = RoPE(E, base=BASE, **_extension(method, window))

  def run(q, k, v, dout):
    fn = functools.partial(_rope_attention, enc, impl=impl, block_size=block_size)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(dout)

  return jax.jit(run)


@pytest.mark.parametrize(
  "method,kv_heads,length,block,window",
  [  # 4 blocks (unrolled: near, mixed, far pairs); 10 (lax loops, padded); W < S (mixed diagonal)
    ("self_extend", 2, 16, 4, 6),
    ("rerope", H, 16, 4, 6),
    ("self_extend", H, 38, 4, 6),
    ("rerope", 2, 38, 4, 6),
    ("self_extend", 2, 38, 4, 3),
  ],
)
def test_blockwise_matches_dense_outputs_and_grads(method, kv_heads, length, block, window):
  q, k, v, dout = _raw(length, kv_heads)
  want_out, want_grads = _output_and_grads(method, window, "dense", block)(q, k, v, dout)
  got_out, got_grads = _output_and_grads(method, window, "blockwise", block)(q, k, v, dout)
  np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=1e-5)
  for got, want in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _rope_np(x_E: np.ndarray, position: float) -> np.ndarray:
  """RoPE ("half" layout) of one ``[..., E]`` vector at ``position``, in float64."""
  inv_freq = BASE ** (-np.arange(0, E, 2) / E)
  cos, sin = np.cos(position * inv_freq), np.sin(position * inv_freq)
  a, b = x_E[..., : E // 2], x_E[..., E // 2 :]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _reference(method: str, window: int, group: int, q, k, v) -> np.ndarray:
  """Merged logits built pair by pair from the formulas, one softmax, weighted sum."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  length, r = q.shape[1], H // k.shape[2]
  k, v = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)  # query head h reads KV head h // r
  logits = np.full((B, H, length, length), -np.inf)
  for i in range(length):
    for j in range(i + 1):
      if i - j < window:
        q_pos, k_pos = i, j
      elif method == "self_extend":
        q_pos, k_pos = i // group + window - window // group, j // group
      else:
        q_pos, k_pos = window, 0
      q_rot, k_rot = _rope_np(q[:, i], q_pos), _rope_np(k[:, j], k_pos)
      logits[:, :, i, j] = np.sum(q_rot * k_rot, axis=-1) / np.sqrt(E)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhij,bjhd->bihd", probs, v)


@pytest.mark.parametrize("method", ["self_extend", "rerope"])
@pytest.mark.parametrize("kv_heads", [H, 2])
def test_dense_matches_explicit_merged_logits(method, kv_heads):
  window, length = 5, 17
  q, k, v, _ = _raw(length, kv_heads, seed=1)
  enc = RoPE(E, base=BASE, **_extension(method, window))
  got = _rope_attention(enc, q, k, v, impl="dense")
  want = _reference(method, window, 3, q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["self_extend", "rerope"])
@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_equals_plain_rope_within_window(method, impl):
  length = 12
  q, k, v, _ = _raw(length, 2, seed=2)
  plain = _rope_attention(RoPE(E, base=BASE), q, k, v, impl=impl)
  for window in (length, length + 5):
    enc = RoPE(E, base=BASE, **_extension(method, window))
    np.testing.assert_array_equal(_rope_attention(enc, q, k, v, impl=impl), plain)


def test_xla_rejects_a_far_logit_set():
  q, k, v, _ = _raw(8, H)
  with pytest.raises(ValueError, match="model.attention='xla' cannot merge two logit sets"):
    _rope_attention(RoPE(E, rerope_window=4), q, k, v, impl="xla")


def _tiny_config(impl: str = "dense", **pe):
  config = tiny.get_config()
  config.model.attention = impl
  config.model.attention_block = 8
  config.model.num_kv_heads = 1
  config.model.init_std = 0.5  # Sharp attention, so a changed logit set shows in the logits.
  for name, value in pe.items():
    config.pe[name] = value
  return config


def _logits(config, length: int) -> np.ndarray:
  model = Transformer(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(3), (1, length), 0, config.model.vocab_size)
  return np.asarray(model(tokens))


@pytest.mark.parametrize("method", ["self_extend", "rerope"])
@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_transformer_changes_only_beyond_the_window(method, impl):
  window = 16
  plain, extended = _tiny_config(impl), _tiny_config(impl, **_extension(method, window))
  np.testing.assert_allclose(_logits(extended, window), _logits(plain, window), atol=1e-6)
  long_plain, long_extended = _logits(plain, 40), _logits(extended, 40)
  np.testing.assert_allclose(long_extended[:, :window], long_plain[:, :window], atol=1e-6)
  assert np.abs(long_extended[:, window:] - long_plain[:, window:]).max() > 1e-3


def test_logn_is_the_identity_within_its_length():
  plain, scaled = _tiny_config(), _tiny_config(logn_len=24)
  np.testing.assert_allclose(_logits(scaled, 24), _logits(plain, 24), atol=1e-6)
  long_plain, long_scaled = _logits(plain, 40), _logits(scaled, 40)
  np.testing.assert_allclose(long_scaled[:, :24], long_plain[:, :24], atol=1e-6)
  assert np.abs(long_scaled[:, 24:] - long_plain[:, 24:]).max() > 1e-3


@pytest.mark.parametrize("extension", [{}, dict(self_extend_window=4, self_extend_group=2)])
def test_logn_scales_each_query_logit_by_log_ratio(extension):
  train_len, length = 16, 30
  q, k, _, _ = _raw(length, H, seed=4)
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  plain, scaled = RoPE(E, **extension), RoPE(E, logn_len=train_len, **extension)
  rotations = ["rotate"] + (["rotate_far"] if extension else [])
  for rotation in rotations:
    k_rot = getattr(plain, rotation)(k, pos, is_query=False)
    logits = [
      np.einsum("blhd,bmhd->bhlm", getattr(enc, rotation)(q, pos, is_query=True), k_rot)
      for enc in (plain, scaled)
    ]
    for i in (train_len - 1, train_len + 3, length - 1):  # one query within L, two beyond
      ratio = max(1.0, np.log(i + 1) / np.log(train_len))
      np.testing.assert_allclose(
        logits[1][:, :, i], logits[0][:, :, i] * ratio, rtol=1e-5, atol=1e-6
      )


@pytest.mark.parametrize(
  "fields,field",
  [
    (dict(self_extend_window=-1), "pe.self_extend_window=-1"),
    (dict(self_extend_window=8, self_extend_group=0), "pe.self_extend_group=0"),
    (dict(rerope_window=-2), "pe.rerope_window=-2"),
    (dict(logn_len=1), "pe.logn_len=1"),
    (dict(name="alibi", self_extend_window=8), "pe.self_extend_window=8"),
    (dict(name="xpos", logn_len=64), "pe.logn_len=64"),
    (dict(self_extend_window=8, rerope_window=8), "pe.rerope_window=8"),
  ],
)
def test_validation_names_the_field_in_one_line(fields, field):
  config = tiny.get_config()
  for name, value in fields.items():
    config.pe[name] = value
  with pytest.raises(ValueError, match="^" + field.replace(".", r"\.")) as error:
    config_lib.validate(config, device_count=1)
  assert "\n" not in str(error.value)


def test_validation_rejects_xla_attention_with_a_window():
  config = _tiny_config("xla", rerope_window=8)
  with pytest.raises(ValueError, match=r"^model\.attention='xla'") as error:
    config_lib.validate(config, device_count=1)
  assert "\n" not in str(error.value)


def test_config_without_the_fields_builds_plain_rope():
  """Runs saved before these fields existed load (``runs.load_model`` builds from their JSON)."""
  config = tiny.get_config()
  for name in ("self_extend_window", "self_extend_group", "rerope_window", "logn_len"):
    del config.pe[name]
  model = Transformer(config, rngs=nnx.Rngs(0))
  assert model.encodings[0].window is None and model.encodings[0].logn_len == 0
