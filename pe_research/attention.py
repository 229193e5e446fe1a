"""Causal multi-head attention: one formula, three implementations.

For queries ``i`` and keys ``j`` of one sequence (``p`` = positions from the encoding)::

  out_i = sum_{j <= i} softmax_j(q_i . k_j / sqrt(E) + bias(p_i, p_j)) v_j

The ``1/sqrt(E)`` scaling is applied for every encoding (T5 omits it; we keep it uniform).
The causal mask is on sequence *index* (``j <= i``), not on position values, so randomized
positions cannot leak the future. ``bias_fn(q_pos_BxQ, k_pos_BxK) -> [B, H, Q, K]`` is the
encoding's logit bias (or ``None``); attention never knows which encoding it came from.
Grouped-query attention: k and v may have ``G`` heads, ``G`` dividing ``H``; query head ``h``
reads KV head ``h // (H / G)`` (HF ``repeat_kv``); ``G = 1`` is multi-query attention.
A far logit set (the encoding's ``window`` W and ``rotate_far``: Self-Extend, ReRoPE) replaces
``q_i . k_j`` by ``q_far_i . k_far_j`` where ``i − j >= W`` (sequence indices), before the bias,
the mask and the one softmax: ``dense``, ``blockwise`` and ``pallas`` take it, ``xla`` raises (one
``jax.nn.dot_product_attention`` call has one logit set; a silent dense fallback would
materialise ``[B, H, L, L]`` at the long lengths these methods are for).

Implementations (``impl``), equal to 1e-5 in fp32:
  * ``dense``: einsum reference; materialises ``[B, H, L, L]`` logits.
  * ``blockwise``: flash attention (``flash_attention.py``): online softmax over blocks of
    ``block_size``, blocks above the diagonal skipped in both passes, a custom VJP that
    recomputes blocks instead of storing probabilities, ``bias_fn`` called per block pair (its
    parameters get gradients); memory linear in L.
  * ``xla``: ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU for bf16/fp16).
  * ``fast``: the backend policy's choice for this encoding (:func:`backend.fast_attention`).
  * ``pallas``: the flash algorithm as a Pallas kernel (``kernels/pallas_attention.py``: Mosaic
    on TPU; ``kernels/pallas_gpu.py``: Triton on GPU; interpreted elsewhere), the bias computed
    inside it from the encoding's ``kernel_bias()`` (``bias_fn`` must be an encoding's bound
    ``bias``).
  * ``splash``: JAX's splash attention kernel (``kernels/splash.py``), no bias or far set.

Logits, softmax and accumulation are float32 whatever the input dtype (bf16 matmuls accumulate
in fp32); the output has the operand dtype (:func:`attend`'s ``operand_dtype``, default ``q``'s).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pe_research import backend, context_parallel, sharding
from pe_research.flash_attention import MASK_VALUE, blockwise_attention, pack_heads
from pe_research.kernels.pallas_attention import kernel_bias_of, pallas_attention
from pe_research.kernels.splash import splash_attention

BiasFn = Callable[[jax.Array, jax.Array], jax.Array | None]
IMPLEMENTATIONS = ("dense", "blockwise", "xla", "pallas", "splash", "fast")


def attend(
  q_BxLxHxE: jax.Array,
  k_BxLxGxE: jax.Array,
  v_BxLxGxE: jax.Array,
  *,
  q_pos_BxL: jax.Array,
  k_pos_BxL: jax.Array,
  bias_fn: BiasFn | None = None,
  impl: str = "dense",
  block_size: int = 256,
  operand_dtype=None,
  q_far_BxLxHxE: jax.Array | None = None,
  k_far_BxLxGxE: jax.Array | None = None,
  window: int | None = None,
  context_strategy: str | None = None,
) -> jax.Array:
  """Causal attention of q ``[B, L, H, E]`` over k, v ``[B, L, G, E]`` (``G`` dividing ``H``)
  -> ``[B, L, H, E]`` with the implementation ``impl`` (over the backend's pieces of the batch,
  :func:`~pe_research.backend.over_batch_pieces`). ``operand_dtype`` (default: ``q``'s dtype):
  q, k and v are rounded to it, and the output is in it; their
  gradients come back in their own dtype. ``window`` W with ``q_far``, ``k_far`` (shaped as q,
  k): the far logit set of pairs with ``i − j >= W`` (module docstring). Under a mesh with a
  "context" axis of size > 1, ``dense`` and ``blockwise`` run context-parallel
  (``context_parallel.py``) with ``context_strategy``: "all_gather" (None) or "ring"."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={impl!r} is unknown; allowed: {', '.join(IMPLEMENTATIONS)}")
  two_sets = window is not None or q_far_BxLxHxE is not None or k_far_BxLxGxE is not None
  if impl == "fast":
    impl = backend.fast_attention(biased=bias_fn is not None or two_sets)
  if impl == "splash" and (bias_fn is not None or two_sets):
    raise ValueError(
      "model.attention='splash' takes no bias and one logit set; allowed: 'pallas' (or "
      "'dense', 'blockwise') for bias encodings, Self-Extend and ReRoPE"
    )
  far = None
  if two_sets:
    far = _check_far(q_BxLxHxE, k_BxLxGxE, q_far_BxLxHxE, k_far_BxLxGxE, window, impl)
  b, length, h, d = q_BxLxHxE.shape
  g = k_BxLxGxE.shape[2]
  if k_BxLxGxE.shape != (b, length, g, d) or v_BxLxGxE.shape != k_BxLxGxE.shape or h % g:
    raise ValueError(
      f"attention needs q [B, L, H, E] and k, v [B, L, G, E] with G dividing H; got q "
      f"{q_BxLxHxE.shape}, k {k_BxLxGxE.shape}, v {v_BxLxGxE.shape}"
    )
  dtype = operand_dtype or q_BxLxHxE.dtype
  q_far_BxLxHxE, k_far_BxLxGxE = far or (None, None)
  if impl != "xla" and context_parallel.context_size() > 1:
    cast = lambda x: x.astype(dtype)
    return context_parallel.attention(
      *map(cast, (q_BxLxHxE, k_BxLxGxE, v_BxLxGxE)),
      q_pos_BxL,
      k_pos_BxL,
      bias_fn,
      block_size,
      None if far is None else tuple(map(cast, far)),
      window,
      context_strategy or "all_gather",
    )

  def attend_rows(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, q_pos_BxL, k_pos_BxL, q_far, k_far):
    q_BxLxHxE, k_BxLxGxE, v_BxLxGxE = (x.astype(dtype) for x in (q_BxLxHxE, k_BxLxGxE, v_BxLxGxE))
    far = None if q_far is None else (q_far.astype(dtype), k_far.astype(dtype))
    args = (q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, q_pos_BxL, k_pos_BxL, bias_fn)
    if impl == "dense":
      return dense_attention(*args, far=far, window=window)
    if impl == "blockwise":
      return blockwise_attention(*args, block_size, far=far, window=window)
    if impl == "splash":
      return splash_attention(
        *args[:3], block_size, interpret=backend.policy().interprets("mosaic")
      )
    if impl == "pallas":
      return pallas_attention(
        *args[:5],
        kernel_bias_of(bias_fn),
        block_size,
        far=far,
        window=window,
        interpret=backend.policy().pallas_interpret,
        lowering=backend.policy().pallas_lowering,
      )
    return xla_attention(*args)

  args = (q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, q_pos_BxL, k_pos_BxL, q_far_BxLxHxE, k_far_BxLxGxE)
  if impl in ("pallas", "splash"):  # Mosaic kernels run per device: one shard of the batch each.
    return sharding.per_batch_shard(lambda *a: backend.over_batch_pieces(attend_rows, *a), *args)
  return backend.over_batch_pieces(attend_rows, *args)


