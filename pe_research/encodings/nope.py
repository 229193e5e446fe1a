"""NoPE: no positional encoding at all (Kazemnejad et al. 2023).

Every hook keeps the base class's identity behaviour; order information comes only from the
causal mask.
"""

from __future__ import annotations

from pe_research.encodings.base import PositionalEncoding
from pe_research.encodings.spec import EncodingSpec


class NoPE(PositionalEncoding):
  """The identity encoding: embeddings, q/k and logits pass through unchanged."""


SPEC = EncodingSpec()  # No config fields.


def build(pe_cfg, *, num_heads, head_dim, model_dim, rngs) -> NoPE:
  del pe_cfg, num_heads, head_dim, model_dim, rngs
  return NoPE()
