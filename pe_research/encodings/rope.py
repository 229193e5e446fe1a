"""Rotary position embedding (Su et al. 2021), applied to queries and keys.

Each pair of rotary dims (a, b) is rotated by the angle p·θ_i and scaled by the attention
factor c (1 for plain RoPE; YaRN/longrope set it):

  a' = c·(a·cos(p·θ_i) − b·sin(p·θ_i)),   b' = c·(b·cos(p·θ_i) + a·sin(p·θ_i)).

Layouts say which dims form pair i of the rotary part of width R2 = 2·len(θ):
  "half"        (GPT-NeoX, HF Llama): (x_i, x_{i+R2/2});  y = x·cos + rotate_half(x)·sin
  "interleaved" (RoFormer, GPT-J):    (x_{2i}, x_{2i+1})
The two give the same q·k when q and k are permuted consistently; :func:`interleaved_to_half`
is that permutation (apply it to the q/k projection outputs to convert a checkpoint).
Dims beyond R2 pass through unchanged (partial rotary, GPT-NeoX's ``rotary_pct``).
Training-free context extension (Self-Extend, ReRoPE: a far logit set; log-n query scaling) is
in ``rope_extension.py``; it combines with any ``rope_scaling`` (frequencies).

In an attention kernel (``pe_research/kernels``: Pallas, splash): q and k enter rotated, so RoPE
needs no kernel form (``kernel_bias()`` is None).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pe_research import backend
from pe_research.encodings.base import PositionalEncoding
from pe_research.encodings.rope_extension import FIELDS as EXTENSION_FIELDS
from pe_research.encodings.rope_extension import (
  check_extension,
  extension_kwargs,
  logn_scale,
  rerope_positions,
  self_extend_positions,
)
from pe_research.encodings.rope_scaling import (
  RopeScaling,
  parse_rope_scaling,
  rope_frequencies_numpy,
)
from pe_research.encodings.spec import POSITIVE, EncodingSpec, Field, in_range, one_of, require

LAYOUTS = ("half", "interleaved")


def _check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"rope layout={layout!r} is unknown; allowed: {', '.join(LAYOUTS)}")


def rope_tables(
  positions: jax.Array, inv_freq: jax.Array, attention_factor: float = 1.0
) -> tuple[jax.Array, jax.Array]:
  """``(c·cos(p·θ_i), c·sin(p·θ_i))``, float32 ``[..., L, R]``."""
  angle_LxR = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  return jnp.cos(angle_LxR) * attention_factor, jnp.sin(angle_LxR) * attention_factor


def rotate_pairs(x: jax.Array, cos_LxR: jax.Array, sin_LxR: jax.Array, layout: str) -> jax.Array:
  """``a' = a·cos − b·sin``, ``b' = b·cos + a·sin`` for the R pairs (a, b) of ``layout`` in the
  first 2R dims of ``x`` ``[..., L, H, E]``; the rest pass through. Computed in float32, returned
  in ``x.dtype``."""
  _check_layout(layout)
  num_freq = cos_LxR.shape[-1]
  if 2 * num_freq > x.shape[-1]:
    raise ValueError(f"len(inv_freq)={num_freq} needs 2·{num_freq} <= head dim {x.shape[-1]}")
  cos_Lx1xR, sin_Lx1xR = cos_LxR[..., None, :], sin_LxR[..., None, :]
  rot_LxHxR2 = x[..., : 2 * num_freq].astype(jnp.float32)
  if layout == "half":
    a, b = rot_LxHxR2[..., :num_freq], rot_LxHxR2[..., num_freq:]
  else:
    a, b = rot_LxHxR2[..., 0::2], rot_LxHxR2[..., 1::2]
  a_rot = a * cos_Lx1xR - b * sin_Lx1xR
  b_rot = b * cos_Lx1xR + a * sin_Lx1xR
  if layout == "half":
    out_LxHxR2 = jnp.concatenate([a_rot, b_rot], axis=-1)
  else:
    out_LxHxR2 = jnp.stack([a_rot, b_rot], axis=-1).reshape(rot_LxHxR2.shape)
  return jnp.concatenate([out_LxHxR2.astype(x.dtype), x[..., 2 * num_freq :]], axis=-1)


def apply_rope(
  x: jax.Array,
  positions: jax.Array,
  inv_freq: jax.Array,
  *,
  layout: str = "half",
  attention_factor: float = 1.0,
) -> jax.Array:
  """Rotates the first ``2·len(inv_freq)`` dims of ``x``; the rest pass through.

  Args:
    x: ``[..., L, H, E]`` queries or keys.
    positions: ``[..., L]`` positions (broadcast against the leading dims of ``x``).
    inv_freq: float32 ``[R]`` frequencies θ_i, R ≤ E/2.
    layout: "half" or "interleaved" (module docstring).
    attention_factor: c, multiplied onto cos and sin.

  Returns:
    ``[..., L, H, E]`` in ``x.dtype``; angles and the rotation are computed in float32, the
    tables once per call (:func:`~pe_research.backend.materialised`), not per head.
  """
  tables_LxR = backend.materialised(*rope_tables(positions, inv_freq, attention_factor))
  return rotate_pairs(x, *tables_LxR, layout)


def interleaved_to_half(x: jax.Array, rotary_dim: int) -> jax.Array:
  """Permutes the last axis so interleaved pairs (2i, 2i+1) land at (i, i + rotary_dim/2).

  For every q, k: ``interleaved_to_half(apply_rope(q, layout="interleaved"))`` equals
  ``apply_rope(interleaved_to_half(q), layout="half")``. Dims ≥ rotary_dim stay in place.
  """
  return jnp.concatenate(
    [x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2], x[..., rotary_dim:]], axis=-1
  )


ROTARY_PCT = Field(
  "rotary_pct",
  1.0,
  "Fraction of head_dim that is rotated (partial rotary).",
  in_range(0.0, 1.0, low_inclusive=False, high_inclusive=True),
)


def rotary_dim_for(head_dim: int, rotary_pct: float) -> int:
  """R2 = int(head_dim·rotary_pct), the rotated width of RoPE and xPos: the one definition.

  Raises ValueError (one line naming pe.rotary_pct or model.head_dim) unless rotary_pct is in
  (0, 1] and R2 is even and >= 2 (dims rotate in pairs).
  """
  ROTARY_PCT.check(rotary_pct)
  width = int(head_dim * rotary_pct)
  require(
    width >= 2 and width % 2 == 0,
    "model.head_dim",
    head_dim,
    f"a head_dim whose rotated part int(head_dim * pe.rotary_pct), pe.rotary_pct={rotary_pct}, "
    "is even and >= 2",
  )
  return width


class RoPE(PositionalEncoding):
  """RoPE on q and k with optional ``rope_scaling`` and context extension.

  Frequencies are numpy constants computed when ``rotate`` is traced; ``dynamic`` and
  ``longrope`` use ``seq_len = x.shape[-3]`` (the static length of the call), since
  max(positions) + 1 is not static. Decoding token by token would need the cache length.
  ``self_extend_window`` or ``rerope_window`` W > 0 sets ``window = W`` and ``rotate_far``
  rotates to the method's far positions; ``logn_len`` L > 0 multiplies rotated queries (near
  and far) by max(1, ln(p + 1) / ln L) (``rope_extension.py``).
  """

  def __init__(
    self,
    head_dim: int,
    *,
    base: float = 10000.0,
    scaling: str | dict | RopeScaling | None = None,
    rotary_pct: float = 1.0,
    layout: str = "half",
    train_len: int | None = None,
    self_extend_window: int = 0,
    self_extend_group: int = 1,
    rerope_window: int = 0,
    logn_len: int = 0,
  ):
    _check_layout(layout)
    check_extension(
      self_extend_window=self_extend_window,
      self_extend_group=self_extend_group,
      rerope_window=rerope_window,
      logn_len=logn_len,
    )
    self.window = (self_extend_window or rerope_window) or None
    self.rerope = bool(rerope_window)
    self.self_extend_group = self_extend_group
    self.logn_len = logn_len
    self.rotary_dim = rotary_dim_for(head_dim, rotary_pct)
    self.base = float(base)
    self.layout = layout
    # Parsed and validated once, here; frozen, so a static attribute of the module.
    self.scaling = parse_rope_scaling(scaling, original_max_position_embeddings=train_len)
    self.frequencies(1)  # validates dim-dependent keys (longrope list lengths) at build time

  @property
  def unchanged_up_to(self) -> float:
    """The longest call length n at which this encoding gives plain RoPE's logits (inf: any):
    ``rope_scaling``'s own limit (``RopeScaling.unchanged_up_to``), a far window's W (every
    distance of a call of n <= W tokens is < W) and log-n's L (s_p = 1 for p < L)."""
    limits = [self.window or math.inf, self.logn_len or math.inf]
    return min(limits + ([self.scaling.unchanged_up_to] if self.scaling else []))

  def frequencies(self, seq_len: int) -> tuple[np.ndarray, float]:
    """(θ' float32 ``[rotary_dim // 2]``, attention factor) for a call of length seq_len."""
    return rope_frequencies_numpy(
      self.rotary_dim,
      base=self.base,
      scaling=self.scaling,
      seq_len=seq_len if self.scaling is not None and self.scaling.uses_seq_len else None,
    )

  def rotate(self, x_BxLxHxE: jax.Array, pos_BxL: jax.Array, *, is_query: bool) -> jax.Array:
    return self._rotate_to(x_BxLxHxE, pos_BxL, pos_BxL, is_query)

  def rotate_far(self, x_BxLxHxE: jax.Array, pos_BxL: jax.Array, *, is_query: bool) -> jax.Array:
    """q or k rotated to the far positions of Self-Extend or ReRoPE (``window`` set)."""
    if self.rerope:
      far_BxL = rerope_positions(pos_BxL, window=self.window, is_query=is_query)
    else:
      far_BxL = self_extend_positions(
        pos_BxL, window=self.window, group=self.self_extend_group, is_query=is_query
      )
    return self._rotate_to(x_BxLxHxE, far_BxL, pos_BxL, is_query)

  def _rotate_to(self, x_BxLxHxE, angle_pos_BxL, pos_BxL, is_query: bool) -> jax.Array:
    """``x`` rotated by the angles of ``angle_pos``; queries log-n scaled by their ``pos``."""
    inv_freq, attention_factor = self.frequencies(x_BxLxHxE.shape[-3])
    out_BxLxHxE = apply_rope(
      x_BxLxHxE, angle_pos_BxL, inv_freq, layout=self.layout, attention_factor=attention_factor
    )
    if not (is_query and self.logn_len):
      return out_BxLxHxE
    scale_BxLx1x1 = logn_scale(pos_BxL, self.logn_len)[..., None, None]
    return (out_BxLxHxE * scale_BxLx1x1).astype(out_BxLxHxE.dtype)


