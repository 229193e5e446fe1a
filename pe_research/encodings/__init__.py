"""Positional encodings: one family per module, all listed in one registry (``registry.py``).

Each family module states its config facts in ``SPEC`` (``spec.py``) and builds itself with
``build``; ``build_encoding(config.pe, ...)`` builds any family by name.
"""

from pe_research.encodings.alibi import ALiBi, alibi_bias, alibi_slopes
from pe_research.encodings.base import PositionalEncoding, sequential_positions
from pe_research.encodings.fire import Fire
from pe_research.encodings.kerple import Kerple, kerple_bias
from pe_research.encodings.learned import LearnedAbsolute
from pe_research.encodings.nope import NoPE
from pe_research.encodings.pose import PoSEPositions, pose_positions
from pe_research.encodings.randomized import RandomizedPositions, random_sorted_positions
from pe_research.encodings.registry import build_encoding, encoding_names, encoding_spec
from pe_research.encodings.rope import RoPE, apply_rope
from pe_research.encodings.rope_scaling import RopeScaling, parse_rope_scaling, rope_frequencies
from pe_research.encodings.sinusoidal import Sinusoidal, sinusoidal
from pe_research.encodings.spec import EncodingSpec, Field
from pe_research.encodings.t5 import T5RelativeBias, t5_relative_position_bucket
from pe_research.encodings.xpos import XPos, apply_xpos

__all__ = [
  "ALiBi",
  "EncodingSpec",
  "Field",
  "Fire",
  "Kerple",
  "LearnedAbsolute",
  "NoPE",
  "PoSEPositions",
  "PositionalEncoding",
  "RandomizedPositions",
  "RoPE",
  "RopeScaling",
  "Sinusoidal",
  "T5RelativeBias",
  "XPos",
  "alibi_bias",
  "alibi_slopes",
  "apply_rope",
  "apply_xpos",
  "build_encoding",
  "encoding_names",
  "encoding_spec",
  "kerple_bias",
  "parse_rope_scaling",
  "pose_positions",
  "random_sorted_positions",
  "rope_frequencies",
  "sequential_positions",
  "sinusoidal",
  "t5_relative_position_bucket",
]
