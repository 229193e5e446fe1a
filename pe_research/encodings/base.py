"""The one interface between attention and a positional encoding.

Attention never names an encoding. It asks the encoding three questions, each with a
do-nothing default, so a new encoding is one new file plus one registry line:

  * ``positions(batch, length, train=...)`` -> int32 ``[B, L]`` positions to use, or
    ``[1, L]`` when every row has the same positions (the default ``0 .. L-1``): the hooks
    broadcast over B, so a bias or rotation table is then computed once, not once per row
    (randomized encodings draw ``[B, L]`` from an ``nnx.Rngs`` they own, so the draw is
    model state);
  * ``embed(x_BxLxD, pos_BxL)``        -> embeddings with the encoding added (absolute PEs);
  * ``rotate(x_BxLxHxK, pos_BxL, is_query=...)`` -> q or k transformed (RoPE, xPos);
  * ``bias(q_pos_BxQ, k_pos_BxK)``     -> float32 ``[B or 1, H, Q, K]`` added to the logits
    (ALiBi, T5, KERPLE, FIRE), or ``None``. Blockwise attention calls it once per
    (query block, key block), so it must depend on positions only, never on L.

``has_bias`` is a static flag so attention can skip the bias path at trace time.
``max_length`` is the longest sequence the encoding can represent (None: unbounded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def sequential_positions(batch: int, length: int, offset: int = 0) -> jax.Array:
  """Positions ``offset .. offset+length-1`` for every row: int32 ``[batch, length]``."""
  pos_L = jnp.arange(offset, offset + length, dtype=jnp.int32)
  return jnp.broadcast_to(pos_L, (batch, length))


class PositionalEncoding(nnx.Module):
  """Base class: every hook is the identity. Subclasses override what they need."""

  has_bias: bool = False
  max_length: int | None = None

  def positions(self, batch: int, length: int, *, train: bool) -> jax.Array:
    """``0 .. length-1`` as one int32 ``[1, length]`` row, shared by all ``batch`` rows."""
    del batch, train
    return sequential_positions(1, length)

  def embed(self, x_BxLxD: jax.Array, pos_BxL: jax.Array) -> jax.Array:
    del pos_BxL
    return x_BxLxD

  def rotate(self, x_BxLxHxK: jax.Array, pos_BxL: jax.Array, *, is_query: bool) -> jax.Array:
    del pos_BxL, is_query
    return x_BxLxHxK

  def bias(self, q_pos_BxQ: jax.Array, k_pos_BxK: jax.Array) -> jax.Array | None:
    del q_pos_BxQ, k_pos_BxK
    return None