def rope_kwargs(pe_cfg) -> dict:
  """RoPE constructor arguments read from ``config.pe`` (shared with xPos)."""
  return dict(
    base=pe_cfg.rope_base,
    scaling=pe_cfg.rope_scaling,
    rotary_pct=pe_cfg.rotary_pct,
    layout=pe_cfg.rope_layout,
    train_len=pe_cfg.get("train_len"),
  )


def _rotary_dim(head_dim: int, pe_cfg) -> int:
  return rotary_dim_for(head_dim, pe_cfg.rotary_pct)


def _validate(pe_cfg, model_cfg, train_cfg) -> None:
  """Self-Extend and ReRoPE exclude each other, and their two logit sets need dense or
  blockwise attention."""
  del train_cfg
  settings = extension_kwargs(pe_cfg)
  check_extension(**settings)
  require(
    not (settings["self_extend_window"] or settings["rerope_window"])
    or model_cfg.attention not in ("xla", "splash"),
    "model.attention",
    model_cfg.attention,
    "'dense', 'blockwise' or 'pallas' with pe.self_extend_window or pe.rerope_window (two "
    "logit sets)",
  )


SPEC = EncodingSpec(
  fields=(
    Field("rope_scaling", "", 'HF `rope_scaling` JSON ("" = none), for specs that take it.'),
    Field("rope_base", 10000.0, "RoPE frequency base b: theta_i = b^(-2i/d).", POSITIVE),
    Field(
      "rope_layout",
      "half",
      'Rotated pairs: "half" (NeoX/Llama) or "interleaved" (GPT-J).',
      one_of(*LAYOUTS),
    ),
    ROTARY_PCT,
    # Training-free context extension (rope_extension.py), combinable with pe.rope_scaling.
    *EXTENSION_FIELDS,
  ),
  validate=_validate,
  rotary_dim=_rotary_dim,
  takes_rope_scaling=True,
)


def build(pe_cfg, *, num_heads: int, head_dim: int, model_dim: int, rngs) -> RoPE:
  del num_heads, model_dim, rngs
  return RoPE(head_dim, **rope_kwargs(pe_cfg), **extension_kwargs(pe_cfg))
