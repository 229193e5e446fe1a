"""Flash-style causal attention with a custom VJP: ``O(L * S)`` memory, masked blocks skipped.

L is cut into ``n`` blocks of ``S`` positions. Query block ``a`` visits key blocks ``c <= a``
only (``n (n + 1) / 2`` of the ``n^2`` pairs), in the forward and in the backward pass, with
running max ``m``, normaliser ``l`` and accumulator ``o`` per query row::

  s = q_a . k_c / sqrt(K) + bias(p_a, p_c)   (masked where j > i, only on the diagonal c = a)
  m' = max(m, max_j s);  l' = l e^(m - m') + sum_j e^(s - m');  o' = o e^(m - m') + e^(s - m') v_c
  out_a = o / l,  lse_a = m + log l

The backward pass (FlashAttention-2) recomputes each visible block from ``lse`` instead of
storing probabilities. The bias is evaluated per block pair, never as an ``[H, L, L]`` table,
and is closure-converted so the parameters it reads (T5's table, KERPLE's r, FIRE's MLP) are
explicit inputs: their gradients are pulled back block by block with ``jax.vjp``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Finite, so exp(mask - running_max) is 0 instead of NaN when a whole row is masked.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# Up to this many blocks per side the block loops are Python loops (static slices, one
# straight-line program XLA can schedule); beyond it they are ``lax`` loops (program size
# independent of L, for long evaluation).
_UNROLL_BLOCKS = 8


def _loop(lo, hi, body, carry, static: bool):
  """``for i in range(lo, hi): carry = body(i, carry)`` unrolled (static) or as a fori_loop."""
  if static:
    for i in range(lo, hi):
      carry = body(i, carry)
    return carry
  return jax.lax.fori_loop(lo, hi, body, carry)


def _map(n: int, fn, carry, static: bool):
  """``ys[i], carry = fn(i, carry)`` for i < n; returns (stacked ys, carry)."""
  if static:
    ys = []
    for i in range(n):
      y, carry = fn(i, carry)
      ys.append(y)
    return jax.tree.map(lambda *y: jnp.stack(y), *ys), carry
  carry, ys = jax.lax.scan(lambda c, i: fn(i, c)[::-1], carry, jnp.arange(n))
  return ys, carry


def _block(x: jax.Array, i, size: int, axis: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _blocks_transposed(x_BxHxLxK: jax.Array, block: int) -> jax.Array:
  """``[n, B, H, K, S]``: block ``i`` of ``x`` transposed, as a row-major copy (the barrier
  keeps XLA from folding the copy back into the matmuls that read it)."""
  b, h, length, d = x_BxHxLxK.shape
  x_NxBxHxSxK = jnp.moveaxis(x_BxHxLxK.reshape(b, h, length // block, block, d), 2, 0)
  return jax.lax.optimization_barrier(jnp.swapaxes(x_NxBxHxSxK, -1, -2))


def _sum_leading(x_BxN: jax.Array) -> jax.Array:
  """``sum(x, axis=0, keepdims=True)`` by halving: ``x[:h] + x[h:2h]`` until one row is left.
  XLA:CPU's reduction over a leading axis ran 4-25x slower ([16, 4, 256, 256]: 20 vs 4.6 ms,
  [64, ...]: 96 vs 3.9 ms, measured); it was most of T5's overhead over NoPE. Pairwise, so
  also more accurate than a running sum."""
  while x_BxN.shape[0] > 1:
    half = x_BxN.shape[0] // 2
    odd_row = x_BxN[2 * half :]
    x_BxN = x_BxN[:half] + x_BxN[half : 2 * half]
    if odd_row.shape[0]:
      x_BxN = x_BxN.at[:1].add(odd_row)
  return x_BxN


def _block_scores(q_BxHxSxK, k_BxHxSxK, bias_BxHxSxS, a, c, static: bool) -> jax.Array:
  """Float32 scores of query block ``a`` against key block ``c``, masked where key > query."""
  s_BxHxSxS = (
    jnp.einsum("bhqd,bhkd->bhqk", q_BxHxSxK, k_BxHxSxK, preferred_element_type=jnp.float32)
    * float(q_BxHxSxK.shape[-1]) ** -0.5
  )
  if bias_BxHxSxS is not None:
    s_BxHxSxS = s_BxHxSxS + bias_BxHxSxS
  if static and a != c:  # Below the diagonal every key is visible.
    return s_BxHxSxS
  offsets_S = jnp.arange(q_BxHxSxK.shape[2])
  causal_SxS = (a * q_BxHxSxK.shape[2] + offsets_S)[:, None] >= (c * q_BxHxSxK.shape[2] + offsets_S)
  return jnp.where(causal_SxS, s_BxHxSxS, MASK_VALUE)


def _flash_forward(bias_fn, block, q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, q_pos_BxL, k_pos_BxL, consts):
  """Online softmax per query block over key blocks ``0..a``: ``(out_BxHxLxK, lse_BxHxL)``."""
  b, h, length, d = q_BxHxLxK.shape
  n = length // block
  static = n <= _UNROLL_BLOCKS

  def query_block(a, carry):
    q_BxHxSxK = _block(q_BxHxLxK, a, block, 2)
    q_pos_BxS = _block(q_pos_BxL, a, block, 1)

    def key_block(c, state):
      m_BxHxS, l_BxHxS, o_BxHxSxK = state
      bias = (
        None if bias_fn is None else bias_fn(q_pos_BxS, _block(k_pos_BxL, c, block, 1), *consts)
      )
      s_BxHxSxS = _block_scores(q_BxHxSxK, _block(k_BxHxLxK, c, block, 2), bias, a, c, static)
      m_new = jnp.maximum(m_BxHxS, s_BxHxSxS.max(axis=-1))
      correction_BxHxS = jnp.exp(m_BxHxS - m_new)
      p_BxHxSxS = jnp.exp(s_BxHxSxS - m_new[..., None])
      l_new = l_BxHxS * correction_BxHxS + p_BxHxSxS.sum(axis=-1)
      pv_BxHxSxK = jnp.einsum(
        "bhqk,bhkd->bhqd",
        p_BxHxSxS.astype(v_BxHxLxK.dtype),
        _block(v_BxHxLxK, c, block, 2),
        preferred_element_type=jnp.float32,
      )
      return m_new, l_new, o_BxHxSxK * correction_BxHxS[..., None] + pv_BxHxSxK

    init = (
      jnp.full((b, h, block), MASK_VALUE, jnp.float32),
      jnp.zeros((b, h, block), jnp.float32),
      jnp.zeros((b, h, block, d), jnp.float32),
    )
    m_BxHxS, l_BxHxS, o_BxHxSxK = _loop(0, a + 1, key_block, init, static)
    out_BxHxSxK = (o_BxHxSxK / l_BxHxS[..., None]).astype(q_BxHxLxK.dtype)
    return (out_BxHxSxK, m_BxHxS + jnp.log(l_BxHxS)), carry

  (out_NxBxHxSxK, lse_NxBxHxS), _ = _map(n, query_block, (), static)
  out_BxHxLxK = jnp.moveaxis(out_NxBxHxSxK, 0, 2).reshape(b, h, length, d)
  return out_BxHxLxK, jnp.moveaxis(lse_NxBxHxS, 0, 2).reshape(b, h, length)


def _flash_backward(bias_fn, block, residuals, dout_BxHxLxK):
  """FlashAttention-2 backward: per key block ``c``, query blocks ``a >= c``.

  With ``p = exp(s - lse)``, ``D_i = sum_d dout_i out_i``:  ``dv_c += p^T dout_a``,
  ``ds = p (dout_a v_c^T - D_a)``, ``dq_a += ds k_c / sqrt(K)``, ``dk_c += ds^T q_a / sqrt(K)``,
  and ``ds`` is the cotangent of the bias block, pulled back to the bias parameters. In bf16 on
  the CPU ``dk`` and ``dv`` are accumulated transposed (see ``transposed`` below).
  """
  q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, q_pos_BxL, k_pos_BxL, consts, out_BxHxLxK, lse_BxHxL = residuals
  b, h, length, d = q_BxHxLxK.shape
  n = length // block
  static = n <= _UNROLL_BLOCKS
  scale = float(d) ** -0.5
  delta_BxHxL = jnp.sum(dout_BxHxLxK.astype(jnp.float32) * out_BxHxLxK.astype(jnp.float32), -1)
  dout_BxHxLxK = dout_BxHxLxK.astype(v_BxHxLxK.dtype)

  # dk += ds^T q and dv += p^T dout contract the query axis. In bf16 on the CPU they are
  # computed transposed, dk^T += q^T ds with q^T copied: XLA:CPU's fast matmul (YNNPACK) takes
  # a left operand contracted on its last axis only, and its fallback first converts bf16 to
  # float32 (bf16 [16, 4, 256, 256] x [.., 256, 64]: 50 -> 180 GFLOP/s; a d=512 8-layer train
  # step 1.43x faster, measured). In float32 the copies cost more than they save (1-2%).
  transposed = q_BxHxLxK.dtype != jnp.float32 and jax.default_backend() == "cpu"
  q_t_NxBxHxKxS = dout_t_NxBxHxKxS = None
  if transposed:
    q_t_NxBxHxKxS = _blocks_transposed(q_BxHxLxK, block)
    dout_t_NxBxHxKxS = _blocks_transposed(dout_BxHxLxK, block)

  def pull_to_keys(x_BxHxSxS, y_BxHxLxK, y_t_NxBxHxKxS, a):
    """``x^T y_a`` (``[B, H, S, K]``), or its transpose when ``transposed``."""
    if transposed:
      return jnp.einsum(
        "bhdq,bhqk->bhdk", y_t_NxBxHxKxS[a], x_BxHxSxS, preferred_element_type=jnp.float32
      )
    y_BxHxSxK = _block(y_BxHxLxK, a, block, 2)
    return jnp.einsum("bhqk,bhqd->bhkd", x_BxHxSxS, y_BxHxSxK, preferred_element_type=jnp.float32)

  def key_block(c, carry):
    k_BxHxSxK, v_BxHxSxK = _block(k_BxHxLxK, c, block, 2), _block(v_BxHxLxK, c, block, 2)
    k_pos_BxS = _block(k_pos_BxL, c, block, 1)

    def query_block(a, state):
      dk_BxHxSxK, dv_BxHxSxK, dq_BxHxLxK, dconsts = state  # dk, dv: [B, H, K, S] if transposed
      q_BxHxSxK, dout_BxHxSxK = _block(q_BxHxLxK, a, block, 2), _block(dout_BxHxLxK, a, block, 2)
      bias, bias_vjp = None, None
      if bias_fn is not None:
        block_bias = lambda *cs: bias_fn(_block(q_pos_BxL, a, block, 1), k_pos_BxS, *cs)
        bias, bias_vjp = jax.vjp(block_bias, *consts)
      s_BxHxSxS = _block_scores(q_BxHxSxK, k_BxHxSxK, bias, a, c, static)
      p_BxHxSxS = jnp.exp(s_BxHxSxS - _block(lse_BxHxL, a, block, 2)[..., None])
      p_cast = p_BxHxSxS.astype(v_BxHxLxK.dtype)
      dv_BxHxSxK = dv_BxHxSxK + pull_to_keys(p_cast, dout_BxHxLxK, dout_t_NxBxHxKxS, a)
      dp_BxHxSxS = jnp.einsum(
        "bhqd,bhkd->bhqk", dout_BxHxSxK, v_BxHxSxK, preferred_element_type=jnp.float32
      )
      ds_BxHxSxS = p_BxHxSxS * (dp_BxHxSxS - _block(delta_BxHxL, a, block, 2)[..., None])
      ds_scaled = (ds_BxHxSxS * scale).astype(q_BxHxLxK.dtype)
      dq_BxHxSxK = _block(dq_BxHxLxK, a, block, 2) + jnp.einsum(
        "bhqk,bhkd->bhqd", ds_scaled, k_BxHxSxK, preferred_element_type=jnp.float32
      )
      dq_BxHxLxK = jax.lax.dynamic_update_slice_in_dim(dq_BxHxLxK, dq_BxHxSxK, a * block, 2)
      dk_BxHxSxK = dk_BxHxSxK + pull_to_keys(ds_scaled, q_BxHxLxK, q_t_NxBxHxKxS, a)
      if bias_vjp is not None:
        if bias.shape[0] == 1:  # One bias row broadcast over the batch: sum its cotangent.
          ds_BxHxSxS = _sum_leading(ds_BxHxSxS)
        dconsts = jax.tree.map(jnp.add, dconsts, bias_vjp(ds_BxHxSxS))
      return dk_BxHxSxK, dv_BxHxSxK, dq_BxHxLxK, dconsts

    zeros = jnp.zeros((b, h, d, block) if transposed else (b, h, block, d), jnp.float32)
    dk, dv, dq, dconsts = _loop(c, n, query_block, (zeros, zeros, *carry), static)
    return (dk, dv), (dq, dconsts)

  init = (jnp.zeros((b, h, length, d), jnp.float32), tuple(jnp.zeros_like(x) for x in consts))
  (dk_NxBxHxSxK, dv_NxBxHxSxK), (dq_BxHxLxK, dconsts) = _map(n, key_block, init, static)
  if transposed:
    dk_NxBxHxSxK, dv_NxBxHxSxK = (jnp.swapaxes(x, -1, -2) for x in (dk_NxBxHxSxK, dv_NxBxHxSxK))
  to_full = lambda x_N: jnp.moveaxis(x_N, 0, 2).reshape(b, h, length, d)
  grads = (dq_BxHxLxK, to_full(dk_NxBxHxSxK), to_full(dv_NxBxHxSxK))
  grads = tuple(g.astype(x.dtype) for g, x in zip(grads, residuals[:3], strict=True))
  return (*grads, None, None, dconsts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(bias_fn, block, q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, q_pos_BxL, k_pos_BxL, consts):
  args = (q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, q_pos_BxL, k_pos_BxL, consts)
  return _flash_forward(bias_fn, block, *args)[0]


def _flash_fwd(bias_fn, block, *args):
  out_BxHxLxK, lse_BxHxL = _flash_forward(bias_fn, block, *args)
  return out_BxHxLxK, (*args, out_BxHxLxK, lse_BxHxL)


_flash.defvjp(_flash_fwd, _flash_backward)


def blockwise_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, q_pos_BxL, k_pos_BxL, bias_fn, block_size):
  """Causal attention ``[B, L, H, K] -> [B, L, H, K]`` by blocks (module docstring).

  L is padded to ``n * S`` (``S = min(block_size, L)``); padded keys sit after every real
  query so the causal mask hides them, padded query rows are dropped. Positions are padded by
  repeating the last one, so ``bias_fn`` only sees ordinary positions. ``bias_fn`` is wrapped
  in a fresh lambda before ``jax.closure_convert``, whose cache is keyed on the function: a
  bound method seen before would get the parameters of its earlier trace.
  """
  b, length, h, d = q_BxLxHxK.shape
  if block_size < 1:
    raise ValueError(f"model.attention_block={block_size} must be a positive integer")
  block = min(block_size, length)
  padded = -(-length // block) * block
  pad_x = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  q_pos_BxL = jnp.pad(q_pos_BxL, ((0, 0), (0, padded - length)), mode="edge")
  k_pos_BxL = jnp.pad(k_pos_BxL, ((0, 0), (0, padded - length)), mode="edge")
  heads_first = lambda x_BxLxHxK: jnp.moveaxis(jnp.pad(x_BxLxHxK, pad_x), 2, 1)
  converted, consts = None, ()
  if bias_fn is not None:
    example = q_pos_BxL[:, :block]
    converted, consts = jax.closure_convert(lambda qp, kp: bias_fn(qp, kp), example, example)
    consts = tuple(consts)
  out_BxHxLxK = _flash(
    converted,
    block,
    heads_first(q_BxLxHxK),
    heads_first(k_BxLxHxK),
    heads_first(v_BxLxHxK),
    q_pos_BxL,
    k_pos_BxL,
    consts,
  )
  return jnp.moveaxis(out_BxHxLxK, 1, 2)[:, :length]
