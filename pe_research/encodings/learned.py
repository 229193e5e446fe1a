"""Learned absolute positional embeddings (GPT-2 style): x[p] += E[p], E float ``[max_len, D]``.

A table cannot represent p ≥ max_len. Policy, in two layers:
  * a sequence longer than the table (static L > max_len) raises ``ValueError`` at trace time;
  * a position value ≥ max_len inside a shorter sequence (e.g. an offset window) cannot be
    seen at trace time, so the gather uses ``mode="fill"`` with NaN: the output (and the loss)
    becomes NaN instead of silently reusing the last row, as a clamped gather would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pe_research.encodings.base import PositionalEncoding
from pe_research.encodings.spec import POSITIVE, EncodingSpec, Field


@jax.jit
def learned_embedding(table_ZxD: jax.Array, pos_BxL: jax.Array) -> jax.Array:
  """Rows ``E[p]`` of ``table [Z, D]`` for ``pos [..., L]`` -> ``[..., L, D]``.

  Rows for p outside [0, Z) are NaN (never clamped); L > Z raises ``ValueError``.
  """
  num_rows = table_ZxD.shape[0]
  if pos_BxL.shape[-1] > num_rows:
    raise ValueError(
      f"sequence length {pos_BxL.shape[-1]} exceeds pe.max_len={num_rows}; a learned "
      "table cannot represent longer sequences (raise pe.max_len or pick another pe.name)"
    )
  return jnp.take(table_ZxD, pos_BxL, axis=0, mode="fill", fill_value=jnp.nan)


class LearnedAbsolute(PositionalEncoding):
  """Trainable table ``E [max_len, dim]``, initialised N(0, 0.02²) as in GPT-2."""

  def __init__(self, max_len: int, dim: int, *, rngs: nnx.Rngs):
    if max_len < 1:
      raise ValueError(f"pe.max_len={max_len} must be >= 1")
    self.max_length = max_len
    self.table = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_len, dim)))

  def embed(self, x_BxLxD: jax.Array, pos_BxL: jax.Array) -> jax.Array:
    return x_BxLxD + learned_embedding(self.table[...], pos_BxL).astype(x_BxLxD.dtype)


SPEC = EncodingSpec(
  fields=(Field("max_len", 2048, "Table size of learned absolute positions.", POSITIVE),),
  length_field="max_len",  # Positions >= pe.max_len have no row.
)


def build(pe_cfg, *, num_heads, head_dim, model_dim, rngs) -> LearnedAbsolute:
  del num_heads, head_dim
  return LearnedAbsolute(pe_cfg.max_len, model_dim, rngs=rngs)
