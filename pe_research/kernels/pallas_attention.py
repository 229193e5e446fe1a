"""Causal flash attention as a Pallas kernel: Mosaic on TPU, ``interpret`` mode anywhere else.
This file sets up the grids and block specs; ``pallas_blocks.py`` has the bodies and the custom
VJP that this TPU form and the GPU form (``pallas_gpu.py``) share.

The math is ``flash_attention.py``'s (online softmax forward; FlashAttention-2 backward that
recomputes each block from the saved log-sum-exp ``lse``). Here one kernel instance runs per
grid step ``(b, g, a, c)``: batch row, KV head, query block, key block of ``P`` positions, its
operand blocks copied to on-chip memory by their ``BlockSpec``. The ``Y = H / G`` query heads of
KV head ``g`` are the rows of one query block, head-major (row ``y P + i`` is head ``g Y + y`` at
position ``a P + i``, ``T = Y P`` rows), so K/V are read once per group, never repeated.

Causal blocks: the grid visits all ``n^2`` block pairs; a pair above the diagonal does nothing
(``pl.when``) and its index maps repeat the last visible block, so no copy is issued for it and
it costs one grid step's overhead. (A scalar-prefetched list of the visible pairs would save
those steps with a second indexing scheme for every operand; the clamped maps keep one.)

Encodings are inputs, none is named here: q/k already rotated (RoPE with any scaling, xPos,
log-n); the far logit set (Self-Extend, ReRoPE) as ``q_far``/``k_far`` with the rule
``i − j >= W`` on sequence indices, each block pair near, far or mixed by ``δ = a − c`` (one or
both score matmuls, as in flash_attention.py); a bias as the encoding's
:class:`~pe_research.encodings.base.KernelBias`, evaluated per block from the position blocks
(PoSE and randomized positions need nothing more), the gradient of its parameters pulled back
per block (``jax.vjp``) in the dq kernel, accumulated per ``(b, g, a)`` and summed outside.

Backward: two kernels (TPU has no atomic add): dq over ``(b, g, a, c)`` with ``c`` innermost,
and dk/dv over ``(b, g, c, a)`` with ``a`` innermost, whose ``ds^T q`` contracts the T rows (the
sum over the Y heads of a group).

Layouts (Mosaic wants the last two dims of a block (8, 128)-aligned or whole): q/out/dq
``[B, H, L, E]`` (blocks ``[Y, P, E]``), k/v ``[B, G, L, E]``, ``lse`` and
``D = rowsum(dout · out)`` ``[B, H, 1, L]`` (rows; blocks ``[Y, 1, P]``), query positions
``[B, L, 1]`` (a column per block), key positions ``[B, 1, L]`` (a row); positions may have one
row for the whole batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pe_research.encodings.base import KernelBias
from pe_research.kernels import pallas_blocks as blocks
from pe_research.kernels import pallas_gpu


def _in_specs(cfg: blocks.Config, q, k, params, key_major: bool, backward: bool) -> list:
  """BlockSpecs of q, k, v, q_pos, k_pos, params, far (q_far, k_far), (dout, lse, delta).
  Grid ``(b, g, i, j)``: ``(a, c) = (i, j)``, or ``(j, i)`` when ``key_major``; invisible pairs
  are clamped to the last visible block of the inner axis."""
  y, p, e = cfg.heads, cfg.block, q.shape[-1]

  def pair(i, j):
    return (jnp.maximum(j, i), i) if key_major else (i, jnp.minimum(j, i))

  row = lambda b: b if cfg.pos_rows > 1 else 0
  q_spec = pl.BlockSpec((None, y, p, e), lambda b, g, i, j: (b, g, pair(i, j)[0], 0))
  kv_spec = pl.BlockSpec((None, None, p, k.shape[-1]), lambda b, g, i, j: (b, g, pair(i, j)[1], 0))
  specs = [
    q_spec,
    kv_spec,
    kv_spec,
    pl.BlockSpec((None, p, 1), lambda b, g, i, j: (row(b), pair(i, j)[0], 0)),
    pl.BlockSpec((None, 1, p), lambda b, g, i, j: (row(b), 0, pair(i, j)[1])),
    *(pl.BlockSpec(x.shape, lambda *_: (0, 0)) for x in params),
    *((q_spec, kv_spec) if cfg.far else ()),
  ]
  if backward:
    specs += [q_spec, _stats_spec(cfg, key_major), _stats_spec(cfg, key_major)]
  return specs


def _stats_spec(cfg: blocks.Config, key_major: bool) -> pl.BlockSpec:
  """The ``[Y, 1, P]`` block of a per-row statistic ``[B, H, 1, L]`` (lse, D)."""

  def index(b, g, i, j):
    return (b, g, 0, jnp.maximum(j, i) if key_major else i)

  return pl.BlockSpec((None, cfg.heads, 1, cfg.block), index)


# Scoped on-chip memory a kernel may use (Mosaic's default is 16 MiB): FIRE's backward keeps its
# MLP's hidden planes for the vjp, 35 MiB at T = 1024, P = 256. Below v7x's 64 MiB per core.
_VMEM_LIMIT = 48 << 20


def _call(cfg: blocks.Config, kernel, grid, in_specs, out_specs, out_shape, scratch):
  return pl.pallas_call(
    functools.partial(kernel, cfg),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    scratch_shapes=scratch,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
      vmem_limit_bytes=_VMEM_LIMIT,
    ),
    interpret=cfg.interpret,
  )


def _forward(cfg: blocks.Config, q, k, v, q_pos, k_pos, params, far):
  b, h, length, e = q.shape
  grid = (b, k.shape[1], cfg.blocks, cfg.blocks)
  in_specs = _in_specs(cfg, q, k, params, key_major=False, backward=False)
  rows = cfg.heads * cfg.block
  f32 = jnp.float32
  return _call(
    cfg,
    blocks.forward_kernel,
    grid,
    in_specs,
    (in_specs[0], _stats_spec(cfg, key_major=False)),
    (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, 1, length), f32)),
    [pltpu.VMEM((rows, 1), f32), pltpu.VMEM((rows, 1), f32), pltpu.VMEM((rows, e), f32)],
  )(q, k, v, q_pos, k_pos, *params, *far)


def _backward(cfg: blocks.Config, residuals, dout):
  q, k, v, q_pos, k_pos, params, far, out, lse = residuals
  b, g = q.shape[0], k.shape[1]
  f32 = jnp.float32
  delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1)[:, :, None]
  inputs = (q, k, v, q_pos, k_pos, *params, *far, dout.astype(v.dtype), lse, delta)
  grid = (b, g, cfg.blocks, cfg.blocks)
  q_rows = cfg.heads * cfg.block

  in_specs = _in_specs(cfg, q, k, params, key_major=False, backward=True)
  dparam_specs = [
    pl.BlockSpec((None, None, None, *x.shape), lambda b, g, i, j: (b, g, i, 0, 0)) for x in params
  ]
  dqs = (q, *far[:1])
  dq_out = _call(
    cfg,
    blocks.dq_kernel,
    grid,
    in_specs,
    (in_specs[0],) * len(dqs) + tuple(dparam_specs),
    tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in dqs)
    + tuple(jax.ShapeDtypeStruct((b, g, cfg.blocks, *x.shape), f32) for x in params),
    [pltpu.VMEM((q_rows, x.shape[-1]), f32) for x in dqs],
  )(*inputs)

  in_specs = _in_specs(cfg, q, k, params, key_major=True, backward=True)
  dks = (k, *far[1:])
  dkv_out = _call(
    cfg,
    blocks.dkv_kernel,
    grid,
    in_specs,
    (in_specs[1],) * (len(dks) + 1),
    tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k, v, *far[1:])),
    [pltpu.VMEM((cfg.block, x.shape[-1]), f32) for x in (k, v, *far[1:])],
  )(*inputs)
  return blocks.gradients(dq_out, dkv_out, far)


MOSAIC = (_forward, _backward)  # kernels of blocks.attention


def kernel_bias_of(bias_fn) -> KernelBias | None:
  """The kernel form of ``bias_fn``, an encoding's bound ``bias`` method (what the model passes
  to attention), or None for no bias; a ValueError for a function without one."""
  if bias_fn is None:
    return None
  kernel_bias = getattr(getattr(bias_fn, "__self__", None), "kernel_bias", lambda: None)()
  if kernel_bias is None:
    raise ValueError(
      f"model.attention='pallas' needs the bias as an encoding's kernel_bias(); got {bias_fn!r}"
      "; allowed: an encoding's bias, or 'dense'/'blockwise' for other bias functions"
    )
  return kernel_bias


def pallas_attention(
  q_BxLxHxE: jax.Array,
  k_BxLxGxE: jax.Array,
  v_BxLxGxE: jax.Array,
  q_pos_BxL: jax.Array,
  k_pos_BxL: jax.Array,
  bias: KernelBias | None,
  block_size: int,
  *,
  far: tuple[jax.Array, jax.Array] | None = None,
  window: int | None = None,
  interpret: bool = False,
  lowering: str = "mosaic",
) -> jax.Array:
  """Causal attention of q ``[B, L, H, E]`` over k, v ``[B, L, G, E]`` -> ``[B, L, H, E]``
  (module docstring); ``far``: None or ``(q_far_BxLxHxE, k_far_BxLxGxE)``, the logit set of
  pairs with ``i − j >= window``; ``interpret``: run the kernels in Pallas's interpreter;
  ``lowering``: "mosaic" (this file's TPU kernels) or "triton" (``pallas_gpu.py``'s GPU ones).

  L is padded to ``n P`` (``P = min(block_size, L)``; for Triton a power of two in [16, 64])
  as in ``blockwise_attention``: padded keys sit after every real query (the causal mask hides
  them), padded query rows are dropped, and positions are padded by repeating the last one."""
  b, length, h, _ = q_BxLxHxE.shape
  g = k_BxLxGxE.shape[2]
  if block_size < 1:
    raise ValueError(f"model.attention_block={block_size} must be a positive integer")
  if lowering not in ("mosaic", "triton"):
    raise ValueError(f"pallas_attention: lowering={lowering!r}; allowed: 'mosaic', 'triton'")
  block = min(block_size, length)
  if lowering == "triton":
    if block_size & (block_size - 1):
      raise ValueError(
        f"model.attention_block={block_size} must be a power of two for the Pallas GPU (Triton) "
        "kernel"
      )
    block = min(block_size, pallas_gpu.MAX_BLOCK, pallas_gpu.power_of_two_at_least(length))
    block = max(pallas_gpu.MIN_SIDE, block)
  n = -(-length // block)
  pad_pos = lambda x_BxL: jnp.pad(
    x_BxL.astype(jnp.int32), ((0, 0), (0, n * block - length)), "edge"
  )
  pad_x = ((0, 0), (0, n * block - length), (0, 0), (0, 0))
  heads_first = lambda x_BxLxHxE: jnp.moveaxis(jnp.pad(x_BxLxHxE, pad_x), 2, 1)
  cfg = blocks.Config(
    block=block,
    heads=h // g,
    blocks=n,
    window=window,
    bias_fn=None if bias is None else bias.fn,
    n_params=0 if bias is None else len(bias.params),
    far=far is not None,
    pos_rows=max(q_pos_BxL.shape[0], k_pos_BxL.shape[0]),
    interpret=interpret,
  )
  pos_rows = lambda x_BxL: jnp.broadcast_to(x_BxL, (cfg.pos_rows, length))
  if lowering == "triton":
    kernel = pallas_gpu.attention
  else:
    kernel = lambda cfg, *args: blocks.attention(cfg, MOSAIC, *args)
  out_BxHxLxE = kernel(
    cfg,
    heads_first(q_BxLxHxE),
    heads_first(k_BxLxGxE),
    heads_first(v_BxLxGxE),
    pad_pos(pos_rows(q_pos_BxL))[:, :, None],
    pad_pos(pos_rows(k_pos_BxL))[:, None, :],
    () if bias is None else tuple(x.astype(jnp.float32) for x in bias.params),
    () if far is None else tuple(heads_first(x) for x in far),
  )
  return jnp.moveaxis(out_BxHxLxE, 1, 2)[:, :length]
