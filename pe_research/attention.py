"""Causal multi-head attention: one formula, three implementations.

For queries ``i`` and keys ``j`` of one sequence (``p`` = positions from the encoding)::

  out_i = sum_{j <= i} softmax_j(q_i . k_j / sqrt(K) + bias(p_i, p_j)) v_j

The ``1/sqrt(K)`` scaling is applied for every encoding (T5 omits it; we keep it uniform).
The causal mask is on sequence *index* (``j <= i``), not on position values, so randomized
positions cannot leak the future. ``bias_fn(q_pos_BxQ, k_pos_BxK) -> [B, H, Q, K]`` is the
encoding's logit bias (or ``None``); attention never knows which encoding it came from.

Implementations (``impl``), equal to 1e-5 in fp32:
  * ``dense``: einsum reference; materialises ``[B, H, L, L]`` logits.
  * ``blockwise``: flash-style online softmax over key blocks of ``block_size``; blocks above
    the diagonal are skipped; ``bias_fn`` is called per (query block, key block), so memory is
    linear in L. Differentiable (each query block is rematerialised in the backward pass).
  * ``xla``: ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU for bf16/fp16).

Logits, softmax and accumulation are float32 whatever the input dtype (bf16 matmuls accumulate
in fp32); the output has the dtype of ``q``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

BiasFn = Callable[[jax.Array, jax.Array], jax.Array | None]
IMPLEMENTATIONS = ("dense", "blockwise", "xla")
# Finite, so exp(mask - running_max) is 0 instead of NaN when a whole row is masked.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def attend(
  q_BxLxHxK: jax.Array,
  k_BxLxHxK: jax.Array,
  v_BxLxHxK: jax.Array,
  *,
  q_pos_BxL: jax.Array,
  k_pos_BxL: jax.Array,
  bias_fn: BiasFn | None = None,
  impl: str = "dense",
  block_size: int = 256,
) -> jax.Array:
  """Causal attention ``[B, L, H, K] -> [B, L, H, K]`` with the implementation ``impl``."""
  if impl == "dense":
    return dense_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, q_pos_BxL, k_pos_BxL, bias_fn)
  if impl == "blockwise":
    return blockwise_attention(
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, q_pos_BxL, k_pos_BxL, bias_fn, block_size
    )
  if impl == "xla":
    return xla_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, q_pos_BxL, k_pos_BxL, bias_fn)
  raise ValueError(f"model.attention={impl!r} is unknown; allowed: {', '.join(IMPLEMENTATIONS)}")


def _logits(q_BxQxHxK: jax.Array, k_BxKxHxK: jax.Array) -> jax.Array:
  """``q . k / sqrt(K)`` as float32 ``[B, H, Q, K]``."""
  scale = 1.0 / np.sqrt(q_BxQxHxK.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q_BxQxHxK, k_BxKxHxK, preferred_element_type=jnp.float32)
  return logits * scale


def _weighted_values(p_BxHxQxK: jax.Array, v_BxKxHxD: jax.Array) -> jax.Array:
  """``sum_j p_ij v_j`` as float32 ``[B, Q, H, D]`` (p cast to v's dtype, fp32 accumulate)."""
  return jnp.einsum(
    "bhqk,bkhd->bqhd",
    p_BxHxQxK.astype(v_BxKxHxD.dtype),
    v_BxKxHxD,
    preferred_element_type=jnp.float32,
  )


def dense_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, q_pos_BxL, k_pos_BxL, bias_fn):
  """Reference: full ``[B, H, L, L]`` logits, causal mask, softmax, weighted sum."""
  length = q_BxLxHxK.shape[1]
  logits_BxHxLxL = _logits(q_BxLxHxK, k_BxLxHxK)
  if bias_fn is not None:
    logits_BxHxLxL = logits_BxHxLxL + bias_fn(q_pos_BxL, k_pos_BxL)
  causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
  logits_BxHxLxL = jnp.where(causal_LxL, logits_BxHxLxL, _MASK_VALUE)
  probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1)
  return _weighted_values(probs_BxHxLxL, v_BxLxHxK).astype(q_BxLxHxK.dtype)


def _to_blocks(x_BxLx: jax.Array, num_blocks: int, block: int) -> jax.Array:
  """``[B, n*S, ...] -> [n, B, S, ...]``."""
  b = x_BxLx.shape[0]
  return jnp.moveaxis(x_BxLx.reshape(b, num_blocks, block, *x_BxLx.shape[2:]), 1, 0)


