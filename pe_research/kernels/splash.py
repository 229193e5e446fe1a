"""Causal attention without a bias or far set through JAX's splash attention (Pallas TPU).

Splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) skips masked blocks
from a block mask computed once at trace time and takes G KV heads dividing H natively. It has
no bias input and one logit set, so it serves NoPE and the rotations (RoPE, xPos, log-n: q and k
arrive rotated); everything else takes ``pallas_attention.py``. It does not scale the logits:
q is multiplied by ``1/sqrt(E)`` first. L is padded to a multiple of the block (a multiple of
128, as splash requires): padded keys sit after every real query, the causal mask hides them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

_LANES = 128


def splash_attention(
  q_BxLxHxE: jax.Array,
  k_BxLxGxE: jax.Array,
  v_BxLxGxE: jax.Array,
  block_size: int,
  *,
  interpret: bool = False,
) -> jax.Array:
  """Causal attention of q ``[B, L, H, E]`` over k, v ``[B, L, G, E]`` -> ``[B, L, H, E]``."""
  b, length, h, e = q_BxLxHxE.shape
  block = -(-min(block_size, length) // _LANES) * _LANES
  padded = -(-length // block) * block
  mask = masks.MultiHeadMask([masks.CausalMask((padded, padded))] * h)
  sizes = dict.fromkeys(
    ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv"), block
  )
  sizes |= dict.fromkeys(("block_kv_dkv_compute", "block_q_dq", "block_kv_dq"), block)
  kernel = splash.make_splash_mha_single_device(
    mask, block_sizes=splash.BlockSizes(**sizes), interpret=interpret
  )
  pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  heads_first = lambda x_BxLxHxE: jnp.moveaxis(jnp.pad(x_BxLxHxE, pad), 2, 1)
  scaled = (q_BxLxHxE.astype(jnp.float32) * e**-0.5).astype(q_BxLxHxE.dtype)
  out_BxHxLxE = jax.vmap(kernel)(*(heads_first(x) for x in (scaled, k_BxLxGxE, v_BxLxGxE)))
  return jnp.moveaxis(out_BxHxLxE, 1, 2)[:, :length]