def _check_far(q_BxLxHxE, k_BxLxGxE, q_far_BxLxHxE, k_far_BxLxGxE, window, impl):
  """``(q_far, k_far)`` after checking them and ``window`` (one-line ValueErrors)."""
  if q_far_BxLxHxE is None or k_far_BxLxGxE is None or window is None:
    raise ValueError("attend: window, q_far and k_far go together; allowed: all three or none")
  if not (isinstance(window, int) and window > 0):
    raise ValueError(f"attend: window={window!r} is invalid; allowed: an int W > 0")
  if q_far_BxLxHxE.shape != q_BxLxHxE.shape or k_far_BxLxGxE.shape != k_BxLxGxE.shape:
    raise ValueError(
      f"attend: q_far {q_far_BxLxHxE.shape} and k_far {k_far_BxLxGxE.shape} must be shaped as "
      f"q {q_BxLxHxE.shape} and k {k_BxLxGxE.shape}"
    )
  if impl == "xla":
    raise ValueError(
      "model.attention='xla' cannot merge two logit sets (pe.self_extend_window, "
      "pe.rerope_window); allowed: 'dense', 'blockwise' or 'pallas'"
    )
  return q_far_BxLxHxE, k_far_BxLxGxE


def _logits(q_BxQxGxE: jax.Array, k_BxKxGxE: jax.Array) -> jax.Array:
  """``q . k / sqrt(E)`` as float32 ``[B, G, Q, K]``."""
  scale = 1.0 / np.sqrt(q_BxQxGxE.shape[-1])
  logits = jnp.einsum("bqgd,bkgd->bgqk", q_BxQxGxE, k_BxKxGxE, preferred_element_type=jnp.float32)
  return logits * scale


