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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def _require(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise ValueError(f"pe.{field}={value!r} is invalid; allowed: {allowed}")


def check_extension(
  name: str, *, self_extend_window: int, self_extend_group: int, rerope_window: int, logn_len: int
) -> None:
  """Raises ValueError (one line naming the ``pe.`` field) for invalid extension settings."""
  _require(self_extend_window >= 0, "self_extend_window", self_extend_window, "0 (off) or W > 0")
  _require(self_extend_group >= 1, "self_extend_group", self_extend_group, "a group size >= 1")
  _require(rerope_window >= 0, "rerope_window", rerope_window, "0 (off) or W > 0")
  _require(logn_len == 0 or logn_len >= 2, "logn_len", logn_len, "0 (off) or a length >= 2")
  settings = dict(self_extend_window=self_extend_window, rerope_window=rerope_window)
  for field, value in (*settings.items(), ("logn_len", logn_len)):
    _require(not value or name == "rope", field, value, f"0 unless pe.name='rope' (got {name!r})")
  _require(
    not (self_extend_window and rerope_window),
    "rerope_window",
    rerope_window,
    f"0 when pe.self_extend_window={self_extend_window} (one far logit set: pick one method)",
  )


def extension_kwargs(pe_cfg) -> dict:
  """The extension settings read from ``config.pe`` (absent in older runs: off)."""
  return dict(
    self_extend_window=pe_cfg.get("self_extend_window", 0),
    self_extend_group=pe_cfg.get("self_extend_group", 1),
    rerope_window=pe_cfg.get("rerope_window", 0),
    logn_len=pe_cfg.get("logn_len", 0),
  )