def blockwise_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, q_pos_BxL, k_pos_BxL, bias_fn, block_size):
  """Flash-style causal attention, memory ``O(L * block_size)`` instead of ``O(L^2)``.

  L is padded to ``n * S`` (``S = min(block_size, L)``); padded keys sit after every real
  query so the causal mask hides them, padded query rows are dropped. Positions are padded by
  repeating the last one, so ``bias_fn`` only sees ordinary positions. For query block ``a``
  and key block ``c <= a`` (blocks ``c > a`` are skipped with ``lax.cond``), with running
  max ``m``, normaliser ``l`` and accumulator ``o`` per query row::

    s = q_a . k_c / sqrt(K) + bias(p_a, p_c)   (masked where j > i)
    m' = max(m, max_j s);  l' = l e^(m - m') + sum_j e^(s - m');  o' = o e^(m - m') + e^(s - m') v_c
    out_a = o / l
  """
  b, length, h, d = q_BxLxHxK.shape
  if block_size < 1:
    raise ValueError(f"model.attention_block={block_size} must be a positive integer")
  block = min(block_size, length)
  n = -(-length // block)
  pad = n * block - length
  pad_x = ((0, 0), (0, pad), (0, 0), (0, 0))
  q_NxBxSxHxK = _to_blocks(jnp.pad(q_BxLxHxK, pad_x), n, block)
  k_NxBxSxHxK = _to_blocks(jnp.pad(k_BxLxHxK, pad_x), n, block)
  v_NxBxSxHxK = _to_blocks(jnp.pad(v_BxLxHxK, pad_x), n, block)
  q_pos_NxBxS = _to_blocks(jnp.pad(q_pos_BxL, ((0, 0), (0, pad)), mode="edge"), n, block)
  k_pos_NxBxS = _to_blocks(jnp.pad(k_pos_BxL, ((0, 0), (0, pad)), mode="edge"), n, block)
  offsets_S = jnp.arange(block)

  def query_block(args):
    a, q_BxSxHxK, q_pos_BxS = args

    def key_block(carry, c):
      m_BxHxS, l_BxHxS, o_BxSxHxK = carry
      s_BxHxSxS = _logits(q_BxSxHxK, k_NxBxSxHxK[c])
      if bias_fn is not None:
        s_BxHxSxS = s_BxHxSxS + bias_fn(q_pos_BxS, k_pos_NxBxS[c])
      causal_SxS = (a * block + offsets_S)[:, None] >= (c * block + offsets_S)[None, :]
      s_BxHxSxS = jnp.where(causal_SxS, s_BxHxSxS, _MASK_VALUE)
      m_new = jnp.maximum(m_BxHxS, s_BxHxSxS.max(axis=-1))
      correction_BxHxS = jnp.exp(m_BxHxS - m_new)
      p_BxHxSxS = jnp.exp(s_BxHxSxS - m_new[..., None])
      l_new = l_BxHxS * correction_BxHxS + p_BxHxSxS.sum(axis=-1)
      o_new = o_BxSxHxK * jnp.moveaxis(correction_BxHxS, 1, 2)[..., None]
      o_new = o_new + _weighted_values(p_BxHxSxS, v_NxBxSxHxK[c])
      return m_new, l_new, o_new

    def step(carry, c):
      return jax.lax.cond(c <= a, key_block, lambda carry, c: carry, carry, c), None

    init = (
      jnp.full((b, h, block), _MASK_VALUE, jnp.float32),
      jnp.zeros((b, h, block), jnp.float32),
      jnp.zeros((b, block, h, d), jnp.float32),
    )
    (_, l_BxHxS, o_BxSxHxK), _ = jax.lax.scan(step, init, jnp.arange(n))
    return (o_BxSxHxK / jnp.moveaxis(l_BxHxS, 1, 2)[..., None]).astype(q_BxLxHxK.dtype)

  out_NxBxSxHxK = jax.lax.map(
    jax.checkpoint(query_block), (jnp.arange(n), q_NxBxSxHxK, q_pos_NxBxS)
  )
  return jnp.moveaxis(out_NxBxSxHxK, 0, 1).reshape(b, n * block, h, d)[:, :length]


def xla_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, q_pos_BxL, k_pos_BxL, bias_fn):
  """``jax.nn.dot_product_attention``; cuDNN on GPU for half-precision inputs, else XLA."""
  half = q_BxLxHxK.dtype in (jnp.bfloat16, jnp.float16)
  implementation = "cudnn" if jax.default_backend() == "gpu" and half else None
  bias_BxHxLxL = None if bias_fn is None else bias_fn(q_pos_BxL, k_pos_BxL)
  if bias_BxHxLxL is not None and implementation == "cudnn":
    bias_BxHxLxL = bias_BxHxLxL.astype(q_BxLxHxK.dtype)
  return jax.nn.dot_product_attention(
    q_BxLxHxK,
    k_BxLxHxK,
    v_BxLxHxK,
    bias=bias_BxHxLxL,
    is_causal=True,
    implementation=implementation,
  )
