"""The benchmark's transformer in PyTorch (CPU), for a JAX/PyTorch throughput ratio.

The same model as :class:`pe_research.model.Transformer` with its default choices: pre-norm
LayerNorm (eps 1e-5, scale and bias), fused bias-free qkv projection, GELU (tanh
approximation), MLP width 4D, tied input/output embeddings, fp32 logits. Encodings: NoPE, RoPE
("half" layout, base 10000), ALiBi (slopes of ``pe_research.encodings.alibi``) and T5 (causal
buckets, a learned ``[buckets, H]`` table). Runs eager, or under ``torch.compile``.

Attention is ``F.scaled_dot_product_attention``. On the CPU it picks (torch 2.x): NoPE and RoPE,
``is_causal=True``: the flash kernel, which skips the masked blocks; ALiBi, a constant
``[1, H, L, L]`` additive mask (causal -inf included): the flash kernel, computing every block;
T5, the same mask shape built each forward from the learned table: the math path whenever the
mask needs a gradient (training), since the CPU flash kernel has no mask gradient. A 3-D
``[H, L, L]`` mask would send ALiBi to the math path too. Things that do not depend on parameters
(RoPE angles, T5 buckets, the causal mask, ALiBi's mask) are built once per length.

The training step is the project's (``pe_research.train.make_optimizer``): AdamW (fused when
this torch has it on the CPU, else foreach) with config.train's betas, decay on matrices only,
global-norm clipping, the warmup + cosine schedule, weighted cross-entropy.
:meth:`TorchTransformer.load_jax_params` copies a JAX model's parameters, so tests can check that
both compute the same logits and gradients.
"""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pe_research.encodings.alibi import alibi_slopes
from pe_research.encodings.t5 import t5_relative_position_bucket

ENCODINGS = ("nope", "rope", "alibi", "t5")
_NORM = {"weight": "scale", "bias": "bias"}  # LayerNorm: torch name -> JAX name


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


@functools.cache
def _alibi_mask(length: int, num_heads: int) -> torch.Tensor:
  """``[1, H, L, L]``: ``slope_h * (k - q)`` plus the causal mask (broadcast over the batch)."""
  slopes_H = torch.from_numpy(np.asarray(alibi_slopes(num_heads)))
  distance_LxL = torch.from_numpy(_distance(length)).float()
  return (slopes_H[:, None, None] * distance_LxL + _causal_mask(length))[None]


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

  def forward(self, x_BxLxD, rope, mask_1xHxLxL):
    b, length, d = x_BxLxD.shape
    h, k = self.num_heads, d // self.num_heads
    qkv_3xBxHxLxE = (
      self.qkv(self.attn_norm(x_BxLxD)).view(b, length, 3, h, k).permute(2, 0, 3, 1, 4)
    )
    q_BxHxLxE, k_BxHxLxE, v_BxHxLxE = qkv_3xBxHxLxE.unbind(0)
    if rope is not None:
      q_BxHxLxE, k_BxHxLxE = _rotate(q_BxHxLxE, *rope), _rotate(k_BxHxLxE, *rope)
    y_BxHxLxE = F.scaled_dot_product_attention(
      q_BxHxLxE, k_BxHxLxE, v_BxHxLxE, attn_mask=mask_1xHxLxL, is_causal=mask_1xHxLxL is None
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
    """Additive ``[1, H, L, L]`` logit bias with the causal mask, or None (NoPE/RoPE)."""
    if self.pe == "alibi":
      return _alibi_mask(length, self.num_heads)
    if self.pe == "t5":
      bias_HxLxL = self.t5_table[self._buckets(length)].permute(2, 0, 1)
      return (bias_HxLxL + _causal_mask(length))[None]
    return None

  def forward(self, inputs_BxL: torch.Tensor) -> torch.Tensor:
    length = inputs_BxL.shape[1]
    head_dim = self.embed.embedding_dim // self.num_heads
    rope = _rope_tables(length, head_dim, 10000.0) if self.pe == "rope" else None
    mask_1xHxLxL = self._mask(length)
    x_BxLxD = self.embed(inputs_BxL)
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD, rope, mask_1xHxLxL)
    return self.final_norm(x_BxLxD) @ self.embed.weight.T

  def jax_paths(self) -> dict[str, tuple[tuple, bool]]:
    """``{torch parameter name: (path in the JAX pure param dict, transposed)}``."""
    paths = {"embed.weight": (("embed", "embedding"), False)}
    paths |= {f"final_norm.{w}": (("final_norm", j), False) for w, j in _NORM.items()}
    for i in range(len(self.blocks)):
      for norm in ("attn_norm", "mlp_norm"):
        paths |= {
          f"blocks.{i}.{norm}.{w}": (("blocks", i, norm, j), False) for w, j in _NORM.items()
        }
      for name, jax_name in (("qkv", "attn"), ("out", "attn"), ("up", "mlp"), ("down", "mlp")):
        paths[f"blocks.{i}.{name}.weight"] = (("blocks", i, jax_name, name, "kernel"), True)
    if self.t5_table is not None:
      paths["t5_table"] = (("encodings", 0, "table"), False)
    return paths

  @torch.no_grad()
  def load_jax_params(self, params: dict) -> None:
    """Copies ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` of a JAX Transformer."""
    named = dict(self.named_parameters())
    for name, (path, transposed) in self.jax_paths().items():
      value = np.array(functools.reduce(lambda tree, key: tree[key], path, params), np.float32)
      named[name].copy_(torch.from_numpy(value.T if transposed else value))


