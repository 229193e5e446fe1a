"""Causal multi-head attention: one formula, three implementations.

For queries ``i`` and keys ``j`` of one sequence (``p`` = positions from the encoding)::

  out_i = sum_{j <= i} softmax_j(q_i . k_j / sqrt(K) + bias(p_i, p_j)) v_j

The ``1/sqrt(K)`` scaling is applied for every encoding (T5 omits it; we keep it uniform).
The causal mask is on sequence *index* (``j <= i``), not on position values, so randomized
positions cannot leak the future. ``bias_fn(q_pos_BxQ, k_pos_BxK) -> [B, H, Q, K]`` is the
encoding's logit bias (or ``None``); attention never knows which encoding it came from.
Grouped-query attention: k and v may have ``G`` heads, ``G`` dividing ``H``; query head ``h``
reads KV head ``h // (H / G)`` (HF ``repeat_kv``); ``G = 1`` is multi-query attention.
A far logit set (the encoding's ``window`` W and ``rotate_far``: Self-Extend, ReRoPE) replaces
``q_i . k_j`` by ``q_far_i . k_far_j`` where ``i − j >= W`` (sequence indices), before the bias,
the mask and the one softmax: ``dense`` and ``blockwise`` take it, ``xla`` raises (one
``jax.nn.dot_product_attention`` call has one logit set; a silent dense fallback would
materialise ``[B, H, L, L]`` at the long lengths these methods are for).

Implementations (``impl``), equal to 1e-5 in fp32:
  * ``dense``: einsum reference; materialises ``[B, H, L, L]`` logits.
  * ``blockwise``: flash attention (``flash_attention.py``): online softmax over blocks of
    ``block_size``, blocks above the diagonal skipped in both passes, a custom VJP that
    recomputes blocks instead of storing probabilities, ``bias_fn`` called per block pair (its
    parameters get gradients); memory linear in L.
  * ``xla``: ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU for bf16/fp16).

Logits, softmax and accumulation are float32 whatever the input dtype (bf16 matmuls accumulate
in fp32); the output has the operand dtype (:func:`attend`'s ``operand_dtype``, default ``q``'s).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pe_research.flash_attention import MASK_VALUE, blockwise_attention, pack_heads

BiasFn = Callable[[jax.Array, jax.Array], jax.Array | None]
IMPLEMENTATIONS = ("dense", "blockwise", "xla")


def batch_pieces(batch: int) -> int:
  """Into how many pieces :func:`attend` cuts the batch: on a single CPU device the largest
  divisor of ``batch`` up to the number of cores this process may use, elsewhere 1.

  XLA:CPU runs each batched ``[B, H]`` attention matmul (YNNPACK) on one core, and a layer's
  attention is a chain of them, so the other cores idled through it; the pieces' chains are
  independent and run side by side (d=256, 4 layers, T=256, B=16 train step on 2 cores: 1.03x
  with blockwise 256-blocks, measured). Several CPU devices (data parallelism) already run
  their shards side by side, and GPUs get one kernel: no cut there.
  """
  if jax.default_backend() != "cpu" or jax.local_device_count() != 1:
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(n for n in range(1, min(batch, cores or 1) + 1) if batch % n == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def split(x: jax.Array, pieces: int, axis: int) -> tuple[jax.Array, ...]:
  """``jnp.split(x, pieces, axis)`` whose gradient is one ``concatenate`` of the pieces'
  cotangents. Autodiff's is a zero-padded copy of each piece's, summed, which XLA:CPU fuses
  into one loop that evaluates every piece's branch per element. For the batch pieces and the
  q/k/v split, train steps: d256x4 fp32 0.98x and 1.02x (two runs), bf16 1.10x and 1.05x;
  d512x8 fp32 1.02x, bf16 1.03x (measured)."""
  return tuple(jnp.split(x, pieces, axis))


def _split_fwd(x, pieces, axis):
  return split(x, pieces, axis), None


def _split_bwd(pieces, axis, _, gs):
  return (jnp.concatenate(gs, axis),)


split.defvjp(_split_fwd, _split_bwd)


def attend(
  q_BxLxHxK: jax.Array,
  k_BxLxGxK: jax.Array,
  v_BxLxGxK: jax.Array,
  *,
  q_pos_BxL: jax.Array,
  k_pos_BxL: jax.Array,
  bias_fn: BiasFn | None = None,
  impl: str = "dense",
  block_size: int = 256,
  operand_dtype=None,
  q_far_BxLxHxK: jax.Array | None = None,
  k_far_BxLxGxK: jax.Array | None = None,
  window: int | None = None,
) -> jax.Array:
  """Causal attention of q ``[B, L, H, K]`` over k, v ``[B, L, G, K]`` (``G`` dividing ``H``)
  -> ``[B, L, H, K]`` with the implementation ``impl``, over :func:`batch_pieces` pieces of the
  batch (positions with a batch axis of 1 serve every piece). ``operand_dtype`` (default:
  ``q``'s dtype): q, k and v are rounded to it, piece by piece, and the output is in it; their
  gradients come back in their own dtype. ``window`` W with ``q_far``, ``k_far`` (shaped as q,
  k): the far logit set of pairs with ``i − j >= W`` (module docstring)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={impl!r} is unknown; allowed: {', '.join(IMPLEMENTATIONS)}")
  far = None
  if window is not None or q_far_BxLxHxK is not None or k_far_BxLxGxK is not None:
    far = _check_far(q_BxLxHxK, k_BxLxGxK, q_far_BxLxHxK, k_far_BxLxGxK, window, impl)
  b, length, h, d = q_BxLxHxK.shape
  g = k_BxLxGxK.shape[2]
  if k_BxLxGxK.shape != (b, length, g, d) or v_BxLxGxK.shape != k_BxLxGxK.shape or h % g:
    raise ValueError(
      f"attention needs q [B, L, H, K] and k, v [B, L, G, K] with G dividing H; got q "
      f"{q_BxLxHxK.shape}, k {k_BxLxGxK.shape}, v {v_BxLxGxK.shape}"
    )
  pieces = batch_pieces(q_BxLxHxK.shape[0])
  dtype = operand_dtype or q_BxLxHxK.dtype

  def cut(x):  # Positions with a batch axis of 1 serve every piece.
    if x.shape[0] == 1 or pieces == 1:
      return (x,) * pieces
    if jnp.issubdtype(x.dtype, jnp.inexact):
      return split(x, pieces, 0)
    return tuple(jnp.split(x, pieces, 0))

  qs, ks, vs = (tuple(p.astype(dtype) for p in cut(x)) for x in (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK))
  q_poss, k_poss = cut(q_pos_BxL), cut(k_pos_BxL)
  fars = [None] * pieces
  if far is not None:
    fars = list(zip(*(tuple(p.astype(dtype) for p in cut(x)) for x in far), strict=True))
  outs = [
    _attend(qs[i], ks[i], vs[i], q_poss[i], k_poss[i], bias_fn, impl, block_size, fars[i], window)
    for i in range(pieces)
  ]
  return outs[0] if pieces == 1 else jnp.concatenate(outs, axis=0)


def _check_far(q_BxLxHxK, k_BxLxGxK, q_far_BxLxHxK, k_far_BxLxGxK, window, impl):
  """``(q_far, k_far)`` after checking them and ``window`` (one-line ValueErrors)."""
  if q_far_BxLxHxK is None or k_far_BxLxGxK is None or window is None:
    raise ValueError("attend: window, q_far and k_far go together; allowed: all three or none")
  if not (isinstance(window, int) and window > 0):
    raise ValueError(f"attend: window={window!r} is invalid; allowed: an int W > 0")
  if q_far_BxLxHxK.shape != q_BxLxHxK.shape or k_far_BxLxGxK.shape != k_BxLxGxK.shape:
    raise ValueError(
      f"attend: q_far {q_far_BxLxHxK.shape} and k_far {k_far_BxLxGxK.shape} must be shaped as "
      f"q {q_BxLxHxK.shape} and k {k_BxLxGxK.shape}"
    )
  if impl == "xla":
    raise ValueError(
      "model.attention='xla' cannot merge two logit sets (pe.self_extend_window, "
      "pe.rerope_window); allowed: 'dense' or 'blockwise'"
    )
  return q_far_BxLxHxK, k_far_BxLxGxK


def _attend(
  q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, q_pos_BxL, k_pos_BxL, bias_fn, impl, block_size, far, window
):
  args = (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, q_pos_BxL, k_pos_BxL, bias_fn)
  if impl == "dense":
    return dense_attention(*args, far=far, window=window)
  if impl == "blockwise":
    return blockwise_attention(*args, block_size, far=far, window=window)
  return xla_attention(*args)


def _logits(q_BxQxGxK: jax.Array, k_BxKxGxK: jax.Array) -> jax.Array:
  """``q . k / sqrt(K)`` as float32 ``[B, G, Q, K]``."""
  scale = 1.0 / np.sqrt(q_BxQxGxK.shape[-1])
  logits = jnp.einsum("bqgd,bkgd->bgqk", q_BxQxGxK, k_BxKxGxK, preferred_element_type=jnp.float32)
  return logits * scale


def _weighted_values(p_BxGxQxK: jax.Array, v_BxKxGxD: jax.Array) -> jax.Array:
  """``sum_j p_ij v_j`` as float32 ``[B, Q, G, D]`` (p cast to v's dtype, fp32 accumulate)."""
  return jnp.einsum(
    "bgqk,bkgd->bqgd",
    p_BxGxQxK.astype(v_BxKxGxD.dtype),
    v_BxKxGxD,
    preferred_element_type=jnp.float32,
  )


def _fold_heads(q_BxLxHxK: jax.Array, groups: int) -> jax.Array:
  """``[B, L, H, K] -> [B, L R, G, K]``: head ``g R + r`` at position ``l`` is row ``l R + r``."""
  b, length, h, d = q_BxLxHxK.shape
  r = h // groups
  return q_BxLxHxK.reshape(b, length, groups, r, d).swapaxes(2, 3).reshape(b, length * r, groups, d)


def dense_attention(
  q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, q_pos_BxL, k_pos_BxL, bias_fn, far=None, window=None
):
  """Reference: full ``[B, H, L, L]`` logits, causal mask, softmax, weighted sum; with ``far``
  ``(q_far, k_far)``, logits ``q_far_i . k_far_j / sqrt(K)`` where ``i − j >= window``.

  Grouped as in ``flash_attention.py``: the ``R = H / G`` query heads of KV head ``g`` are
  folded into the query axis, ``M = L R`` rows ordered position-major (row ``l R + r`` is head
  ``g R + r`` at position ``l``), so the einsums are those of ``G`` heads over ``M`` queries, K/V
  are not repeated, and ``G = H`` is plain multi-head attention (the transposes move axes of
  size 1)."""
  b, length, h, d = q_BxLxHxK.shape
  g = k_BxLxGxK.shape[2]
  r = h // g
  logits_BxGxMxL = _logits(_fold_heads(q_BxLxHxK, g), k_BxLxGxK)
  query_M = jnp.arange(length * r) // r
  if far is not None:
    far_BxGxMxL = _logits(_fold_heads(far[0], g), far[1])
    near_MxL = query_M[:, None] - jnp.arange(length) < window
    logits_BxGxMxL = jnp.where(near_MxL, logits_BxGxMxL, far_BxGxMxL)
  if bias_fn is not None:
    logits_BxGxMxL = logits_BxGxMxL + pack_heads(bias_fn(q_pos_BxL, k_pos_BxL), g)
  causal_MxL = query_M[:, None] >= jnp.arange(length)
  logits_BxGxMxL = jnp.where(causal_MxL, logits_BxGxMxL, MASK_VALUE)
  probs_BxGxMxL = jax.nn.softmax(logits_BxGxMxL, axis=-1)
  out_BxMxGxK = _weighted_values(probs_BxGxMxL, v_BxLxGxK)
  out_BxLxHxK = out_BxMxGxK.reshape(b, length, r, g, d).swapaxes(2, 3).reshape(b, length, h, d)
  return out_BxLxHxK.astype(q_BxLxHxK.dtype)


def xla_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, q_pos_BxL, k_pos_BxL, bias_fn):
  """``jax.nn.dot_product_attention`` (takes ``G`` KV heads natively, same head grouping);
  cuDNN on GPU for half-precision inputs, else XLA."""
  half = q_BxLxHxK.dtype in (jnp.bfloat16, jnp.float16)
  implementation = "cudnn" if jax.default_backend() == "gpu" and half else None
  bias_BxHxLxL = None if bias_fn is None else bias_fn(q_pos_BxL, k_pos_BxL)
  if bias_BxHxLxL is not None and implementation == "cudnn":
    bias_BxHxLxL = bias_BxHxLxL.astype(q_BxLxHxK.dtype)
  return jax.nn.dot_product_attention(
    q_BxLxHxK,
    k_BxLxGxK,
    v_BxLxGxK,
    bias=bias_BxHxLxL,
    is_causal=True,
    implementation=implementation,
  )
