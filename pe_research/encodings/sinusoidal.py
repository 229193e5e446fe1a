"""Sinusoidal absolute positional encoding (Vaswani et al. 2017), added to token embeddings.

With θ_i = base^(−2i/dim), i = 0 .. dim/2 − 1, two layouts are supported (they hold the same
numbers in a different order):

  * ``"concat"``      PE[p] = [sin(p·θ_0) .. sin(p·θ_{d/2−1}) | cos(p·θ_0) .. cos(p·θ_{d/2−1})]
                      (GPT-J, DeepMind's randomized-PE code);
  * ``"interleaved"`` PE[p, 2i] = sin(p·θ_i), PE[p, 2i+1] = cos(p·θ_i) (the paper).

tensor2tensor/fairseq use θ_i = exp(−i·ln(base)/(d/2 − 1)) instead; that convention is not
implemented here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pe_research.encodings.base import PositionalEncoding
from pe_research.encodings.spec import POSITIVE, EncodingSpec, Field, one_of

LAYOUTS = ("concat", "interleaved")


def _validate(dim: int, layout: str) -> None:
  if dim < 2 or dim % 2:
    raise ValueError(f"dim={dim} must be a positive even number (sin/cos pairs)")
  if layout not in LAYOUTS:
    raise ValueError(f"pe.sinusoidal_layout={layout!r} is unknown; allowed: {', '.join(LAYOUTS)}")


@functools.partial(jax.jit, static_argnames=("dim", "base", "layout"))
def sinusoidal(
  positions: jax.Array, dim: int, *, base: float = 10000.0, layout: str = "concat"
) -> jax.Array:
  """Sinusoidal table for integer (or real) ``positions [...]`` -> float32 ``[..., dim]``.

  PE = [sin(p·θ) | cos(p·θ)] ("concat") or sin/cos alternated ("interleaved"),
  θ_i = base^(−2i/dim) for i < dim/2.
  """
  _validate(dim, layout)
  theta_R = base ** (-2.0 * jnp.arange(dim // 2, dtype=jnp.float32) / dim)
  angle_XxR = jnp.asarray(positions, jnp.float32)[..., None] * theta_R
  sin_XxR, cos_XxR = jnp.sin(angle_XxR), jnp.cos(angle_XxR)
  if layout == "concat":
    return jnp.concatenate([sin_XxR, cos_XxR], axis=-1)
  return jnp.stack([sin_XxR, cos_XxR], axis=-1).reshape(*angle_XxR.shape[:-1], dim)


class Sinusoidal(PositionalEncoding):
  """Adds ``sinusoidal(pos, D)`` to the token embeddings; no parameters."""

  def __init__(self, dim: int, *, base: float = 10000.0, layout: str = "concat"):
    _validate(dim, layout)
    self.base = base
    self.layout = layout

  def embed(self, x_BxLxD: jax.Array, pos_BxL: jax.Array) -> jax.Array:
    pe_BxLxD = sinusoidal(pos_BxL, x_BxLxD.shape[-1], base=self.base, layout=self.layout)
    return x_BxLxD + pe_BxLxD.astype(x_BxLxD.dtype)


SPEC = EncodingSpec(
  fields=(
    Field(
      "sinusoidal_layout",
      "concat",
      '"concat" [sin..., cos...] or "interleaved".',
      one_of(*LAYOUTS),
    ),
    Field("sinusoidal_base", 10000.0, "Sinusoidal wavelength base.", POSITIVE),
  )
)


def build(pe_cfg, *, num_heads, head_dim, model_dim, rngs) -> Sinusoidal:
  del num_heads, head_dim, rngs
  return Sinusoidal(model_dim, base=pe_cfg.sinusoidal_base, layout=pe_cfg.sinusoidal_layout)
