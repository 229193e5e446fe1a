"""The training loss: ``sum(weights * NLL) / sum(weights)`` in float32, with a softmax NLL whose
gradient is written once in the logits' dtype."""

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
