"""The benchmark's transformer in PyTorch eager (CPU), for a JAX/PyTorch throughput ratio.

The same model as :class:`pe_research.model.Transformer` with its default choices: pre-norm
LayerNorm (eps 1e-5, scale and bias), fused bias-free qkv projection, GELU (tanh
approximation), MLP width 4D, tied input/output embeddings, fp32 logits. Encodings: NoPE, RoPE
("half" layout, base 10000), ALiBi (slopes of ``pe_research.encodings.alibi``) and T5 (causal
buckets, a learned ``[buckets, H]`` table). Attention is ``F.scaled_dot_product_attention``,
PyTorch's fastest eager path; a bias is passed as a ``[H, L, L]`` additive mask (the usual
eager way: HF T5 and ALiBi models build it the same way). Things that do not depend on
parameters (RoPE angles, T5 buckets, the causal mask, ALiBi's bias) are built once per length.

The training step is the project's (AdamW, decay on matrices only, global-norm clipping,
weighted cross-entropy). :meth:`TorchTransformer.load_jax_params` copies a JAX model's
parameters, so tests can check that both compute the same logits.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pe_research.encodings.alibi import alibi_slopes
from pe_research.encodings.t5 import t5_relative_position_bucket

ENCODINGS = ("nope", "rope", "alibi", "t5")


@functools.cache
def _rope_tables(length: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
  """cos, sin ``[L, E]`` for the "half" layout: angle ``p / base^(2i/E)``, repeated twice."""
  inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  angle_LxR = np.arange(length)[:, None] * inv_freq[None, :]
  angle_LxE = np.concatenate([angle_LxR, angle_LxR], axis=-1).astype(np.float32)
  return torch.from_numpy(np.cos(angle_LxE)), torch.from_numpy(np.sin(angle_LxE))


def _rotate(x_BxHxLxE: torch.Tensor, cos_LxE: torch.Tensor, sin_LxE: torch.Tensor):
  half = x_BxHxLxE.shape[-1] // 2
  rotated = torch.cat([-x_BxHxLxE[..., half:], x_BxHxLxE[..., :half]], dim=-1)
  return x_BxHxLxE * cos_LxE + rotated * sin_LxE


@functools.cache
def _causal_mask(length: int) -> torch.Tensor:
  """``[L, L]``: 0 where key <= query, -inf above the diagonal."""
  return torch.full((length, length), -math.inf).triu(1)


@functools.cache
def _distance(length: int) -> np.ndarray:
  """int32 ``[L, L]`` key position minus query position."""
  pos_L = np.arange(length, dtype=np.int32)
  return pos_L[None, :] - pos_L[:, None]


class TorchBlock(nn.Module):
  def __init__(self, d: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.attn_norm = nn.LayerNorm(d, eps=1e-5)
    self.qkv = nn.Linear(d, 3 * d, bias=False)
    self.out = nn.Linear(d, d, bias=False)
    self.mlp_norm = nn.LayerNorm(d, eps=1e-5)
    self.up = nn.Linear(d, 4 * d, bias=False)
    self.down = nn.Linear(4 * d, d, bias=False)

  def forward(self, x_BxLxD, rope, mask_HxLxL):
    b, length, d = x_BxLxD.shape
    h, k = self.num_heads, d // self.num_heads
    qkv_3xBxHxLxE = (
      self.qkv(self.attn_norm(x_BxLxD)).view(b, length, 3, h, k).permute(2, 0, 3, 1, 4)
    )
    q_BxHxLxE, k_BxHxLxE, v_BxHxLxE = qkv_3xBxHxLxE.unbind(0)
    if rope is not None:
      q_BxHxLxE, k_BxHxLxE = _rotate(q_BxHxLxE, *rope), _rotate(k_BxHxLxE, *rope)
    y_BxHxLxE = F.scaled_dot_product_attention(
      q_BxHxLxE, k_BxHxLxE, v_BxHxLxE, attn_mask=mask_HxLxL, is_causal=mask_HxLxL is None
    )
    x_BxLxD = x_BxLxD + self.out(y_BxHxLxE.transpose(1, 2).reshape(b, length, d))
    mlp = self.down(F.gelu(self.up(self.mlp_norm(x_BxLxD)), approximate="tanh"))
    return x_BxLxD + mlp


class TorchTransformer(nn.Module):
  """``TorchTransformer(...)(inputs_BxL int64) -> float32 logits [B, L, V]``."""

  def __init__(
    self,
    *,
    vocab_size: int,
    model_dim: int,
    num_layers: int,
    num_heads: int,
    pe: str,
    init_std: float = 0.02,
    t5_num_buckets: int = 32,
    t5_max_distance: int = 128,
  ):
    super().__init__()
    if pe not in ENCODINGS:
      raise ValueError(f"pe.name={pe!r} has no PyTorch reference; allowed: {', '.join(ENCODINGS)}")
    self.pe, self.num_heads = pe, num_heads
    self.t5_num_buckets, self.t5_max_distance = t5_num_buckets, t5_max_distance
    self.embed = nn.Embedding(vocab_size, model_dim)
    self.blocks = nn.ModuleList(TorchBlock(model_dim, num_heads) for _ in range(num_layers))
    self.final_norm = nn.LayerNorm(model_dim, eps=1e-5)
    self.t5_table = nn.Parameter(torch.zeros(t5_num_buckets, num_heads)) if pe == "t5" else None
    self._init(init_std, num_layers, model_dim)

  def _init(self, std: float, num_layers: int, model_dim: int) -> None:
    """N(0, std) weights, residual outputs N(0, std / sqrt(2 layers)), T5 N(0, 1/D)."""
    for name, param in self.named_parameters():
      if param.ndim == 2 and name != "t5_table":
        residual = name.endswith(("out.weight", "down.weight"))
        nn.init.normal_(param, std=std / math.sqrt(2 * num_layers) if residual else std)
    if self.t5_table is not None:
      nn.init.normal_(self.t5_table, std=model_dim**-0.5)

  @functools.cache  # noqa: B019  (one entry per length; the model lives as long as the cache)
  def _buckets(self, length: int) -> torch.Tensor:
    buckets = t5_relative_position_bucket(
      _distance(length),
      bidirectional=False,
      num_buckets=self.t5_num_buckets,
      max_distance=self.t5_max_distance,
    )
    return torch.from_numpy(np.asarray(buckets, np.int64))

  def _mask(self, length: int) -> torch.Tensor | None:
    """Additive ``[H, L, L]`` logit bias with the causal mask, or None (NoPE/RoPE)."""
    if self.pe == "alibi":
      slopes_H = torch.from_numpy(np.asarray(alibi_slopes(self.num_heads)))
      distance_LxL = torch.from_numpy(_distance(length)).float()
      return slopes_H[:, None, None] * distance_LxL + _causal_mask(length)
    if self.pe == "t5":
      return self.t5_table[self._buckets(length)].permute(2, 0, 1) + _causal_mask(length)
    return None

  def forward(self, inputs_BxL: torch.Tensor) -> torch.Tensor:
    length = inputs_BxL.shape[1]
    head_dim = self.embed.embedding_dim // self.num_heads
    rope = _rope_tables(length, head_dim, 10000.0) if self.pe == "rope" else None
    mask_HxLxL = self._mask(length)
    x_BxLxD = self.embed(inputs_BxL)
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD, rope, mask_HxLxL)
    return self.final_norm(x_BxLxD) @ self.embed.weight.T

  @torch.no_grad()
  def load_jax_params(self, params: dict) -> None:
    """Copies ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` of a JAX Transformer."""
    copy = lambda dst, src: dst.copy_(torch.from_numpy(np.array(src, np.float32)))
    copy(self.embed.weight, params["embed"]["embedding"])
    for norm, name in ((self.final_norm, "final_norm"),):
      copy(norm.weight, params[name]["scale"])
      copy(norm.bias, params[name]["bias"])
    for i, block in enumerate(self.blocks):
      p = params["blocks"][i]
      for norm in ("attn_norm", "mlp_norm"):
        copy(getattr(block, norm).weight, p[norm]["scale"])
        copy(getattr(block, norm).bias, p[norm]["bias"])
      for linear, kernel in ((block.qkv, p["attn"]["qkv"]), (block.out, p["attn"]["out"])):
        copy(linear.weight, np.asarray(kernel["kernel"]).T)
      copy(block.up.weight, np.asarray(p["mlp"]["up"]["kernel"]).T)
      copy(block.down.weight, np.asarray(p["mlp"]["down"]["kernel"]).T)
    if self.t5_table is not None:
      copy(self.t5_table, params["encodings"][0]["table"])


def make_train_step(model: TorchTransformer, *, lr: float = 1e-3, grad_clip: float = 1.0):
  """``step(inputs, targets, weights) -> loss``: the project's AdamW step in PyTorch."""
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))

  def step(inputs_BxL, targets_BxL, weights_BxL) -> float:
    logits_BxLxV = model(inputs_BxL)
    nll = F.cross_entropy(logits_BxLxV.flatten(0, 1), targets_BxL.flatten(), reduction="none")
    loss = (nll * weights_BxL.flatten()).sum() / weights_BxL.sum().clamp(min=1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()

  return step
