"""KERPLE (Chi et al. 2022): kernelized relative biases with two learned positive scalars per head.

With d = i − j ≥ 0 (query minus key position):

  * log variant:   logit[b, h, i, j] += −r1_h · log(1 + r2_h · d)
  * power variant: logit[b, h, i, j] += −r1_h · d^{r2_h},  r2 ∈ (0, 2]

Positivity is kept by projection, as in the reference (it clamps the stored values in place
before each forward): :meth:`Kerple.project` sets r1, r2 ≥ 1e-2 and, for power, r2 ≤ 2, at
initialisation and after every optimizer step (``train.make_train_step``), and the forward
pass uses the parameters as they are. (Clamping inside the forward pass instead would zero the
gradient of a parameter below its bound and freeze it there.) Keys after the query (j > i) get
d = 0, like the reference's ``tril``; the causal mask removes them, and the clamp on d keeps
their gradients finite (log(1 + r2·d) with d < 0 is NaN).
Initialisation follows the reference: log r1 ~ U(0, 2), r2 ~ U(0, 1); power r1 ~ U(0, 1),
r2 ~ U(0, 2).

In an attention kernel (:func:`kerple_kernel_bias`): the same formula (:func:`kerple_kernel`) per
block of rows, each row's r1, r2 picked by its head (``base.per_head``); params ``[H, 1]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pe_research.encodings.base import KernelBias, PositionalEncoding, per_head
from pe_research.encodings.spec import EncodingSpec, Field, one_of

VARIANTS = ("log", "power")
MIN_PARAM = 1e-2
MAX_POWER = 2.0


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"pe.kerple_variant={variant!r} is unknown; allowed: {', '.join(VARIANTS)}")


def project_kerple(r1_H: jax.Array, r2_H: jax.Array, variant: str) -> tuple[jax.Array, jax.Array]:
  """``(max(r1, 1e-2), max(r2, 1e-2))``, and r2 ≤ 2 for "power": the reference's projection."""
  _check_variant(variant)
  r2_H = jnp.clip(r2_H, MIN_PARAM, MAX_POWER if variant == "power" else None)
  return jnp.maximum(r1_H, MIN_PARAM), r2_H


@functools.partial(jax.jit, static_argnames="variant")
def kerple_bias(
  q_pos_BxQ: jax.Array,
  k_pos_BxK: jax.Array,
  r1_H: jax.Array,
  r2_H: jax.Array,
  *,
  variant: str,
) -> jax.Array:
  """float32 ``[B, H, Q, K]``: −r1·log(1 + r2·d) ("log") or −r1·d^r2 ("power"), d = max(i−j, 0).

  ``r1_H`` and ``r2_H`` are used as given (:func:`project_kerple` keeps them in range).
  """
  _check_variant(variant)
  dist_BxQxK = q_pos_BxQ[:, :, None] - k_pos_BxK[:, None, :]
  r1_1xHx1x1 = r1_H.astype(jnp.float32)[None, :, None, None]
  r2_1xHx1x1 = r2_H.astype(jnp.float32)[None, :, None, None]
  return kerple_kernel(dist_BxQxK[:, None], r1_1xHx1x1, r2_1xHx1x1, variant)


def kerple_kernel(dist_X: jax.Array, r1_X: jax.Array, r2_X: jax.Array, variant: str) -> jax.Array:
  """The kernel of distances ``dist`` = i − j (int, broadcasting against r1, r2), clamped at 0."""
  d_X = jnp.maximum(dist_X, 0).astype(jnp.float32)
  if variant == "log":
    return -r1_X * jnp.log1p(r2_X * d_X)
  # d^r2 as exp(r2·log d) on d >= 1 and 0 at d = 0: the r2-gradient d^r2·log d stays finite.
  log_d = jnp.log(jnp.maximum(d_X, 1.0))
  d_pow = jnp.where(d_X > 0, jnp.exp(r2_X * log_d), 0.0)
  return -r1_X * d_pow


def kerple_kernel_bias(q_pos_Tx1, k_pos_1xP, head_Tx1, r1_Hx1, r2_Hx1, *, variant: str):
  """float32 ``[T, P]`` bias of a kernel block (``base.KernelBias``)."""
  r1_Tx1, r2_Tx1 = per_head(r1_Hx1, head_Tx1), per_head(r2_Hx1, head_Tx1)
  return kerple_kernel(q_pos_Tx1 - k_pos_1xP, r1_Tx1, r2_Tx1, variant)


class Kerple(PositionalEncoding):
  """Per-head learned ``r1 [H]`` and ``r2 [H]``; the module docstring gives init and projection."""

  has_bias = True

  def __init__(self, num_heads: int, *, variant: str, rngs: nnx.Rngs):
    _check_variant(variant)
    r1_max, r2_max = (2.0, 1.0) if variant == "log" else (1.0, 2.0)
    self.variant = variant
    self.r1 = nnx.Param(jax.random.uniform(rngs.params(), (num_heads,), maxval=r1_max))
    self.r2 = nnx.Param(jax.random.uniform(rngs.params(), (num_heads,), maxval=r2_max))
    self.project()

  def project(self) -> None:
    r1_H, r2_H = project_kerple(self.r1[...], self.r2[...], self.variant)
    self.r1[...], self.r2[...] = r1_H, r2_H

  def bias(self, q_pos_BxQ: jax.Array, k_pos_BxK: jax.Array) -> jax.Array:
    return kerple_bias(q_pos_BxQ, k_pos_BxK, self.r1[...], self.r2[...], variant=self.variant)

  def kernel_bias(self) -> KernelBias:
    params = (self.r1[...][:, None], self.r2[...][:, None])
    return KernelBias(functools.partial(kerple_kernel_bias, variant=self.variant), params)


SPEC = EncodingSpec(
  fields=(Field("kerple_variant", "log", 'KERPLE kernel: "log" or "power".', one_of(*VARIANTS)),)
)


def build(pe_cfg, *, num_heads, head_dim, model_dim, rngs) -> Kerple:
  del head_dim, model_dim
  return Kerple(num_heads, variant=pe_cfg.kerple_variant, rngs=rngs)
