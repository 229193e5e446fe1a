"""Config name -> encoding factory. One line per encoding family.

A factory has the signature ``factory(pe_cfg, *, num_heads, head_dim, model_dim, rngs)``
and returns a :class:`~pe_research.encodings.base.PositionalEncoding`. ``pe_cfg`` is the
``config.pe`` ConfigDict (see ``configs/base.py``).

Wrappers that change the training positions of any built encoding (``positions`` hook only;
``embed``/``rotate``/``bias`` stay the base's) are applied by ``build_encoding``:
``randomize`` (``pe.randomized``, randomized.py) and ``pose`` (``pe.pose_target_len``, pose.py).
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from pe_research.encodings.base import PositionalEncoding
from pe_research.encodings.pose import pose
from pe_research.encodings.randomized import randomize

Factory = Callable[..., PositionalEncoding]
_FACTORIES: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
  """Decorator: ``@register("alibi")`` adds a factory under a config name."""

  def wrap(factory: Factory) -> Factory:
    if name in _FACTORIES:
      raise ValueError(f"encoding {name!r} is registered twice")
    _FACTORIES[name] = factory
    return factory

  return wrap


def encoding_names() -> list[str]:
  return sorted(_FACTORIES)


def build_encoding(
  pe_cfg, *, num_heads: int, head_dim: int, model_dim: int, rngs: nnx.Rngs
) -> PositionalEncoding:
  """Builds ``pe_cfg.name`` from the registry; unknown names list the known ones.

  With ``pe_cfg.randomized`` the result is wrapped in randomized positions (Ruoss et al.); with
  ``pe_cfg.pose_target_len`` > 0 in PoSE positions (Zhu et al.). The two exclude each other.
  """
  factory = _FACTORIES.get(pe_cfg.name)
  if factory is None:
    raise ValueError(f"pe.name={pe_cfg.name!r} is unknown; allowed: {', '.join(encoding_names())}")
  encoding = factory(pe_cfg, num_heads=num_heads, head_dim=head_dim, model_dim=model_dim, rngs=rngs)
  return pose(pe_cfg, randomize(pe_cfg, encoding, rngs=rngs), rngs=rngs)
