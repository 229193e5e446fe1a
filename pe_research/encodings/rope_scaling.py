"""RoPE frequencies and context extension, in HF transformers' ``rope_scaling`` vocabulary.

Notation: d = rotary dim, b = base, θ_i = b^(-2i/d) for i < d/2, s = ``factor``,
L = ``original_max_position_embeddings`` (the training length).

  default   θ_i
  linear    θ_i / s                                         (Position Interpolation)
  ntk       θ_i with b' = b·s^(d/(d-2))                     (static NTK-aware)
  dynamic   θ_i with b' = b·(s·n/L − (s − 1))^(d/(d-2)),  n = max(seq_len, L)
  yarn      θ'_i = (θ_i/s)·ramp_i + θ_i·(1 − ramp_i), ramp_i = clip((i − low)/(high − low), 0, 1),
            attention factor 0.1·ln s + 1 (or g(s, mscale)/g(s, mscale_all_dim))
  llama3    wavelength λ_i = 2π/θ_i: keep θ_i if λ_i < L/high_freq_factor, θ_i/s if
            λ_i > L/low_freq_factor, else blend with smooth = (L/λ_i − low)/(high − low)
  longrope  θ_i / f_i, f = long_factor if seq_len > L else short_factor,
            attention factor sqrt(1 + ln s / ln L)

The attention factor multiplies both cos and sin, so logits scale by its square.
Arithmetic mirrors ``transformers.modeling_rope_utils`` (5.24) operation by operation in
float32 (b^(2i/d) is rounded from float64, which matches torch's float32 ``pow``), so the
frequencies agree with HF to float32 precision; see ``tests/test_rope_vs_hf.py``.

A spec is parsed once (:func:`parse_rope_scaling`, when the encoding is built) into a frozen
:class:`RopeScaling`; :func:`rope_frequencies` takes that object.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# HF's key for L, the length the model was trained at.
ORIGINAL_LENGTH = "original_max_position_embeddings"
# rope_type -> (required keys, optional keys); "rope_type" itself is always required.
_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
  "default": ((), ()),
  "linear": (("factor",), ()),
  "ntk": (("factor",), ()),
  "dynamic": (("factor", ORIGINAL_LENGTH), ()),
  "yarn": (
    ("factor", ORIGINAL_LENGTH),
    ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
  ),
  "llama3": (("factor", ORIGINAL_LENGTH, "low_freq_factor", "high_freq_factor"), ()),
  "longrope": (("factor", ORIGINAL_LENGTH, "short_factor", "long_factor"), ("attention_factor",)),
}
ROPE_TYPES = tuple(sorted(_KEYS))
_F32 = np.float32


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A validated HF ``rope_scaling`` (made by :func:`parse_rope_scaling`).

  Fields are HF's keys; None = not given (the formulas' defaults apply). Frozen and hashable, so
  a module keeps it as a static attribute.
  """

  rope_type: str
  factor: float | None = None
  original_max_position_embeddings: int | None = None
  attention_factor: float | None = None
  beta_fast: float | None = None
  beta_slow: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool | None = None
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  short_factor: tuple[float, ...] | None = None
  long_factor: tuple[float, ...] | None = None

  @property
  def uses_seq_len(self) -> bool:
    """Whether the frequencies depend on the length of the call (dynamic, longrope)."""
    return self.rope_type in ("dynamic", "longrope")

  @property
  def unchanged_up_to(self) -> float:
    """The longest call length at which the frequencies are the unscaled ones: L for dynamic
    (its base is b while n <= L), 0 for the other types (scaled at every length)."""
    return self.original_max_position_embeddings if self.rope_type == "dynamic" else 0

  def as_dict(self) -> dict:
    """HF's dict: the given keys only, the factor lists as lists."""
    given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()}


# A method's name in figure titles and legends (the paper's name for it).
_SHORT_NAMES = {
  "default": "none",
  "linear": "PI",
  "ntk": "NTK",
  "dynamic": "dynamic NTK",
  "yarn": "YaRN",
  "llama3": "Llama-3",
  "longrope": "LongRoPE",
}