def lr_multiplier(train_cfg, step: int) -> float:
  """``optax.warmup_cosine_decay_schedule(0, lr, warmup_steps, steps, lr * min_lr_ratio)`` / lr
  at update ``step`` (0-based): ``step / warmup``, then ``r + (1 - r) (1 + cos(pi t / T)) / 2``
  with ``t = step - warmup``, ``T = steps - warmup`` (``t`` capped at ``T``)."""
  warmup, r = train_cfg.warmup_steps, train_cfg.min_lr_ratio
  if step < warmup:
    return step / warmup
  decay_steps = max(train_cfg.steps - warmup, 1)
  t = min(step - warmup, decay_steps)
  return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * t / decay_steps))


def make_optimizer(model: nn.Module, train_cfg) -> tuple[torch.optim.Optimizer, str]:
  """``(AdamW, "fused" or "foreach")``: config.train's betas and decay (matrices only); fused if
  this torch runs it on the CPU."""
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  groups = [
    {"params": decay, "weight_decay": train_cfg.weight_decay},
    {"params": no_decay, "weight_decay": 0.0},
  ]
  kwargs = {"lr": train_cfg.lr, "betas": (train_cfg.b1, train_cfg.b2), "eps": 1e-8}  # optax's eps
  if "fused" in inspect.signature(torch.optim.AdamW).parameters:
    try:
      return torch.optim.AdamW(groups, fused=True, **kwargs), "fused"
    except (RuntimeError, ValueError):  # Older torch: fused needs CUDA tensors.
      pass
  return torch.optim.AdamW(groups, foreach=True, **kwargs), "foreach"


def make_train_step(model: TorchTransformer, train_cfg):
  """``(step(inputs, targets, weights) -> loss, optimizer kind)``: the project's train step."""
  optimizer, kind = make_optimizer(model, train_cfg)
  schedule = torch.optim.lr_scheduler.LambdaLR(
    optimizer, functools.partial(lr_multiplier, train_cfg)
  )

  def step(inputs_BxL, targets_BxL, weights_BxL) -> float:
    logits_BxLxV = model(inputs_BxL)
    nll = F.cross_entropy(logits_BxLxV.flatten(0, 1), targets_BxL.flatten(), reduction="none")
    loss = (nll * weights_BxL.flatten()).sum() / weights_BxL.sum().clamp(min=1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if train_cfg.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
    optimizer.step()
    schedule.step()
    return loss.item()

  return step, kind
