"""Config name -> (spec, factory) of every encoding family: one line per family, in ``FAMILIES``.

A factory has the signature ``factory(pe_cfg, *, num_heads, head_dim, model_dim, rngs)``
and returns a :class:`~pe_research.encodings.base.PositionalEncoding`. ``pe_cfg`` is the
``config.pe`` ConfigDict (see ``configs/base.py``); a spec (``spec.py``) states the family's
``pe.*`` fields and rules.

Wrappers that change the training positions of any built encoding (``positions`` hook only;
``embed``/``rotate``/``bias`` stay the base's) are applied by ``build_encoding``:
``randomize`` (``pe.randomized``, randomized.py) and ``pose`` (``pe.pose_target_len``, pose.py);
their specs are ``WRAPPERS``.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from pe_research.encodings import (
  alibi,
  fire,
  kerple,
  learned,
  nope,
  pose,
  randomized,
  rope,
  sinusoidal,
  t5,
  xpos,
)
from pe_research.encodings.base import PositionalEncoding
from pe_research.encodings.spec import EncodingSpec, Field

Factory = Callable[..., PositionalEncoding]

FAMILIES: dict[str, tuple[EncodingSpec, Factory]] = {
  "sinusoidal": (sinusoidal.SPEC, sinusoidal.build),
  "learned": (learned.SPEC, learned.build),
  "nope": (nope.SPEC, nope.build),
  "rope": (rope.SPEC, rope.build),
  "alibi": (alibi.SPEC, alibi.build),
  "t5": (t5.SPEC, t5.build),
  "xpos": (xpos.SPEC, xpos.build),
  "kerple": (kerple.SPEC, kerple.build),
  "fire": (fire.SPEC, fire.build),
}
# Applied around every family, innermost first (build_encoding).
WRAPPERS: tuple[EncodingSpec, ...] = (randomized.SPEC, pose.SPEC)


def encoding_names() -> list[str]:
  return sorted(FAMILIES)


def _family(name: str) -> tuple[EncodingSpec, Factory]:
  if name not in FAMILIES:
    raise ValueError(f"pe.name={name!r} is unknown; allowed: {', '.join(encoding_names())}")
  return FAMILIES[name]


def encoding_spec(name: str) -> EncodingSpec:
  """The spec of family ``name``; unknown names raise, listing the known ones."""
  return _family(name)[0]


def rope_scaling_names() -> list[str]:
  """The families that take ``pe.rope_scaling``."""
  return [name for name in encoding_names() if FAMILIES[name][0].takes_rope_scaling]


def owned_fields() -> list[tuple[str | None, Field]]:
  """``(owner, field)`` for every ``pe.*`` field of a family (owner = its name) or of a
  wrapper (owner None), in ``FAMILIES`` then ``WRAPPERS`` order."""
  pairs = [(name, field) for name, (spec, _) in FAMILIES.items() for field in spec.fields]
  return pairs + [(None, field) for spec in WRAPPERS for field in spec.fields]


def pe_fields() -> list[Field]:
  """Every ``pe.*`` field an encoding or wrapper owns (``configs/base.py`` adds the shared ones)."""
  return [field for _, field in owned_fields()]


def build_encoding(
  pe_cfg, *, num_heads: int, head_dim: int, model_dim: int, rngs: nnx.Rngs
) -> PositionalEncoding:
  """Builds ``pe_cfg.name`` from the registry; unknown names list the known ones.

  With ``pe_cfg.randomized`` the result is wrapped in randomized positions (Ruoss et al.); with
  ``pe_cfg.pose_target_len`` > 0 in PoSE positions (Zhu et al.). The two exclude each other.
  """
  _, factory = _family(pe_cfg.name)
  encoding = factory(pe_cfg, num_heads=num_heads, head_dim=head_dim, model_dim=model_dim, rngs=rngs)
  return pose.pose(pe_cfg, randomized.randomize(pe_cfg, encoding, rngs=rngs), rngs=rngs)
