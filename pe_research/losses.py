"""The training loss: ``sum(weights * NLL) / sum(weights)`` in float32, with a softmax NLL whose
gradient is written once in the logits' dtype; and scoring's NLL and argmax hits over chunks of
the vocabulary (:func:`nll_and_hits_by_vocab_chunks`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def softmax_nll(logits_NxV: jax.Array, targets_N: jax.Array) -> jax.Array:
  """``logsumexp(logits) - logits[target]`` per row, float32 whatever the logits' dtype.

  Same values and gradient as ``optax.softmax_cross_entropy_with_integer_labels`` on the
  float32 logits; the gradient ``(softmax - onehot) g`` is computed in float32 and written once,
  in the logits' dtype. bf16 training: one pass over ``[N, V]`` instead of an fp32 gradient and
  a separate conversion kernel (measured on an H200: docs/gpu_benchmark.md).
  """
  return _softmax_nll_fwd(logits_NxV, targets_N)[0]


def _softmax_nll_fwd(logits_NxV, targets_N):
  logits_f32_NxV = logits_NxV.astype(jnp.float32)
  lse_N = jax.nn.logsumexp(logits_f32_NxV, axis=-1)
  target_N = jnp.take_along_axis(logits_f32_NxV, targets_N[:, None], axis=-1)[:, 0]
  return lse_N - target_N, (logits_NxV, targets_N, lse_N)


def _softmax_nll_bwd(residuals, g_N):
  logits_NxV, targets_N, lse_N = residuals
  probs_NxV = jnp.exp(logits_NxV.astype(jnp.float32) - lse_N[:, None])
  onehot_NxV = jnp.arange(logits_NxV.shape[-1]) == targets_N[:, None]
  grad_NxV = (probs_NxV - onehot_NxV) * g_N[:, None]
  return grad_NxV.astype(logits_NxV.dtype), None


softmax_nll.defvjp(_softmax_nll_fwd, _softmax_nll_bwd)


def weighted_nll_sums(logits_BxLxV, targets_BxL, weights_BxL) -> tuple[jax.Array, jax.Array]:
  """``(sum(weights * NLL), sum(weights))`` in float32: the loss's numerator and denominator."""
  v = logits_BxLxV.shape[-1]
  nll_N = softmax_nll(logits_BxLxV.reshape(-1, v), targets_BxL.reshape(-1))
  weights_N = weights_BxL.reshape(-1)
  return jnp.sum(weights_N * nll_N), jnp.sum(weights_N)


def weighted_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL) -> jax.Array:
  """``sum(weights * NLL) / sum(weights)`` in float32 (0 if every weight is 0)."""
  total, weight = weighted_nll_sums(logits_BxLxV, targets_BxL, weights_BxL)
  return total / jnp.maximum(weight, 1.0)


def max_and_first_argmax(x_BxCxK: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """``(max(x, -1), argmax(x, -1))``, the argmax the first index of the maximum (``jnp.argmax``'s
  tie rule), for x without NaN, found through maxima of ``block`` entries: the first block whose
  maximum is the row's, then the first index in it that holds that maximum.

  The same values as ``jnp.argmax``. XLA:CPU runs ``jnp.argmax`` as a (value, index) reduction
  it does not vectorise: 20 ms over ``[1024, 8192]`` against 3 ms for this form (two plain
  maxima and an argmax over 1/``block`` of the entries; docs/cpu_performance.md). A row of
  K entries that ``block`` does not divide takes ``jnp.argmax``."""
  *lead, k = x_BxCxK.shape
  if k % block or k < 2 * block:
    return x_BxCxK.max(axis=-1), jnp.argmax(x_BxCxK, axis=-1)
  blocks_BxCxNxK = x_BxCxK.reshape(*lead, k // block, block)
  block_max_BxCxN = blocks_BxCxNxK.max(axis=-1)
  first_block_BxC = jnp.argmax(block_max_BxCxN, axis=-1)
  index_BxCx1x1 = first_block_BxC[..., None, None]
  inside_BxCxK = jnp.take_along_axis(blocks_BxCxNxK, index_BxCx1x1, axis=-2)[..., 0, :]
  return block_max_BxCxN.max(axis=-1), first_block_BxC * block + jnp.argmax(inside_BxCxK, -1)


def nll_and_hits_by_vocab_chunks(
  logits_fn, vocab: int, chunk: int, targets_BxC: jax.Array, *, argmax_block: int = 128
):
  """``(nll, hit)``: ``logsumexp(logits) - logits[target]`` (float32) and
  ``argmax(logits) == target`` for logits ``[B, C, V]`` that ``logits_fn(start, size)`` gives
  ``chunk`` vocabulary entries at a time (float32 ``[B, C, size]``).

  The logsumexp is online over the chunks (running max ``m``, sum rescaled by ``exp(m_old −
  m_new)``, as flash attention's softmax; ``m`` without a gradient, which the logsumexp does not
  depend on), the target's logit is taken from the chunk that holds it, and the argmax is the
  first index of the running maximum (``jnp.argmax``'s tie rule; each chunk's by
  :func:`max_and_first_argmax` over ``argmax_block`` entries). A row with a NaN logit has a NaN
  NLL and no hit. Equal to the one-shot formulas to float32 rounding; the ``[B, C, V]`` logits
  never exist at once, so each chunk's exp pass reads what its matmul just wrote
  (docs/cpu_performance.md)."""
  m = total = target = arg = None
  for start in range(0, vocab, chunk):
    size = min(chunk, vocab - start)
    logits_BxCxK = logits_fn(start, size)
    local_BxC = targets_BxC - start
    inside_BxC = (local_BxC >= 0) & (local_BxC < size)
    picked_BxC = jnp.take_along_axis(
      logits_BxCxK, jnp.clip(local_BxC, 0, size - 1)[..., None], axis=-1
    )[..., 0]
    picked_BxC = jnp.where(inside_BxC, picked_BxC, 0.0)
    chunk_max_BxC, chunk_arg_BxC = max_and_first_argmax(
      jax.lax.stop_gradient(logits_BxCxK), argmax_block
    )
    chunk_arg_BxC = chunk_arg_BxC + start
    if m is None:
      m, total, target, arg = chunk_max_BxC, 0.0, picked_BxC, chunk_arg_BxC
    else:
      arg = jnp.where(chunk_max_BxC > m, chunk_arg_BxC, arg)
      target = target + picked_BxC
    m_new = jnp.maximum(m, chunk_max_BxC)
    total = total * jnp.exp(m - m_new) + jnp.exp(logits_BxCxK - m_new[..., None]).sum(axis=-1)
    m = m_new
  nll = m + jnp.log(total) - target
  return nll, (arg == targets_BxC) & ~jnp.isnan(nll)
