"""Training-free context extension of a pretrained RoPE model (docs: reference/formulas.md).

Query i, key j (sequence indices, causal, d = i − j), positions p_i, p_j, window W:

  Self-Extend (Jin et al. 2024), group size G:
    d < W:  ordinary RoPE, positions (p_i, p_j);
    d ≥ W:  "far" positions (⌊p_i/G⌋ + W − ⌊W/G⌋, ⌊p_j/G⌋)
  ReRoPE (Su 2023): distances from W on are clipped to W:
    d < W:  ordinary RoPE;
    d ≥ W:  far positions (W, 0), i.e. the logit of relative distance W
  log-n (Chiang & Cholak 2022), trained length L: query i is multiplied by
    s_i = max(1, ln(p_i + 1) / ln L), so every logit of query i (near and far) is scaled by s_i.

The two logit sets are merged per (i, j) before one softmax (``attention.attend``'s far set).
The boundary is the official code's: d < W near, d ≥ W far (LongLM's ``neighbor_attention_mask``,
``tril(ones) − tril(ones, −W)``). The query shift uses ⌊W/G⌋ as in formulas.md, LongLM's decode
path and llama.cpp; LongLM's prefill path uses the float W/G, the same whenever G divides W.
The window compares sequence indices i − j: the distance of positions for the sequential
positions these methods are evaluated with.

In the Pallas kernel (``kernels/pallas_attention.py``): the far set enters as the second q/k
pair, the rule i − j >= W applied per block on sequence indices; log-n as the scaled q.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pe_research.encodings.spec import Field, Rule, require


def self_extend_positions(pos_BxL: jax.Array, *, window: int, group: int, is_query: bool):
  """Self-Extend's far positions: ``⌊p/G⌋ + W − ⌊W/G⌋`` for queries, ``⌊p/G⌋`` for keys."""
  grouped_BxL = pos_BxL // group
  return grouped_BxL + (window - window // group) if is_query else grouped_BxL


def rerope_positions(pos_BxL: jax.Array, *, window: int, is_query: bool) -> jax.Array:
  """ReRoPE's far positions: W for queries, 0 for keys (their distance is W)."""
  return jnp.full_like(pos_BxL, window if is_query else 0)


def logn_scale(pos_BxL: jax.Array, train_len: int) -> jax.Array:
  """float32 ``s = max(1, ln(p + 1) / ln L)`` per position (1 exactly for p < L)."""
  ratio_BxL = jnp.log(pos_BxL.astype(jnp.float32) + 1.0) / jnp.log(float(train_len))
  return jnp.maximum(ratio_BxL, 1.0)


# pe.* fields of these methods, owned by pe.name="rope" (rope.py's SPEC); a window or logn_len
# other than 0 needs pe.name="rope". Runs saved before these fields existed load with them off.
FIELDS = (
  Field(
    "self_extend_window",
    0,
    "Self-Extend window W: pairs i - j >= W use positions (p_i//G + W - W//G, p_j//G); 0 = off.",
    Rule(lambda w: w >= 0, "0 (off) or W > 0"),
    switch=True,
  ),
  Field(
    "self_extend_group",
    1,
    "Self-Extend group size G >= 1.",
    Rule(lambda g: g >= 1, "a group size >= 1"),
  ),
  Field(
    "rerope_window",
    0,
    "ReRoPE window W: distances >= W are clipped to W; 0 = off.",
    Rule(lambda w: w >= 0, "0 (off) or W > 0"),
    switch=True,
  ),
  Field(
    "logn_len",
    0,
    "log-n scaling: query p's logits times max(1, ln(p+1)/ln(this)); 0 = off.",
    Rule(lambda n: n == 0 or n >= 2, "0 (off) or a length >= 2"),
    switch=True,
  ),
)


def check_extension(**settings: int) -> None:
  """Raises ValueError (one line naming the ``pe.`` field) for invalid extension settings
  (keyword per field of ``FIELDS``); Self-Extend and ReRoPE exclude each other."""
  for field in FIELDS:
    field.check(settings[field.name])
  window, rerope = settings["self_extend_window"], settings["rerope_window"]
  require(
    not (window and rerope),
    "pe.rerope_window",
    rerope,
    f"0 when pe.self_extend_window={window} (one far logit set: pick one method)",
  )


def switched_on(pe_cfg) -> dict[str, int]:
  """``{"pe.<field>": value}`` of each method switched on (Self-Extend, ReRoPE, log-n)."""
  settings = extension_kwargs(pe_cfg)
  return {
    f"pe.{f.name}": settings[f.name] for f in FIELDS if f.switch and settings[f.name] != f.default
  }


def extension_kwargs(pe_cfg) -> dict:
  """The extension settings read from ``config.pe`` (absent in older runs: off)."""
  return {field.name: pe_cfg.get(field.name, field.default) for field in FIELDS}
