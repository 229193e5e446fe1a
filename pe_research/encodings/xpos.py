"""xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"): RoPE with exponential decay.

Pair i of the rotary dims (R2 = 2·len(θ) of them, d = R2) is rotated as in RoPE and scaled by

  ζ_i^(±(p − c)/γ),   ζ_i = (2i + 0.4·d) / (1.4·d),   γ = ``pe.xpos_gamma`` (512),

with + for queries and − for keys, so a score picks up ζ_i^((m − n)/γ) ≤ 1 for causal
m ≥ n: the score between positions m and n depends only on m − n and decays with it.
(Non-causal use would grow for n > m; xPos is for causal attention only.)

The centre c: ζ_0^(p/γ) = exp(−1.25·p/γ) overflows float32 once p/γ > ~70 (p ≈ 36k at γ=512).
Like torchscale's ``XPOS`` (which shifts positions by −length/2), we subtract a centre c,
here c = ⌊(min p + max p) / 2⌋ of each row of positions. The q·k product only sees
(m − c) − (n − c) = m − n, so centring is exact provided q and k of a row are rotated with
the same positions, as in self-attention over one sequence (not with a KV cache).

In an attention kernel (``pe_research/kernels``): q and k enter rotated and scaled, no kernel
form needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pe_research.encodings import rope
from pe_research.encodings.rope import RoPE, apply_rope, rope_kwargs
from pe_research.encodings.spec import POSITIVE, EncodingSpec, Field


def xpos_zeta(rotary_dim: int) -> jax.Array:
  """ζ_i = (2i + 0.4·d) / (1.4·d) for i < d/2: float32 ``[d // 2]``, in (0.28, 1)."""
  two_i = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32)
  return (two_i + 0.4 * rotary_dim) / (1.4 * rotary_dim)


def apply_xpos(
  x: jax.Array,
  positions: jax.Array,
  inv_freq: jax.Array,
  *,
  is_query: bool,
  gamma: float = 512.0,
  layout: str = "half",
  attention_factor: float = 1.0,
) -> jax.Array:
  """RoPE, then scale pair i by ζ_i^(±(p − c)/γ) (+ for queries, − for keys).

  Args:
    x: ``[..., L, H, D]`` queries or keys.
    positions: ``[..., L]`` positions; c is the midpoint of each row (module docstring).
    inv_freq: float32 ``[R]`` RoPE frequencies; the first 2R dims are rotated and scaled.
    is_query: q is multiplied by the scale, k divided.
    gamma: γ, the scale base.
    layout: "half" or "interleaved" (which dims form a pair).
    attention_factor: passed to :func:`apply_rope`.

  Returns:
    ``[..., L, H, D]`` in ``x.dtype``.
  """
  num_freq = inv_freq.shape[-1]
  rotated = apply_rope(x, positions, inv_freq, layout=layout, attention_factor=attention_factor)
  pos_L = positions.astype(jnp.float32)
  center = jnp.floor((pos_L.min(axis=-1, keepdims=True) + pos_L.max(axis=-1, keepdims=True)) / 2)
  exponent_L = (pos_L - center) / gamma
  if not is_query:
    exponent_L = -exponent_L
  scale_LxR = xpos_zeta(2 * num_freq) ** exponent_L[..., None]
  if layout == "half":
    scale_LxR2 = jnp.concatenate([scale_LxR, scale_LxR], axis=-1)
  else:
    scale_LxR2 = jnp.repeat(scale_LxR, 2, axis=-1)
  scaled = rotated[..., : 2 * num_freq].astype(jnp.float32) * scale_LxR2[..., None, :]
  return jnp.concatenate([scaled.astype(x.dtype), rotated[..., 2 * num_freq :]], axis=-1)


class XPos(RoPE):
  """RoPE (same base, layout, partial rotary and scaling options) plus xPos decay."""

  def __init__(self, head_dim: int, *, gamma: float = 512.0, **rope_kwargs):
    if not gamma > 0:
      raise ValueError(f"pe.xpos_gamma={gamma!r} must be > 0")
    super().__init__(head_dim, **rope_kwargs)
    self.gamma = float(gamma)

  def rotate(self, x_BxLxHxE: jax.Array, pos_BxL: jax.Array, *, is_query: bool) -> jax.Array:
    inv_freq, attention_factor = self.frequencies(x_BxLxHxE.shape[-3])
    return apply_xpos(
      x_BxLxHxE,
      pos_BxL,
      inv_freq,
      is_query=is_query,
      gamma=self.gamma,
      layout=self.layout,
      attention_factor=attention_factor,
    )


# xPos also reads RoPE's pe.rope_base, pe.rope_layout, pe.rotary_pct and pe.rope_scaling (rope.py).
SPEC = EncodingSpec(
  fields=(Field("xpos_gamma", 512.0, "xPos scale base (gamma in zeta^(n/gamma)).", POSITIVE),),
  rotary_dim=rope.SPEC.rotary_dim,
  takes_rope_scaling=True,
)


def build(pe_cfg, *, num_heads: int, head_dim: int, model_dim: int, rngs) -> XPos:
  del num_heads, model_dim, rngs
  return XPos(head_dim, gamma=pe_cfg.xpos_gamma, **rope_kwargs(pe_cfg))
