"""T5 relative position bias (Raffel et al. 2020): one learned scalar per (bucket, head).

  logit[b, h, i, j] += E[bucket(j − i), h]

The relative position is key − query (HF/Mesh-TF convention). Buckets are exact for small
distances and logarithmic up to ``max_distance``; everything farther shares the last bucket,
which is what lets T5 run on longer sequences than it was trained on. T5 itself uses no
1/√d logit scaling; that choice belongs to attention, not to this file.

In an attention kernel (:func:`t5_kernel_bias`): the same buckets per block, the lookup as a sum
over buckets of ``(bucket == z) · E[z, head_t]`` (no gather); the param is the table ``[H, Z]``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from pe_research import backend
from pe_research.encodings.base import KernelBias, PositionalEncoding, column, per_head
from pe_research.encodings.spec import POSITIVE, EncodingSpec, Field


def _validate(bidirectional: bool, num_buckets: int, max_distance: int) -> None:
  if bidirectional and (num_buckets < 4 or num_buckets % 2):
    raise ValueError(f"pe.t5_num_buckets={num_buckets} must be even and >= 4 when bidirectional")
  if num_buckets < 2:
    raise ValueError(f"pe.t5_num_buckets={num_buckets} must be >= 2")
  nb = num_buckets // 2 if bidirectional else num_buckets
  if max_distance <= nb // 2:
    raise ValueError(f"pe.t5_max_distance={max_distance} must be > {nb // 2} (the exact range)")


_STATIC = ("bidirectional", "num_buckets", "max_distance")


@functools.partial(jax.jit, static_argnames=_STATIC)
def t5_relative_position_bucket(
  relative_position: jax.Array,
  *,
  bidirectional: bool,
  num_buckets: int = 32,
  max_distance: int = 128,
) -> jax.Array:
  """Bucket index, int32 of the same shape, for ``relative_position = key − query``.

  bidirectional: nb = num_buckets/2, offset nb when rel > 0, n = |rel|;
  causal:        nb = num_buckets,   n = max(−rel, 0).
  max_exact = nb/2; bucket = n if n < max_exact, else
  min(max_exact + int(ln(n/max_exact) / ln(max_distance/max_exact) · (nb − max_exact)), nb − 1).
  """
  _validate(bidirectional, num_buckets, max_distance)
  rel = jnp.asarray(relative_position, jnp.int32)
  if bidirectional:
    nb = num_buckets // 2
    offset = jnp.where(rel > 0, nb, 0).astype(jnp.int32)
    n = jnp.abs(rel)
  else:
    nb = num_buckets
    offset = jnp.zeros_like(rel)
    n = jnp.maximum(-rel, 0)
  max_exact = nb // 2
  # log(0) is never selected below, but it must not produce inf/NaN in the unused branch.
  n_safe = jnp.maximum(n, max_exact).astype(jnp.float32)
  log_ratio = jnp.log(n_safe / max_exact) / math.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (nb - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, nb - 1)
  return offset + jnp.where(n < max_exact, n, large)


@functools.partial(jax.jit, static_argnames=_STATIC)
def t5_bias(
  q_pos_BxQ: jax.Array,
  k_pos_BxK: jax.Array,
  table_ZxH: jax.Array,
  *,
  bidirectional: bool,
  num_buckets: int,
  max_distance: int,
) -> jax.Array:
  """float32 ``[B, H, Q, K]``: ``table[bucket(k_pos − q_pos), h]``, table ``[num_buckets, H]``.

  The lookup is the backend's (:func:`~pe_research.backend.lookup_columns`).
  """
  bucket_BxQxK = t5_relative_position_bucket(
    k_pos_BxK[:, None, :] - q_pos_BxQ[:, :, None],
    bidirectional=bidirectional,
    num_buckets=num_buckets,
    max_distance=max_distance,
  )
  return jnp.moveaxis(backend.lookup_columns(table_ZxH, bucket_BxQxK), 0, 1)


def t5_kernel_bias(q_pos_Tx1, k_pos_1xP, head_Tx1, table_HxZ, **bucket_kwargs) -> jax.Array:
  """float32 ``[T, P]`` bias ``E[bucket(j − i), head_t]`` of a kernel block (``base.KernelBias``);
  ``bucket_kwargs``: bidirectional, num_buckets, max_distance."""
  bucket_TxP = t5_relative_position_bucket(k_pos_1xP - q_pos_Tx1, **bucket_kwargs)
  bias_TxP = jnp.zeros(bucket_TxP.shape, jnp.float32)
  for z in range(table_HxZ.shape[1]):
    e_Tx1 = per_head(column(table_HxZ, z), head_Tx1)
    bias_TxP = bias_TxP + jnp.where(bucket_TxP == z, e_Tx1, 0.0)
  return bias_TxP


class T5RelativeBias(PositionalEncoding):
  """Table ``E [num_buckets, H]`` initialised N(0, model_dim^−1) as in HF T5."""

  has_bias = True

  def __init__(
    self,
    num_heads: int,
    *,
    num_buckets: int,
    max_distance: int,
    bidirectional: bool,
    init_std: float,
    rngs: nnx.Rngs,
  ):
    _validate(bidirectional, num_buckets, max_distance)
    self.num_buckets = num_buckets
    self.max_distance = max_distance
    self.bidirectional = bidirectional
    init = nnx.initializers.normal(init_std)
    self.table = nnx.Param(init(rngs.params(), (num_buckets, num_heads)))

  def bias(self, q_pos_BxQ: jax.Array, k_pos_BxK: jax.Array) -> jax.Array:
    return t5_bias(
      q_pos_BxQ,
      k_pos_BxK,
      self.table[...],
      bidirectional=self.bidirectional,
      num_buckets=self.num_buckets,
      max_distance=self.max_distance,
    )

  def kernel_bias(self) -> KernelBias:
    fn = functools.partial(
      t5_kernel_bias,
      bidirectional=self.bidirectional,
      num_buckets=self.num_buckets,
      max_distance=self.max_distance,
    )
    return KernelBias(fn, (self.table[...].T,))


SPEC = EncodingSpec(
  fields=(
    Field("t5_num_buckets", 32, "T5 relative-position buckets.", POSITIVE),
    Field("t5_max_distance", 128, "T5 distance beyond which buckets saturate.", POSITIVE),
  )
)


def build(pe_cfg, *, num_heads, head_dim, model_dim, rngs) -> T5RelativeBias:
  del head_dim
  return T5RelativeBias(
    num_heads,
    num_buckets=pe_cfg.t5_num_buckets,
    max_distance=pe_cfg.t5_max_distance,
    bidirectional=False,  # Decoder-only causal LMs: keys never come after the query.
    init_std=model_dim**-0.5,
    rngs=rngs,
  )
