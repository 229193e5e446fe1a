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

Grouped-query attention (k, v with ``G`` heads, query head ``h = g R + r``, ``R = H / G``) is
packed as in FlashAttention-3: q ``[B, H, L, K]`` is viewed as ``[B, G, M, K]`` with ``M = L R``
rows ordered position-major (row ``l R + r``), so a query block of ``T = S R`` rows (S positions
times R heads) meets key blocks of S positions of the G KV heads and K/V are never repeated;
``dk``, ``dv`` sum over the R heads in their matmuls. ``G = H`` is ``R = 1``, ``M = L``.
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


def _blocks_transposed(x_BxGxMxK: jax.Array, rows: int) -> jax.Array:
  """``[n, B, G, K, T]``: block ``i`` (``T = rows``) of ``x`` transposed, as a row-major copy
  (the barrier keeps XLA from folding the copy back into the matmuls that read it)."""
  b, g, m, d = x_BxGxMxK.shape
  x_NxBxGxTxK = jnp.moveaxis(x_BxGxMxK.reshape(b, g, m // rows, rows, d), 2, 0)
  return jax.lax.optimization_barrier(jnp.swapaxes(x_NxBxGxTxK, -1, -2))


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


def pack_heads(x_BxHxLxX: jax.Array, groups: int) -> jax.Array:
  """``[B, H, L, X] -> [B, G, L R, X]``: head ``g R + r`` at position ``l`` becomes row
  ``l R + r`` of group ``g`` (a reshape when ``R = 1``)."""
  b, h, length, x = x_BxHxLxX.shape
  x_BxGxRxLxX = x_BxHxLxX.reshape(b, groups, h // groups, length, x)
  return x_BxGxRxLxX.swapaxes(2, 3).reshape(b, groups, length * (h // groups), x)


def _unpack_heads(x_BxGxMxX: jax.Array, heads: int) -> jax.Array:
  """``[B, G, L R, X] -> [B, H, L, X]``, the inverse of :func:`pack_heads`."""
  b, g, m, x = x_BxGxMxX.shape
  r = heads // g
  return x_BxGxMxX.reshape(b, g, m // r, r, x).swapaxes(2, 3).reshape(b, heads, m // r, x)


def _grouped_bias(bias_fn, groups: int, q_pos_BxS, k_pos_BxS, *consts) -> jax.Array:
  """``bias_fn``'s block ``[B, H, S, S]`` packed to ``[B, G, T, S]`` (:func:`pack_heads`)."""
  return pack_heads(bias_fn(q_pos_BxS, k_pos_BxS, *consts), groups)


def _block_scores(q_BxGxTxK, k_BxGxSxK, bias_BxGxTxS, a, c, static: bool) -> jax.Array:
  """Float32 scores of query block ``a`` against key block ``c``, masked where the key's
  position is after the query row's (row ``i`` is position ``a S + i // R``)."""
  s_BxGxTxS = (
    jnp.einsum("bgqd,bgkd->bgqk", q_BxGxTxK, k_BxGxSxK, preferred_element_type=jnp.float32)
    * float(q_BxGxTxK.shape[-1]) ** -0.5
  )
  if bias_BxGxTxS is not None:
    s_BxGxTxS = s_BxGxTxS + bias_BxGxTxS
  if static and a != c:  # Below the diagonal every key is visible.
    return s_BxGxTxS
  rows, block = q_BxGxTxK.shape[2], k_BxGxSxK.shape[2]
  # lax.div (truncating; rows >= 0) is dropped by XLA when R = 1; jnp's // keeps a sign fix-up.
  query_T = a * block + jax.lax.div(jnp.arange(rows), rows // block)
  causal_TxS = query_T[:, None] >= (c * block + jnp.arange(block))
  return jnp.where(causal_TxS, s_BxGxTxS, MASK_VALUE)


def _flash_forward(bias_fn, block, q_BxGxMxK, k_BxGxLxK, v_BxGxLxK, q_pos_BxL, k_pos_BxL, consts):
  """Online softmax per query block over key blocks ``0..a``: ``(out_BxGxMxK, lse_BxGxM)``."""
  b, g, length, d = k_BxGxLxK.shape
  n = length // block
  rows = q_BxGxMxK.shape[2] // n
  static = n <= _UNROLL_BLOCKS

  def query_block(a, carry):
    q_BxGxTxK = _block(q_BxGxMxK, a, rows, 2)
    q_pos_BxS = _block(q_pos_BxL, a, block, 1)

    def key_block(c, state):
      m_BxGxT, l_BxGxT, o_BxGxTxK = state
      k_pos_BxS = _block(k_pos_BxL, c, block, 1)
      bias = None if bias_fn is None else _grouped_bias(bias_fn, g, q_pos_BxS, k_pos_BxS, *consts)
      s_BxGxTxS = _block_scores(q_BxGxTxK, _block(k_BxGxLxK, c, block, 2), bias, a, c, static)
      m_new = jnp.maximum(m_BxGxT, s_BxGxTxS.max(axis=-1))
      correction_BxGxT = jnp.exp(m_BxGxT - m_new)
      p_BxGxTxS = jnp.exp(s_BxGxTxS - m_new[..., None])
      l_new = l_BxGxT * correction_BxGxT + p_BxGxTxS.sum(axis=-1)
      pv_BxGxTxK = jnp.einsum(
        "bgqk,bgkd->bgqd",
        p_BxGxTxS.astype(v_BxGxLxK.dtype),
        _block(v_BxGxLxK, c, block, 2),
        preferred_element_type=jnp.float32,
      )
      return m_new, l_new, o_BxGxTxK * correction_BxGxT[..., None] + pv_BxGxTxK

    init = (
      jnp.full((b, g, rows), MASK_VALUE, jnp.float32),
      jnp.zeros((b, g, rows), jnp.float32),
      jnp.zeros((b, g, rows, d), jnp.float32),
    )
    m_BxGxT, l_BxGxT, o_BxGxTxK = _loop(0, a + 1, key_block, init, static)
    out_BxGxTxK = (o_BxGxTxK / l_BxGxT[..., None]).astype(q_BxGxMxK.dtype)
    return (out_BxGxTxK, m_BxGxT + jnp.log(l_BxGxT)), carry

  (out_NxBxGxTxK, lse_NxBxGxT), _ = _map(n, query_block, (), static)
  out_BxGxMxK = jnp.moveaxis(out_NxBxGxTxK, 0, 2).reshape(b, g, n * rows, d)
  return out_BxGxMxK, jnp.moveaxis(lse_NxBxGxT, 0, 2).reshape(b, g, n * rows)


def _flash_backward(bias_fn, block, residuals, dout_BxGxMxK):
  """FlashAttention-2 backward: per key block ``c``, query blocks ``a >= c``.

  With ``p = exp(s - lse)``, ``D_i = sum_d dout_i out_i``:  ``dv_c += p^T dout_a``,
  ``ds = p (dout_a v_c^T - D_a)``, ``dq_a += ds k_c / sqrt(K)``, ``dk_c += ds^T q_a / sqrt(K)``
  (``p^T``, ``ds^T`` contract the T rows: positions and the R heads of a group), and ``ds`` is
  the cotangent of the bias block, pulled back to the bias parameters. In bf16 on the CPU
  ``dk`` and ``dv`` are accumulated transposed (see ``transposed`` below).
  """
  q_BxGxMxK, k_BxGxLxK, v_BxGxLxK, q_pos_BxL, k_pos_BxL, consts, out_BxGxMxK, lse_BxGxM = residuals
  b, g, length, d = k_BxGxLxK.shape
  n = length // block
  rows = q_BxGxMxK.shape[2] // n
  static = n <= _UNROLL_BLOCKS
  scale = float(d) ** -0.5
  delta_BxGxM = jnp.sum(dout_BxGxMxK.astype(jnp.float32) * out_BxGxMxK.astype(jnp.float32), -1)
  dout_BxGxMxK = dout_BxGxMxK.astype(v_BxGxLxK.dtype)

  # dk += ds^T q and dv += p^T dout contract the query axis. In bf16 on the CPU they are
  # computed transposed, dk^T += q^T ds with q^T copied: XLA:CPU's fast matmul (YNNPACK) takes
  # a left operand contracted on its last axis only, and its fallback first converts bf16 to
  # float32 (bf16 [16, 4, 256, 256] x [.., 256, 64]: 50 -> 180 GFLOP/s; a d=512 8-layer train
  # step 1.43x faster, measured). In float32 the copies cost more than they save (1-2%).
  transposed = q_BxGxMxK.dtype != jnp.float32 and jax.default_backend() == "cpu"
  q_t_NxBxGxKxT = dout_t_NxBxGxKxT = None
  if transposed:
    q_t_NxBxGxKxT = _blocks_transposed(q_BxGxMxK, rows)
    dout_t_NxBxGxKxT = _blocks_transposed(dout_BxGxMxK, rows)

  def pull_to_keys(x_BxGxTxS, y_BxGxMxK, y_t_NxBxGxKxT, a):
    """``x^T y_a`` (``[B, G, S, K]``), or its transpose when ``transposed``."""
    if transposed:
      return jnp.einsum(
        "bgdq,bgqk->bgdk", y_t_NxBxGxKxT[a], x_BxGxTxS, preferred_element_type=jnp.float32
      )
    y_BxGxTxK = _block(y_BxGxMxK, a, rows, 2)
    return jnp.einsum("bgqk,bgqd->bgkd", x_BxGxTxS, y_BxGxTxK, preferred_element_type=jnp.float32)

  def key_block(c, carry):
    k_BxGxSxK, v_BxGxSxK = _block(k_BxGxLxK, c, block, 2), _block(v_BxGxLxK, c, block, 2)
    k_pos_BxS = _block(k_pos_BxL, c, block, 1)

    def query_block(a, state):
      dk_BxGxSxK, dv_BxGxSxK, dq_BxGxMxK, dconsts = state  # dk, dv: [B, G, K, S] if transposed
      q_BxGxTxK, dout_BxGxTxK = _block(q_BxGxMxK, a, rows, 2), _block(dout_BxGxMxK, a, rows, 2)
      bias, bias_vjp = None, None
      if bias_fn is not None:
        q_pos_BxS = _block(q_pos_BxL, a, block, 1)
        block_bias = lambda *cs: _grouped_bias(bias_fn, g, q_pos_BxS, k_pos_BxS, *cs)
        bias, bias_vjp = jax.vjp(block_bias, *consts)
      s_BxGxTxS = _block_scores(q_BxGxTxK, k_BxGxSxK, bias, a, c, static)
      p_BxGxTxS = jnp.exp(s_BxGxTxS - _block(lse_BxGxM, a, rows, 2)[..., None])
      p_cast = p_BxGxTxS.astype(v_BxGxLxK.dtype)
      dv_BxGxSxK = dv_BxGxSxK + pull_to_keys(p_cast, dout_BxGxMxK, dout_t_NxBxGxKxT, a)
      dp_BxGxTxS = jnp.einsum(
        "bgqd,bgkd->bgqk", dout_BxGxTxK, v_BxGxSxK, preferred_element_type=jnp.float32
      )
      ds_BxGxTxS = p_BxGxTxS * (dp_BxGxTxS - _block(delta_BxGxM, a, rows, 2)[..., None])
      ds_scaled = (ds_BxGxTxS * scale).astype(q_BxGxMxK.dtype)
      dq_BxGxTxK = _block(dq_BxGxMxK, a, rows, 2) + jnp.einsum(
        "bgqk,bgkd->bgqd", ds_scaled, k_BxGxSxK, preferred_element_type=jnp.float32
      )
      dq_BxGxMxK = jax.lax.dynamic_update_slice_in_dim(dq_BxGxMxK, dq_BxGxTxK, a * rows, 2)
      dk_BxGxSxK = dk_BxGxSxK + pull_to_keys(ds_scaled, q_BxGxMxK, q_t_NxBxGxKxT, a)
      if bias_vjp is not None:
        if bias.shape[0] == 1:  # One bias row broadcast over the batch: sum its cotangent.
          ds_BxGxTxS = _sum_leading(ds_BxGxTxS)
        dconsts = jax.tree.map(jnp.add, dconsts, bias_vjp(ds_BxGxTxS))
      return dk_BxGxSxK, dv_BxGxSxK, dq_BxGxMxK, dconsts

    zeros = jnp.zeros((b, g, d, block) if transposed else (b, g, block, d), jnp.float32)
    dk, dv, dq, dconsts = _loop(c, n, query_block, (zeros, zeros, *carry), static)
    return (dk, dv), (dq, dconsts)

  init = (jnp.zeros(q_BxGxMxK.shape, jnp.float32), tuple(jnp.zeros_like(x) for x in consts))
  (dk_NxBxGxSxK, dv_NxBxGxSxK), (dq_BxGxMxK, dconsts) = _map(n, key_block, init, static)
  if transposed:
    dk_NxBxGxSxK, dv_NxBxGxSxK = (jnp.swapaxes(x, -1, -2) for x in (dk_NxBxGxSxK, dv_NxBxGxSxK))
  to_full = lambda x_N: jnp.moveaxis(x_N, 0, 2).reshape(b, g, length, d)
  grads = (dq_BxGxMxK, to_full(dk_NxBxGxSxK), to_full(dv_NxBxGxSxK))
  grads = tuple(grad.astype(x.dtype) for grad, x in zip(grads, residuals[:3], strict=True))
  return (*grads, None, None, dconsts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(bias_fn, block, q_BxGxMxK, k_BxGxLxK, v_BxGxLxK, q_pos_BxL, k_pos_BxL, consts):
  args = (q_BxGxMxK, k_BxGxLxK, v_BxGxLxK, q_pos_BxL, k_pos_BxL, consts)
  return _flash_forward(bias_fn, block, *args)[0]


def _flash_fwd(bias_fn, block, *args):
  out_BxGxMxK, lse_BxGxM = _flash_forward(bias_fn, block, *args)
  return out_BxGxMxK, (*args, out_BxGxMxK, lse_BxGxM)


_flash.defvjp(_flash_fwd, _flash_backward)


def blockwise_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, q_pos_BxL, k_pos_BxL, bias_fn, block_size):
  """Causal attention of q ``[B, L, H, K]`` over k, v ``[B, L, G, K]`` -> ``[B, L, H, K]`` by
  blocks, q packed to ``[B, G, L R, K]`` (module docstring).

  L is padded to ``n * S`` (``S = min(block_size, L)``); padded keys sit after every real
  query so the causal mask hides them, padded query rows are dropped. Positions are padded by
  repeating the last one, so ``bias_fn`` only sees ordinary positions. ``bias_fn`` is wrapped
  in a fresh lambda before ``jax.closure_convert``, whose cache is keyed on the function: a
  bound method seen before would get the parameters of its earlier trace.
  """
  b, length, h, d = q_BxLxHxK.shape
  g = k_BxLxGxK.shape[2]
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
  out_BxGxMxK = _flash(
    converted,
    block,
    pack_heads(heads_first(q_BxLxHxK), g),
    heads_first(k_BxLxGxK),
    heads_first(v_BxLxGxK),
    q_pos_BxL,
    k_pos_BxL,
    consts,
  )
  return jnp.moveaxis(_unpack_heads(out_BxGxMxK, h), 1, 2)[:, :length]
