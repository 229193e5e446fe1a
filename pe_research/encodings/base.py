"""The one interface between attention and a positional encoding.

Attention never names an encoding. It asks the encoding these questions, each with a
do-nothing default, so a new encoding is one new file plus one registry line:

  * ``positions(batch, length, train=...)`` -> int32 ``[B, L]`` positions to use, or
    ``[1, L]`` when every row has the same positions (the default ``0 .. L-1``): the hooks
    broadcast over B, so a bias or rotation table is then computed once, not once per row
    (the wrappers that change training positions around any encoding, randomized.py and
    pose.py, draw ``[B, L]`` from an ``nnx.Rngs`` they own, so the draw is model state);
  * ``embed(x_BxLxD, pos_BxL)``        -> embeddings with the encoding added (absolute PEs);
  * ``rotate(x_BxLxHxE, pos_BxL, is_query=...)`` -> q or k transformed (RoPE, xPos);
  * ``bias(q_pos_BxQ, k_pos_BxK)``     -> float32 ``[B or 1, H, Q, K]`` added to the logits
    (ALiBi, T5, KERPLE, FIRE), or ``None``. Blockwise attention calls it once per
    (query block, key block), so it must depend on positions only, never on L;
  * ``kernel_bias()`` -> :class:`KernelBias` or None: the same bias in the form an attention
    kernel (``pe_research/kernels``) evaluates inside itself, block by block, from position
    blocks, head indices and the parameters (2-D elementwise jnp, no gather); None for an
    encoding without a bias. Rotations (RoPE, xPos, log-n, the far set) need no kernel form:
    they are applied to q and k before attention;
  * ``rotate_far(x_BxLxHxE, pos_BxL, is_query=...)`` -> q or k of the far logit set, asked
    only when ``window`` is an int W: query i and key j with ``i − j >= W`` (sequence
    indices) get the logit ``q_far_i . k_far_j`` instead of ``q_i . k_j``, merged before the
    softmax (Self-Extend, ReRoPE: ``rope_extension.py``).

Training asks one more question, after each optimizer step:

  * ``project()`` -> None: puts learned parameters back into their allowed set, in place
    (KERPLE: r1, r2 >= 1e-2), so the forward pass uses them as they are and a parameter at
    its bound still gets a gradient (a projected gradient step).

``has_bias`` is a static flag so attention can skip the bias path at trace time.
``max_length`` is the longest sequence the encoding can represent (None: unbounded).
``window`` is None for one logit set (every encoding but a windowed RoPE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def sequential_positions(batch: int, length: int, offset: int = 0) -> jax.Array:
  """Positions ``offset .. offset+length-1`` for every row: int32 ``[batch, length]``."""
  pos_L = jnp.arange(offset, offset + length, dtype=jnp.int32)
  return jnp.broadcast_to(pos_L, (batch, length))


@dataclasses.dataclass(frozen=True, eq=False)
class KernelBias:
  """An encoding's bias as a kernel computes it per block of scores:

    ``fn(q_pos_Tx1, k_pos_1xP, head_Tx1, *params) -> float32 [T, P]``

  row ``t`` of the block being query head ``head_t`` at position ``q_pos_t`` (int32), column
  ``p`` the key at ``k_pos_p``, so ``fn(...)[t, p] == bias(q_pos, k_pos)[b, head_t, t, p]``.
  ``params``: the learned parameters ``fn`` reads, 2-D float32 arrays (the kernel returns their
  gradients); everything else ``fn`` needs is static (Python numbers). ``fn`` uses 2-D
  elementwise ops, reductions and selects only, the ops both Pallas lowerings take: no gather
  and no slice (Triton has neither; :func:`per_head`, :func:`column` pick values by select and
  sum). A param padded with zeros along any axis gives the same bias (the GPU kernel pads
  every array to power-of-two sides, as Triton needs)."""

  fn: Callable[..., jax.Array]
  params: tuple[jax.Array, ...] = ()


def column(x_RxN: jax.Array, n: int) -> jax.Array:
  """``x[:, n:n+1]`` as a select and a sum over columns (kernels cannot slice a value)."""
  picked = jax.lax.broadcasted_iota(jnp.int32, x_RxN.shape, 1) == n
  return jnp.sum(jnp.where(picked, x_RxN, 0.0), axis=1, keepdims=True)


def per_head(values: Sequence[float] | jax.Array, head_Tx1: jax.Array) -> jax.Array:
  """``values[head_t]`` for every row ``t``: ``[T, 1]`` from a sequence of H floats, ``[T, N]``
  from an ``[H, N]`` array. A sum of one-hot selects: kernels have no gather (and no slice)."""
  out = None
  for h in range(len(values)):
    if isinstance(values, Sequence):
      row = values[h]
    else:
      picked = jax.lax.broadcasted_iota(jnp.int32, values.shape, 0) == h
      row = jnp.sum(jnp.where(picked, values, 0.0), axis=0, keepdims=True)
    term = jnp.where(head_Tx1 == h, row, 0.0)
    out = term if out is None else out + term
  return out


class PositionalEncoding(nnx.Module):
  """Base class: every hook is the identity. Subclasses override what they need."""

  has_bias: bool = False
  max_length: int | None = None
  window: int | None = None

  def positions(self, batch: int, length: int, *, train: bool) -> jax.Array:
    """``0 .. length-1`` as one int32 ``[1, length]`` row, shared by all ``batch`` rows."""
    del batch, train
    return sequential_positions(1, length)

  def embed(self, x_BxLxD: jax.Array, pos_BxL: jax.Array) -> jax.Array:
    del pos_BxL
    return x_BxLxD

  def rotate(self, x_BxLxHxE: jax.Array, pos_BxL: jax.Array, *, is_query: bool) -> jax.Array:
    del pos_BxL, is_query
    return x_BxLxHxE

  def rotate_far(self, x_BxLxHxE: jax.Array, pos_BxL: jax.Array, *, is_query: bool) -> jax.Array:
    return self.rotate(x_BxLxHxE, pos_BxL, is_query=is_query)

  def bias(self, q_pos_BxQ: jax.Array, k_pos_BxK: jax.Array) -> jax.Array | None:
    del q_pos_BxQ, k_pos_BxK
    return None

  def far_set(self, q_BxLxHxE: jax.Array, k_BxLxGxE: jax.Array, pos_BxL: jax.Array, dtype=None):
    """``attend``'s keywords for the far logit set: ``q_far``, ``k_far`` (``rotate_far``, cast
    to ``dtype`` if given) and ``window``; ``{}`` when ``window`` is None (one logit set)."""
    if self.window is None:
      return {}

    def far(x, is_query):
      x_far = self.rotate_far(x, pos_BxL, is_query=is_query)
      return x_far if dtype is None else x_far.astype(dtype)

    return dict(
      q_far_BxLxHxE=far(q_BxLxHxE, True), k_far_BxLxGxE=far(k_BxLxGxE, False), window=self.window
    )

  def kernel_bias(self) -> KernelBias | None:
    return None

  def project(self) -> None:
    """Nothing to project: no parameter of this encoding is constrained."""


class PositionsWrapper(PositionalEncoding):
  """An encoding that only chooses the positions (randomized, PoSE): ``embed``, ``rotate``,
  ``rotate_far``, ``bias``, ``kernel_bias``, ``project``, ``has_bias`` and ``window`` are the
  wrapped ``base``'s."""

  def __init__(self, base: PositionalEncoding, *, longest: int, field: str):
    """``longest``: the largest position the wrapper may draw (``field`` names its config)."""
    if base.max_length is not None and longest > base.max_length:
      raise ValueError(
        f"{field}={longest} exceeds the base encoding's max_length={base.max_length} (e.g. "
        f"pe.max_len of 'learned'); allowed: <= {base.max_length}"
      )
    self.base = base
    self.has_bias = base.has_bias
    self.window = base.window

  def embed(self, x_BxLxD: jax.Array, pos_BxL: jax.Array) -> jax.Array:
    return self.base.embed(x_BxLxD, pos_BxL)

  def rotate(self, x_BxLxHxE: jax.Array, pos_BxL: jax.Array, *, is_query: bool) -> jax.Array:
    return self.base.rotate(x_BxLxHxE, pos_BxL, is_query=is_query)

  def rotate_far(self, x_BxLxHxE: jax.Array, pos_BxL: jax.Array, *, is_query: bool) -> jax.Array:
    return self.base.rotate_far(x_BxLxHxE, pos_BxL, is_query=is_query)

  def bias(self, q_pos_BxQ: jax.Array, k_pos_BxK: jax.Array) -> jax.Array | None:
    return self.base.bias(q_pos_BxQ, k_pos_BxK)

  def kernel_bias(self) -> KernelBias | None:
    return self.base.kernel_bias()

  def project(self) -> None:
    self.base.project()