def short_label(spec: str | dict | RopeScaling | None) -> str:
  """The method in a few words for a figure title: ``"none"``, ``"PI s=2"``, ``"YaRN s=4"``,
  ``"dynamic NTK s=4"`` (s = factor); the full spec belongs in the caption or report. A spec
  may leave out L, which the model fills in from ``pe.train_len`` (the label does not show it)."""
  scaling = parse_rope_scaling(spec, original_max_position_embeddings=1)
  if scaling is None or scaling.rope_type == "default":
    return "none"
  return f"{_SHORT_NAMES[scaling.rope_type]} s={scaling.factor:g}"


def _is_number(v: Any) -> bool:
  return isinstance(v, int | float) and not isinstance(v, bool)


def _check_number(cfg: dict, key: str, *, minimum: float, strict: bool) -> None:
  if key not in cfg:
    return
  v = cfg[key]
  ok = _is_number(v) and (v > minimum if strict else v >= minimum)
  if not ok:
    raise ValueError(
      f"rope_scaling.{key}={v!r} must be a number {'>' if strict else '>='} {minimum}"
    )


def _check_values(cfg: dict) -> None:
  """Value checks that do not need the rotary dim."""
  _check_number(cfg, "factor", minimum=1.0, strict=False)
  positive = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
  for key in (*positive, "low_freq_factor", "high_freq_factor"):
    _check_number(cfg, key, minimum=0.0, strict=True)
  length = cfg.get(ORIGINAL_LENGTH, 1)
  if not (isinstance(length, int) and not isinstance(length, bool) and length > 0):
    raise ValueError(f"rope_scaling.{ORIGINAL_LENGTH}={length!r} must be a positive integer")
  if "truncate" in cfg and not isinstance(cfg["truncate"], bool):
    raise ValueError(f"rope_scaling.truncate={cfg['truncate']!r} must be true or false")
  if cfg.get("beta_fast", 32) <= cfg.get("beta_slow", 1):
    raise ValueError(
      f"rope_scaling.beta_fast={cfg.get('beta_fast', 32)} must be > "
      f"beta_slow={cfg.get('beta_slow', 1)} (defaults 32 and 1)"
    )
  if "low_freq_factor" in cfg and cfg["high_freq_factor"] <= cfg["low_freq_factor"]:
    raise ValueError(
      f"rope_scaling.high_freq_factor={cfg['high_freq_factor']} must be > "
      f"low_freq_factor={cfg['low_freq_factor']}"
    )
  if ("mscale" in cfg) != ("mscale_all_dim" in cfg):
    raise ValueError("rope_scaling.mscale and rope_scaling.mscale_all_dim must be given together")
  for key in ("short_factor", "long_factor"):
    v = cfg.get(key, [1.0])
    if not (isinstance(v, list) and all(_is_number(f) and f > 0 for f in v)):
      raise ValueError(f"rope_scaling.{key} must be a list of positive numbers, got {v!r}")


