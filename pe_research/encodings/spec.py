"""What a config needs to know about an encoding, stated once in the encoding's own file.

Every family module (and each positions wrapper, randomized.py and pose.py) defines
``SPEC = EncodingSpec(...)``: the flat ``config.pe.<field>`` fields it owns, with their defaults,
one-line comments and rules, and its cross-field rules. ``registry.py`` lists the specs,
``configs/base.py`` builds ``config.pe`` from their fields, and ``config_lib.validate`` checks a
config by asking them. The config stays flat (``pe.rope_base``, not ``pe.rope.base``), so saved
runs and ``--config.pe.<field>=`` overrides keep working.

Every check raises ``ValueError`` with one line, ``<field>=<value> is invalid; allowed: ...``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ml_collections import ConfigDict


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
  """Raises ``ValueError('<field>=<value!r> is invalid; allowed: <allowed>')`` unless ``ok``."""
  if not ok:
    raise ValueError(" ".join(f"{field}={value!r} is invalid; allowed: {allowed}".split()))


@dataclasses.dataclass(frozen=True)
class Rule:
  """The values one field may take: a test, and the words for what it allows."""

  ok: Callable[[Any], bool]
  allowed: str


def one_of(*choices: str) -> Rule:
  return Rule(lambda value: value in choices, " or ".join(repr(c) for c in choices))


def in_range(low: float, high: float, *, low_inclusive: bool, high_inclusive: bool) -> Rule:
  def ok(value) -> bool:
    above = low <= value if low_inclusive else low < value
    return above and (value <= high if high_inclusive else value < high)

  interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
  return Rule(ok, f"a number in {interval}")


POSITIVE = Rule(lambda value: value > 0, "a number > 0")
NON_NEGATIVE = Rule(lambda value: value >= 0, "a number >= 0")


@dataclasses.dataclass(frozen=True)
class Field:
  """One flat ``config.pe.<name>`` field. Its default also fixes its type (the schema).

  ``switch``: the field turns a feature of its owner on; a value other than the default is
  allowed only when ``pe.name`` is the owner (e.g. Self-Extend's window for RoPE).
  """

  name: str
  default: bool | int | float | str
  comment: str
  rule: Rule | None = None
  switch: bool = False

  def check(self, value: Any) -> None:
    if self.rule is not None:
      require(self.rule.ok(value), f"pe.{self.name}", value, self.rule.allowed)


def no_cross_field_rules(pe: ConfigDict, model: ConfigDict, train: ConfigDict) -> None:
  del pe, model, train


@dataclasses.dataclass(frozen=True)
class EncodingSpec:
  """The config facts of one encoding family or positions wrapper.

  fields: the flat ``pe.*`` fields it owns (each field has exactly one owner).
  validate: ``validate(pe, model, train)`` raises on a cross-field rule; asked for the family
    named by ``pe.name`` and for every wrapper, after each field passed its own rule.
  rotary_dim: ``rotary_dim(head_dim, pe)`` -> R2, the rotated width of q and k (raises unless
    valid); None for encodings that rotate nothing.
  takes_rope_scaling: whether ``pe.rope_scaling`` may be set with this ``pe.name``.
  length_field: the ``pe`` field that caps the positions it can represent (learned:
    ``max_len``); None = unbounded. See :meth:`max_length`.
  train_span: wrappers: their training positions lie in ``[0, train_span(pe))``; 0 when off.
  """

  fields: tuple[Field, ...] = ()
  validate: Callable[[ConfigDict, ConfigDict, ConfigDict], None] = no_cross_field_rules
  rotary_dim: Callable[[int, ConfigDict], int] | None = None
  takes_rope_scaling: bool = False
  length_field: str | None = None
  train_span: Callable[[ConfigDict], int] = lambda pe: 0

  def max_length(self, pe: ConfigDict) -> int | None:
    """The longest sequence (positions ``0 .. n-1``) this encoding represents; None = any."""
    return None if self.length_field is None else pe[self.length_field]
