"""FIRE (Li et al. 2024): a learned function of a progressively normalised relative distance.

  logit[b, h, i, j] += MLP(ψ(i − j) / ψ(max(L_thr, i)))[h],   ψ(x) = log(|c·x| + 1)

MLP: 1 -> hidden -> H with ReLU. c is learned (init ``pe.fire_c_init``). As in the paper's
reference code, L_thr = |multiplier · L_init| with a learned multiplier (init 1) and the fixed
L_init = ``pe.fire_l_thr_init``, so the threshold is learned on a unit scale. Dividing by
ψ(max(L_thr, i)) maps every distance the query can see into [0, 1], which is what lets FIRE
interpolate to longer contexts. Keys after the query (j > i) get distance 0 as in the
reference's ``tril``; the causal mask removes them.

In an attention kernel (:func:`fire_kernel_bias`): the same normalised distance per block, the
MLP as a sum over its hidden units (each a ``[T, P]`` plane), a unit's weights picked by
``base.column`` and the output weight of each row's head by ``base.per_head``; params are 2-D
(c, L_thr ``[1, 1]``; w1, b1 ``[1, F]``; w2^T ``[H, F]``; b2 ``[H, 1]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pe_research.encodings.base import KernelBias, PositionalEncoding, column, per_head
from pe_research.encodings.spec import POSITIVE, EncodingSpec, Field

EPS = 1e-6  # Keeps ψ(max(L_thr, i)) > 0 when c or L_thr shrink to 0.


def fire_log_transform(x: jax.Array, c: jax.Array) -> jax.Array:
  """ψ(x) = log(|c·x| + 1), elementwise, float32."""
  return jnp.log1p(jnp.abs(c * x.astype(jnp.float32)))


def fire_normalized_distance(
  q_pos_BxQ: jax.Array, k_pos_BxK: jax.Array, c: jax.Array, l_thr: jax.Array
) -> jax.Array:
  """float32 ``[B, Q, K]``: ψ(max(i − j, 0)) / (ψ(max(L_thr, i)) + 1e-6), the MLP input."""
  return _normalized(q_pos_BxQ[:, :, None], k_pos_BxK[:, None, :], c, l_thr)


def _normalized(q_pos_X, k_pos_X, c, l_thr) -> jax.Array:
  """``fire_normalized_distance`` of positions that broadcast against each other."""
  dist_X = jnp.maximum(q_pos_X - k_pos_X, 0)
  psi_norm_X = fire_log_transform(jnp.maximum(l_thr, q_pos_X.astype(jnp.float32)), c) + EPS
  return fire_log_transform(dist_X, c) / psi_norm_X


@jax.jit
def fire_bias(
  q_pos_BxQ: jax.Array,
  k_pos_BxK: jax.Array,
  c: jax.Array,
  l_thr: jax.Array,
  w1_1xF: jax.Array,
  b1_F: jax.Array,
  w2_FxH: jax.Array,
  b2_H: jax.Array,
) -> jax.Array:
  """float32 ``[B, H, Q, K]``: MLP(x) = relu(x·w1 + b1)·w2 + b2 of the normalised distance x."""
  x_BxQxKx1 = fire_normalized_distance(q_pos_BxQ, k_pos_BxK, c, l_thr)[..., None]
  h_BxQxKxF = jax.nn.relu(x_BxQxKx1 @ w1_1xF + b1_F)
  return (h_BxQxKxF @ w2_FxH + b2_H).astype(jnp.float32).transpose(0, 3, 1, 2)


def fire_kernel_bias(
  q_pos_Tx1, k_pos_1xP, head_Tx1, c_1x1, l_thr_1x1, w1_1xF, b1_1xF, w2_HxF, b2_Hx1
) -> jax.Array:
  """float32 ``[T, P]``: ``fire_bias`` of a kernel block (``base.KernelBias``), ``w2_HxF`` the
  transposed output weights."""
  x_TxP = _normalized(q_pos_Tx1, k_pos_1xP, c_1x1, l_thr_1x1)
  bias_TxP = jnp.broadcast_to(per_head(b2_Hx1, head_Tx1), x_TxP.shape)
  for f in range(w1_1xF.shape[1]):
    h_TxP = jax.nn.relu(x_TxP * column(w1_1xF, f) + column(b1_1xF, f))
    bias_TxP = bias_TxP + h_TxP * per_head(column(w2_HxF, f), head_Tx1)
  return bias_TxP


class Fire(PositionalEncoding):
  """Learned c, L_thr multiplier and a 1 -> hidden -> H ReLU MLP (shared by all positions)."""

  has_bias = True

  def __init__(
    self, num_heads: int, *, hidden: int, c_init: float, l_thr_init: float, rngs: nnx.Rngs
  ):
    if hidden < 1:
      raise ValueError(f"pe.fire_hidden={hidden} must be >= 1")
    if l_thr_init <= 0:
      raise ValueError(f"pe.fire_l_thr_init={l_thr_init} must be > 0")
    self.l_thr_init = float(l_thr_init)
    self.c = nnx.Param(jnp.asarray(c_init, jnp.float32))
    self.l_thr_multiplier = nnx.Param(jnp.asarray(1.0, jnp.float32))
    self.hidden = nnx.Linear(1, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, num_heads, rngs=rngs)

  def threshold(self) -> jax.Array:
    """L_thr = |multiplier · L_init| (a float32 scalar)."""
    return jnp.abs(self.l_thr_multiplier[...] * self.l_thr_init)

  def bias(self, q_pos_BxQ: jax.Array, k_pos_BxK: jax.Array) -> jax.Array:
    return fire_bias(
      q_pos_BxQ,
      k_pos_BxK,
      self.c[...],
      self.threshold(),
      self.hidden.kernel[...],
      self.hidden.bias[...],
      self.out.kernel[...],
      self.out.bias[...],
    )

  def kernel_bias(self) -> KernelBias:
    params = (
      self.c[...].reshape(1, 1),
      self.threshold().reshape(1, 1),
      self.hidden.kernel[...],
      self.hidden.bias[...][None],
      self.out.kernel[...].T,
      self.out.bias[...][:, None],
    )
    return KernelBias(fire_kernel_bias, params)


SPEC = EncodingSpec(
  fields=(
    Field("fire_hidden", 32, "Hidden width of FIRE's position MLP.", POSITIVE),
    Field("fire_c_init", 0.1, "FIRE's initial log-transform scale c.", POSITIVE),
    Field("fire_l_thr_init", 512.0, "FIRE's initial length threshold L_thr.", POSITIVE),
  )
)


def build(pe_cfg, *, num_heads, head_dim, model_dim, rngs) -> Fire:
  del head_dim, model_dim
  return Fire(
    num_heads,
    hidden=pe_cfg.fire_hidden,
    c_init=pe_cfg.fire_c_init,
    l_thr_init=pe_cfg.fire_l_thr_init,
    rngs=rngs,
  )