def parse_rope_scaling(
  text_or_dict: str | dict | RopeScaling | None,
  *,
  original_max_position_embeddings: int | None = None,
) -> RopeScaling | None:
  """Parses and validates a ``rope_scaling`` spec; "" / None / {} -> None.

  Args:
    text_or_dict: JSON text (as in ``config.pe.rope_scaling``), a dict or a RopeScaling. The
      legacy HF key ``type`` is accepted as an alias of ``rope_type``.
    original_max_position_embeddings: filled in when the rope_type uses L and the spec lacks it
      (the RoPE module passes ``pe.train_len``).

  Returns:
    A :class:`RopeScaling` with every key validated (the longrope list lengths are checked by
    :func:`rope_frequencies`, which knows the rotary dim).

  Raises:
    ValueError: one line naming the offending key and the allowed values.
  """
  if text_or_dict is None or text_or_dict == "":
    return None
  if isinstance(text_or_dict, RopeScaling):
    text_or_dict = text_or_dict.as_dict()
  if isinstance(text_or_dict, str):
    try:
      cfg = json.loads(text_or_dict)
    except json.JSONDecodeError as e:
      raise ValueError(f"rope_scaling is not valid JSON ({e}): {text_or_dict!r}") from None
  else:
    cfg = text_or_dict
  if not isinstance(cfg, dict):
    raise ValueError(f"rope_scaling must be a JSON object / dict, got {cfg!r}")
  if not cfg:
    return None
  cfg = dict(cfg)
  if "type" in cfg and "rope_type" not in cfg:
    cfg["rope_type"] = cfg.pop("type")
  rope_type = cfg.get("rope_type")
  if not isinstance(rope_type, str) or rope_type not in _KEYS:
    raise ValueError(
      f"rope_scaling.rope_type={rope_type!r} is unknown; allowed: {', '.join(ROPE_TYPES)}"
    )
  required, optional = _KEYS[rope_type]
  allowed = ("rope_type", *required, *optional)
  if (
    ORIGINAL_LENGTH in required
    and ORIGINAL_LENGTH not in cfg
    and original_max_position_embeddings is not None
  ):
    cfg[ORIGINAL_LENGTH] = original_max_position_embeddings
  for key in cfg:
    if key not in allowed:
      raise ValueError(
        f"rope_scaling key {key!r} is not allowed for rope_type={rope_type!r}; "
        f"allowed: {', '.join(allowed)}"
      )
  for key in required:
    if key not in cfg:
      raise ValueError(
        f"rope_scaling is missing key {key!r} for rope_type={rope_type!r}; "
        f"required: {', '.join(required)}"
      )
  _check_values(cfg)
  lists = {k: tuple(cfg[k]) for k in ("short_factor", "long_factor") if k in cfg}
  return RopeScaling(**(cfg | lists))


def _base_powers(dim: int, base: float) -> np.ndarray:
  """float32 b^(2i/d), i < d/2: HF's ``base ** (arange(0, d, 2).float() / d)``."""
  exponent = np.arange(0, dim, 2, dtype=_F32) / _F32(dim)
  return (np.float64(_F32(base)) ** exponent.astype(np.float64)).astype(_F32)


