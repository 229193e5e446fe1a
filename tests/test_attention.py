"""The three attention implementations compute the same causal attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pe_research import backend
from pe_research.attention import attend

B, H, E = 2, 3, 8


def _qkv(length, seed=0, dtype=jnp.float32, heads=H, kv_heads=None):
  """q ``[B, L, heads, E]``, k and v ``[B, L, kv_heads, E]`` (default: ``heads``)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  shapes = [(B, length, heads, E)] + [(B, length, kv_heads or heads, E)] * 2
  return [jax.random.normal(k, shape, dtype) for k, shape in zip(keys, shapes, strict=True)]


def _positions(length, rows=B):
  """``[rows, length]`` positions: ``rows=1`` is the shared row encodings return by default."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))


def _bias_fn(params):
  """A learnable relative bias like ALiBi + T5: ``-slope_h |i - j| + table[clip(i - j), h]``."""
  slopes_H, table_ZxH = params

  def bias(q_pos_BxQ, k_pos_BxK):
    rel_BxQxK = q_pos_BxQ[:, :, None] - k_pos_BxK[:, None, :]
    linear = -slopes_H[None, :, None, None] * jnp.abs(rel_BxQxK)[:, None]
    lookup_BxQxKxH = table_ZxH[jnp.clip(rel_BxQxK, 0, table_ZxH.shape[0] - 1)]
    return linear + jnp.moveaxis(lookup_BxQxKxH, -1, 1)

  return bias


def _bias_params(heads=H):
  return (0.5 ** jnp.arange(1, heads + 1), jax.random.normal(jax.random.key(7), (5, heads)))


def _attend(impl, qkv, bias_params=None, block_size=4, pos_rows=B):
  length = qkv[0].shape[1]
  pos = _positions(length, pos_rows)
  bias_fn = None if bias_params is None else _bias_fn(bias_params)
  return attend(
    *qkv, q_pos_BxL=pos, k_pos_BxL=pos, bias_fn=bias_fn, impl=impl, block_size=block_size
  )


_run = jax.jit(_attend, static_argnames=("impl", "block_size", "pos_rows"))


@pytest.mark.parametrize("impl", ["blockwise", "xla"])
@pytest.mark.parametrize(
  "length,block,with_bias",
  [(16, 4, True), (13, 4, True), (13, 4, False), (3, 4, True)],
)
def test_implementations_match_dense(impl, length, block, with_bias):
  qkv = _qkv(length)
  params = _bias_params() if with_bias else None
  expected = _run("dense", qkv, params)
  got = _run(impl, qkv, params, block_size=block)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_dense_matches_naive_loop():
  length = 5
  q, k, v = _qkv(length)
  params = _bias_params()
  bias = np.asarray(_bias_fn(params)(_positions(length), _positions(length)))
  q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
  expected = np.zeros((B, length, H, E))
  for b in range(B):
    for h in range(H):
      for i in range(length):
        s = np.array(
          [q[b, i, h] @ k[b, j, h] / np.sqrt(E) + bias[b, h, i, j] for j in range(i + 1)]
        )
        w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        expected[b, i, h] = w @ v[b, : i + 1, h]
  np.testing.assert_allclose(_run("dense", (q, k, v), params), expected, atol=1e-5, rtol=1e-5)


def test_blockwise_gradients_equal_dense():
  length = 10  # 3 blocks of 4, the last one padded
  qkv = _qkv(length, seed=1)
  params = _bias_params()
  cotangent = jax.random.normal(jax.random.key(3), (B, length, H, E))

  @functools.partial(jax.jit, static_argnums=0)
  @functools.partial(jax.grad, argnums=(1, 2))
  def grads(impl, qkv, params):
    return jnp.sum(_attend(impl, qkv, params) * cotangent)

  grad_dense = grads("dense", qkv, params)
  grad_block = grads("blockwise", qkv, params)
  for got, expected in zip(jax.tree.leaves(grad_block), jax.tree.leaves(grad_dense), strict=True):
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_blockwise_bias_is_computed_per_block():
  seen_shapes = []
  bias = _bias_fn(_bias_params())

  def recording_bias(q_pos, k_pos):
    seen_shapes.append((q_pos.shape, k_pos.shape))
    return bias(q_pos, k_pos)

  length, block = 64, 8
  pos = _positions(length)
  jax.make_jaxpr(
    lambda q, k, v: attend(
      q,
      k,
      v,
      q_pos_BxL=pos,
      k_pos_BxL=pos,
      bias_fn=recording_bias,
      impl="blockwise",
      block_size=block,
    )
  )(*_qkv(length))
  rows = B // backend.batch_pieces(B)  # Each piece of the batch gets its own calls.
  assert seen_shapes and all(s == ((rows, block), (rows, block)) for s in seen_shapes)


@pytest.mark.parametrize("impl", ["dense", "blockwise", "xla"])
def test_output_is_causal(impl):
  """Changing k, v at position t leaves every output before t unchanged."""
  length, t = 11, 6
  q, k, v = _qkv(length)
  k2 = k.at[:, t:].set(5.0)
  v2 = v.at[:, t:].set(-5.0)
  params = _bias_params()
  before = _run(impl, (q, k, v), params)
  after = _run(impl, (q, k2, v2), params)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  assert not np.allclose(before[:, t:], after[:, t:])


def test_blockwise_jit_matches_eager():
  qkv = _qkv(9)
  params = _bias_params()
  eager = _attend("blockwise", qkv, params)
  jitted = _run("blockwise", qkv, params)
  np.testing.assert_allclose(jitted, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "blockwise", "xla"])
def test_bfloat16_close_to_float32(impl):
  qkv = _qkv(10)
  params = _bias_params()
  got = _run(impl, [x.astype(jnp.bfloat16) for x in qkv], params)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), _run("dense", qkv, params), atol=5e-2)


@pytest.mark.parametrize("length", [10, 37])  # 3 blocks (Python loops), 10 blocks (lax loops)
def test_blockwise_bfloat16_gradients_close_to_float32(length):
  """bf16 q, k, v (on the CPU ``dk``/``dv`` are then accumulated transposed): gradients of q, k,
  v and of the bias parameters within 3% of the largest fp32 entry, in fp32 dense attention's
  layout."""
  qkv, params = _qkv(length, seed=1), _bias_params()
  cotangent = jax.random.normal(jax.random.key(3), (B, length, H, E))
  dqkv_bf16, dparams_bf16 = _grads(
    "blockwise", [x.astype(jnp.bfloat16) for x in qkv], params, cotangent, 4
  )
  dqkv, dparams = _grads("dense", qkv, params, cotangent, 4)
  for got, expected in zip([*dqkv_bf16, *dparams_bf16], [*dqkv, *dparams], strict=True):
    assert got.shape == expected.shape
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=0.03 * scale)


def test_unknown_implementation_is_a_value_error():
  with pytest.raises(ValueError, match="model.attention='flash'.*dense, blockwise, xla"):
    _run("flash", _qkv(4))


def _grads(impl, qkv, params, cotangent, block_size, pos_rows=B):
  def loss(qkv, params):
    out = _attend(impl, qkv, params, block_size=block_size, pos_rows=pos_rows)
    return jnp.sum(out * cotangent)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))(qkv, params)


@pytest.mark.parametrize("length", [10, 37])  # 3 blocks (Python loops), 10 blocks (lax loops)
def test_blockwise_custom_vjp_gradients_equal_dense(length):
  """q, k, v gradients to 1e-5; the bias parameters' gradients (sums over every (i, j), where
  flash and dense attention add in different orders) to 1e-4."""
  qkv, params = _qkv(length, seed=1), _bias_params()
  cotangent = jax.random.normal(jax.random.key(3), (B, length, H, E))
  (dqkv_dense, dparams_dense) = _grads("dense", qkv, params, cotangent, 4)
  (dqkv_block, dparams_block) = _grads("blockwise", qkv, params, cotangent, 4)
  np.testing.assert_allclose(_run("blockwise", qkv, params), _run("dense", qkv, params), atol=1e-5)
  for got, expected in zip(dqkv_block, dqkv_dense, strict=True):
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  for got, expected in zip(dparams_block, dparams_dense, strict=True):
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["dense", "blockwise", "xla"])
def test_one_shared_position_row_equals_per_row_positions(impl):
  """Positions ``[1, L]`` (the default: the bias is computed once and broadcast over B) give
  the outputs and gradients of ``[B, L]``, bias parameters included (their cotangent is
  summed over the batch)."""
  length = 10
  qkv, params = _qkv(length, seed=2), _bias_params()
  cotangent = jax.random.normal(jax.random.key(4), (B, length, H, E))
  np.testing.assert_allclose(
    _run(impl, qkv, params, pos_rows=1), _run(impl, qkv, params), atol=1e-6
  )
  shared = _grads(impl, qkv, params, cotangent, 4, pos_rows=1)
  per_row = _grads(impl, qkv, params, cotangent, 4)
  for got, expected in zip(jax.tree.leaves(shared), jax.tree.leaves(per_row), strict=True):
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_blockwise_skips_masked_blocks_in_both_passes(use_policy):
  """n = 4 blocks: under a gradient (unrolled loops) the bias (one ``abs`` per evaluation in
  ``_bias_fn``) is evaluated for the n (n + 1) / 2 = 10 visible block pairs forward and 10
  backward, never for the 6 masked ones (the batch in one piece). Without a gradient the
  forward takes ``lax`` loops: one body below the diagonal, one for the diagonal block."""
  use_policy(attention_batch_pieces=1)
  length, block = 16, 4
  pos = _positions(length)
  bias = _bias_fn(_bias_params())

  def loss(q, k, v):
    out = attend(
      q, k, v, q_pos_BxL=pos, k_pos_BxL=pos, bias_fn=bias, impl="blockwise", block_size=block
    )
    return jnp.sum(out)

  forward = str(jax.make_jaxpr(loss)(*_qkv(length)))
  both = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*_qkv(length)))
  assert both.count("= abs ") == 20
  assert forward.count("= abs ") == 2 and "while[" in forward


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
@pytest.mark.parametrize("pos_rows", [1, 4])
def test_batch_pieces_change_nothing(use_policy, impl, pos_rows):
  """Attention over 2 or 4 pieces of a batch of 4 equals one piece: outputs and the gradients
  of q, k, v and of the bias parameters; shared positions (one row) serve every piece."""
  keys = jax.random.split(jax.random.key(5), 4)
  qkv = [jax.random.normal(k, (4, 10, H, E)) for k in keys[:3]]
  cotangent = jax.random.normal(keys[3], (4, 10, H, E))
  pos = _positions(10, pos_rows)
  params = _bias_params()

  def out_and_grads(pieces):
    use_policy(attention_batch_pieces=pieces)

    def loss(qkv, params):
      out = attend(
        *qkv, q_pos_BxL=pos, k_pos_BxL=pos, bias_fn=_bias_fn(params), impl=impl, block_size=4
      )
      return jnp.sum(out * cotangent), out

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(qkv, params)

  (dqkv, dparams), out = out_and_grads(1)
  for pieces in (2, 4):
    (dqkv_p, dparams_p), out_p = out_and_grads(pieces)
    np.testing.assert_allclose(out_p, out, atol=1e-6, rtol=1e-6)
    for got, expected in zip([*dqkv_p, *dparams_p], [*dqkv, *dparams], strict=True):
      np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


GQA_HEADS = 4  # H in the grouped-query tests: G = 1 (multi-query), 2 and 4 (= H) divide it


def _repeat_kv(qkv):
  """The reference for G KV heads: k, v repeated to q's H heads, KV head ``g`` serving query
  heads ``g Y .. g Y + Y - 1`` (HF ``repeat_kv``)."""
  q, k, v = qkv
  return [q, *(jnp.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))]


def _gqa_out_and_grads(impl, qkv, params, block_size=4, repeat_kv=False):
  """Output and gradients of q, k, v and the bias parameters of ``sum(out * cotangent)``; with
  ``repeat_kv`` through :func:`_repeat_kv` (so k, v gradients sum over the repeats)."""
  cotangent = jax.random.normal(jax.random.key(3), qkv[0].shape)

  def loss(qkv, params):
    out = _attend(impl, _repeat_kv(qkv) if repeat_kv else qkv, params, block_size=block_size)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  (dqkv, dparams), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(qkv, params)
  return out, [*dqkv, *jax.tree.leaves(dparams)]


@pytest.mark.parametrize("impl", ["dense", "blockwise", "xla"])
@pytest.mark.parametrize("kv_heads,with_bias", [(1, True), (2, True), (4, True), (2, False)])
def test_grouped_query_attention_equals_repeated_kv(impl, kv_heads, with_bias):
  """G of H = 4 KV heads (3 blocks of 4, the last one padded): the output and the gradients of
  q, k, v equal dense attention over k, v repeated to H heads to 1e-5, the bias parameters'
  gradients to 1e-4 (sums in different orders)."""
  qkv = _qkv(10, seed=1, heads=GQA_HEADS, kv_heads=kv_heads)
  params = _bias_params(GQA_HEADS) if with_bias else None
  out, grads = _gqa_out_and_grads(impl, qkv, params)
  out_ref, grads_ref = _gqa_out_and_grads("dense", qkv, params, repeat_kv=True)
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  for i, (got, expected) in enumerate(zip(grads, grads_ref, strict=True)):
    assert got.shape == expected.shape
    tol = 1e-5 if i < 3 else 1e-4
    np.testing.assert_allclose(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_blockwise_grouped_query_lax_loops_equal_repeated_kv(kv_heads):
  """10 blocks (``lax`` loops, above ``Policy.unroll_blocks``): output and gradients as above."""
  qkv = _qkv(37, seed=2, heads=GQA_HEADS, kv_heads=kv_heads)
  params = _bias_params(GQA_HEADS)
  out, grads = _gqa_out_and_grads("blockwise", qkv, params)
  out_ref, grads_ref = _gqa_out_and_grads("dense", qkv, params, repeat_kv=True)
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  for got, expected in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("length", [10, 37])  # 3 blocks (Python loops), 10 blocks (lax loops)
def test_blockwise_grouped_query_bfloat16_close_to_float32(length):
  """bf16 q, k, v with G = 2 of H = 4 (on the CPU ``dk``/``dv`` accumulated transposed):
  output within 5e-2, gradients within 3% of the largest fp32 entry of the repeated-KV
  reference."""
  qkv, params = _qkv(length, seed=1, heads=GQA_HEADS, kv_heads=2), _bias_params(GQA_HEADS)
  out, grads = _gqa_out_and_grads("blockwise", [x.astype(jnp.bfloat16) for x in qkv], params)
  out_ref, grads_ref = _gqa_out_and_grads("dense", qkv, params, repeat_kv=True)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), out_ref, atol=5e-2)
  for got, expected in zip(grads, grads_ref, strict=True):
    assert got.shape == expected.shape
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=0.03 * scale)


@pytest.mark.parametrize("kv_heads", [(3, 3), (2, 1)])  # 3 does not divide 4; k, v differ
def test_kv_heads_not_dividing_h_or_k_v_disagreeing_is_a_value_error(kv_heads):
  """One ValueError naming the shapes, before any implementation runs."""
  q = _qkv(4, heads=GQA_HEADS)[0]
  k, v = (jnp.zeros((B, 4, g, E)) for g in kv_heads)
  with pytest.raises(ValueError, match=r"G dividing H; got q \(2, 4, 4, 8\), k \(2, 4, "):
    _run("dense", (q, k, v))
