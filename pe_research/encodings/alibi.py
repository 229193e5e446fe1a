"""ALiBi (Press et al. 2022): a fixed linear penalty on attention logits, no input encoding.

  logit[b, h, i, j] += −m_h · (i − j)

with i the query position and j the key position. We follow the paper: the bias is
−m·(i − j), meaningful for j ≤ i; for j > i it is positive, and the causal mask removes those
entries. (The symmetric −m·|i − j| would only matter for bidirectional attention, which this
codebase does not train.)

In an attention kernel (:func:`alibi_kernel_bias`): the same −m·(i − j) per block of rows, each
row's slope picked from the static slopes (``base.per_head``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pe_research.encodings.base import KernelBias, PositionalEncoding, per_head
from pe_research.encodings.spec import EncodingSpec


def _power_of_two_slopes(n: int) -> list[float]:
  return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Per-head slopes m, float32 ``[num_heads]``, by the reference algorithm.

  A NumPy array, so building the model also works under ``jax.eval_shape`` (``--dry_run``).

  n a power of two: m_k = 2^(−8k/n), k = 1..n (a geometric sequence with ratio 2^(−8/n)).
  Otherwise, with p = 2^floor(log2 n): slopes(p) + slopes(2p)[0::2][:n − p],
  e.g. n = 6 -> [1/4, 1/16, 1/64, 1/256, 1/2, 1/8].
  """
  if num_heads < 1:
    raise ValueError(f"num_heads={num_heads} must be >= 1")
  p = 2 ** math.floor(math.log2(num_heads))
  slopes = _power_of_two_slopes(p) + _power_of_two_slopes(2 * p)[0::2][: num_heads - p]
  return np.asarray(slopes, np.float32)


@jax.jit
def alibi_bias(q_pos_BxQ: jax.Array, k_pos_BxK: jax.Array, slopes_H: jax.Array) -> jax.Array:
  """float32 ``[B, H, Q, K]`` bias −m_h·(i − j), i = q_pos[b, q], j = k_pos[b, k]."""
  dist_BxQxK = (q_pos_BxQ[:, :, None] - k_pos_BxK[:, None, :]).astype(jnp.float32)
  return -slopes_H[None, :, None, None] * dist_BxQxK[:, None, :, :]


def alibi_kernel_bias(q_pos_Tx1, k_pos_1xP, head_Tx1, *, slopes: tuple[float, ...]) -> jax.Array:
  """float32 ``[T, P]`` bias −m_{head_t}·(i − j) of a kernel block (``base.KernelBias``)."""
  dist_TxP = (q_pos_Tx1 - k_pos_1xP).astype(jnp.float32)
  return -per_head(slopes, head_Tx1) * dist_TxP


class ALiBi(PositionalEncoding):
  """Fixed slopes, no parameters: the slopes are static floats, a constant under jit."""

  has_bias = True

  def __init__(self, num_heads: int):
    self.slopes = tuple(alibi_slopes(num_heads).tolist())

  def bias(self, q_pos_BxQ: jax.Array, k_pos_BxK: jax.Array) -> jax.Array:
    return alibi_bias(q_pos_BxQ, k_pos_BxK, np.asarray(self.slopes, np.float32))

  def kernel_bias(self) -> KernelBias:
    return KernelBias(functools.partial(alibi_kernel_bias, slopes=self.slopes))


SPEC = EncodingSpec()  # No config fields: the slopes follow from the head count.


def build(pe_cfg, *, num_heads, head_dim, model_dim, rngs) -> ALiBi:
  del pe_cfg, head_dim, model_dim, rngs
  return ALiBi(num_heads)