def yarn_correction_range(
  dim: int, base: float, max_len: int, beta_fast: float, beta_slow: float, truncate: bool = True
) -> tuple[float, float]:
  """YaRN's (low, high) dims: cd(r) = d·ln(L/(2πr)) / (2 ln b), floor/ceil unless truncate=False.

  low = max(cd(β_fast), 0), high = min(cd(β_slow), d − 1) (HF clamps with d − 1, not d/2 − 1).
  """

  def cd(rotations: float) -> float:
    return dim * math.log(max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = cd(beta_fast), cd(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  return max(low, 0), min(high, dim - 1)


def _yarn(dim: int, base: float, scaling: RopeScaling) -> tuple[np.ndarray, float]:
  s = scaling.factor

  def g(m: float) -> float:
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

  if scaling.attention_factor is not None:
    attention_factor = float(scaling.attention_factor)
  elif scaling.mscale is not None:
    attention_factor = float(g(scaling.mscale) / g(scaling.mscale_all_dim))
  else:
    attention_factor = g(1.0)
  low, high = yarn_correction_range(
    dim,
    base,
    scaling.original_max_position_embeddings,
    32 if scaling.beta_fast is None else scaling.beta_fast,
    1 if scaling.beta_slow is None else scaling.beta_slow,
    True if scaling.truncate is None else scaling.truncate,
  )
  if low == high:
    high += 0.001  # HF's guard against a zero-width ramp
  powers = _base_powers(dim, base)
  extrapolation = _F32(1) / powers
  interpolation = _F32(1) / (_F32(s) * powers)
  ramp = np.clip((np.arange(dim // 2, dtype=_F32) - _F32(low)) / _F32(high - low), 0, 1)
  keep = _F32(1) - ramp  # HF's "extrapolation factor"
  return interpolation * (_F32(1) - keep) + extrapolation * keep, attention_factor


def _llama3(dim: int, base: float, scaling: RopeScaling) -> np.ndarray:
  s, length = scaling.factor, scaling.original_max_position_embeddings
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  inv_freq = _F32(1) / _base_powers(dim, base)
  # torch evaluates `c / t` as `t.reciprocal() * c`; mirrored here for bitwise agreement.
  wavelen = (_F32(1) / inv_freq) * _F32(2 * math.pi)
  scaled = np.where(wavelen > _F32(length / low), inv_freq / _F32(s), inv_freq)
  smooth = ((_F32(1) / wavelen) * _F32(length) - _F32(low)) / _F32(high - low)
  blended = (_F32(1) - smooth) * scaled / _F32(s) + smooth * scaled
  medium = ~(wavelen < _F32(length / high)) & ~(wavelen > _F32(length / low))
  return np.where(medium, blended, scaled)


def _longrope(
  dim: int, base: float, scaling: RopeScaling, seq_len: int | None
) -> tuple[np.ndarray, float]:
  s, length = scaling.factor, scaling.original_max_position_embeddings
  for key, factors in (
    ("short_factor", scaling.short_factor),
    ("long_factor", scaling.long_factor),
  ):
    if len(factors) != dim // 2:
      raise ValueError(
        f"rope_scaling.{key} has {len(factors)} entries; needs dim // 2 = {dim // 2}"
      )
  if scaling.attention_factor is not None:
    attention_factor = float(scaling.attention_factor)
  else:
    attention_factor = 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(length))
  use_long = seq_len is not None and seq_len > length
  factors = np.asarray(scaling.long_factor if use_long else scaling.short_factor, dtype=_F32)
  return _F32(1) / (factors * _base_powers(dim, base)), attention_factor


def rope_frequencies(
  dim: int,
  *,
  base: float = 10000.0,
  scaling: RopeScaling | None = None,
  seq_len: int | None = None,
) -> tuple[jax.Array, float]:
  """Inverse frequencies θ'_i (float32 ``[dim // 2]``) and the cos/sin attention factor.

  Args:
    dim: rotary dim d (even).
    base: b.
    scaling: a parsed ``rope_scaling`` (:func:`parse_rope_scaling`; module docstring), or None.
    seq_len: current sequence length; used by ``dynamic`` and ``longrope`` only.
  """
  inv_freq, attention_factor = rope_frequencies_numpy(
    dim, base=base, scaling=scaling, seq_len=seq_len
  )
  return jnp.asarray(inv_freq), attention_factor


def rope_frequencies_numpy(
  dim: int,
  *,
  base: float = 10000.0,
  scaling: RopeScaling | None = None,
  seq_len: int | None = None,
) -> tuple[np.ndarray, float]:
  """:func:`rope_frequencies` as a numpy constant: safe to call while tracing under ``jit``."""
  if not (isinstance(dim, int) and dim > 0 and dim % 2 == 0):
    raise ValueError(f"dim={dim!r} must be a positive even integer (rotary dims come in pairs)")
  if not (_is_number(base) and base > 1):
    raise ValueError(f"base={base!r} must be a number > 1")
  if seq_len is not None and not (isinstance(seq_len, int) and seq_len > 0):
    raise ValueError(f"seq_len={seq_len!r} must be a positive integer or None")
  if not (scaling is None or isinstance(scaling, RopeScaling)):
    raise TypeError(f"scaling={scaling!r} must be a RopeScaling (parse_rope_scaling) or None")
  rope_type = "default" if scaling is None else scaling.rope_type
  attention_factor = 1.0
  if rope_type in ("ntk", "dynamic") and dim < 4:
    raise ValueError(f"dim={dim} must be >= 4 for rope_type={rope_type!r} (exponent d/(d-2))")
  if rope_type == "ntk":
    base = base * scaling.factor ** (dim / (dim - 2))
  elif rope_type == "dynamic":
    s, length = scaling.factor, scaling.original_max_position_embeddings
    n = length if seq_len is None else max(seq_len, length)
    base = base * ((s * n / length) - (s - 1)) ** (dim / (dim - 2))
  if rope_type in ("default", "ntk", "dynamic"):
    inv_freq = _F32(1) / _base_powers(dim, base)
  elif rope_type == "linear":
    inv_freq = (_F32(1) / _base_powers(dim, base)) / _F32(scaling.factor)
  elif rope_type == "yarn":
    inv_freq, attention_factor = _yarn(dim, base, scaling)
  elif rope_type == "llama3":
    inv_freq = _llama3(dim, base, scaling)
  else:
    inv_freq, attention_factor = _longrope(dim, base, scaling, seq_len)
  return inv_freq.astype(_F32), attention_factor