def _weighted_values(p_BxGxQxK: jax.Array, v_BxKxGxE: jax.Array) -> jax.Array:
  """``sum_j p_ij v_j`` as float32 ``[B, Q, G, E]`` (p cast to v's dtype, fp32 accumulate)."""
  return jnp.einsum(
    "bgqk,bkgd->bqgd",
    p_BxGxQxK.astype(v_BxKxGxE.dtype),
    v_BxKxGxE,
    preferred_element_type=jnp.float32,
  )


def _fold_heads(q_BxLxHxE: jax.Array, groups: int) -> jax.Array:
  """``[B, L, H, E] -> [B, L Y, G, E]``: head ``g Y + y`` at position ``l`` is row ``l Y + y``."""
  b, length, h, d = q_BxLxHxE.shape
  r = h // groups
  return q_BxLxHxE.reshape(b, length, groups, r, d).swapaxes(2, 3).reshape(b, length * r, groups, d)


def dense_attention(
  q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, q_pos_BxL, k_pos_BxL, bias_fn, far=None, window=None
):
  """Reference: full ``[B, H, L, L]`` logits, causal mask, softmax, weighted sum; with ``far``
  ``(q_far, k_far)``, logits ``q_far_i . k_far_j / sqrt(E)`` where ``i − j >= window``.

  Grouped as in ``flash_attention.py``: the ``Y = H / G`` query heads of KV head ``g`` are
  folded into the query axis, ``M = L Y`` rows ordered position-major (row ``l Y + y`` is head
  ``g Y + y`` at position ``l``), so the einsums are those of ``G`` heads over ``M`` queries, K/V
  are not repeated, and ``G = H`` is plain multi-head attention (the transposes move axes of
  size 1)."""
  b, length, h, d = q_BxLxHxE.shape
  g = k_BxLxGxE.shape[2]
  r = h // g
  logits_BxGxMxL = _logits(_fold_heads(q_BxLxHxE, g), k_BxLxGxE)
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
  out_BxMxGxE = _weighted_values(probs_BxGxMxL, v_BxLxGxE)
  out_BxLxHxE = out_BxMxGxE.reshape(b, length, r, g, d).swapaxes(2, 3).reshape(b, length, h, d)
  return out_BxLxHxE.astype(q_BxLxHxE.dtype)


def xla_attention(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, q_pos_BxL, k_pos_BxL, bias_fn):
  """``jax.nn.dot_product_attention`` (takes ``G`` KV heads natively, same head grouping);
  cuDNN on GPU for half-precision inputs, else XLA."""
  implementation = backend.dot_product_attention_implementation(q_BxLxHxE.dtype)
  bias_BxHxLxL = None if bias_fn is None else bias_fn(q_pos_BxL, k_pos_BxL)
  if bias_BxHxLxL is not None and implementation == "cudnn":
    bias_BxHxLxL = bias_BxHxLxL.astype(q_BxLxHxE.dtype)
  return jax.nn.dot_product_attention(
    q_BxLxHxE,
    k_BxLxGxE,
    v_BxLxGxE,
    bias=bias_BxHxLxL,
    is_causal=True,
    implementation=implementation,
  )
