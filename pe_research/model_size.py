"""The model's sizes from its config: head and MLP widths with their defaults, KV heads, the
parameter count and the training FLOPs per token (benchmarks, MFU, the dry run)."""

from __future__ import annotations

import jax
from flax import nnx


def resolved_dims(model_cfg) -> tuple[int, int]:
  """``(head_dim, mlp_dim)`` with the 0 = default rules applied (``model.py``'s docstring)."""
  head_dim = model_cfg.head_dim or model_cfg.model_dim // model_cfg.num_heads
  mlp_dim = model_cfg.mlp_dim
  if not mlp_dim:
    d = model_cfg.model_dim
    mlp_dim = 4 * d if model_cfg.mlp == "gelu" else -(-(8 * d // 3) // 64) * 64
  return head_dim, mlp_dim


def kv_heads(model_cfg) -> int:
  """The number of key/value heads G: ``model.num_kv_heads``, 0 (or absent) = ``num_heads``."""
  return model_cfg.get("num_kv_heads", 0) or model_cfg.num_heads


def count_params(model: nnx.Module) -> int:
  """Number of trainable scalars (every ``nnx.Param``, encodings included)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_token(config, seq_len: int) -> float:
  """Training FLOPs per token: ``6 N + 6 n_layers H E (L + 1)``.

  ``N`` counts matmul weights: per layer ``2 D (H + G) E`` (q and o: H heads, k and v: G KV
  heads) plus ``2 D F`` (gelu) or ``3 D F`` (swiglu), plus ``D V`` for the output head (tied or
  not; the embedding lookup is free). Attention: ``q.k`` and ``p.v`` cost ``4 H E`` FLOPs per
  (query, visible key) forward, a query sees ``(L + 1) / 2`` keys on average under the causal
  mask, and backward costs twice forward. Norms, softmax and encoding FLOPs are ignored.
  """
  m = config.model
  head_dim, mlp_dim = resolved_dims(m)
  hk = m.num_heads * head_dim
  qkvo = 2 * m.model_dim * (m.num_heads + kv_heads(m)) * head_dim
  per_layer = qkvo + (3 if m.mlp == "swiglu" else 2) * m.model_dim * mlp_dim
  n = m.num_layers * per_layer + m.model_dim * m.vocab_size
  return 6.0 * n + 6.0 * m.num_layers * hk * (seq_len + 1)
