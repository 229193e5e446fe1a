"""Causal flash attention as a Pallas kernel: Mosaic on TPU, ``interpret`` mode anywhere else.

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

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pe_research.encodings.base import KernelBias
from pe_research.flash_attention import MASK_VALUE

_NEAR, _FAR, _MIXED = 0, 1, 2  # kinds of block pairs with a far set; near/far index the sets
_SETS = {_NEAR: (0,), _FAR: (1,), _MIXED: (0, 1)}
_NT = (((1,), (1,)), ((), ()))  # x y^T
_NN = (((1,), (0,)), ((), ()))  # x y
_TN = (((0,), (0,)), ((), ()))  # x^T y


def _dot(x, y, dims) -> jax.Array:
  return jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Config:
  """What the kernels are specialised on (static)."""

  block: int  # P
  heads: int  # Y, query heads per KV head
  blocks: int  # n per side
  window: int | None
  bias_fn: Callable | None
  n_params: int
  far: bool
  pos_rows: int  # 1: one row of positions for the whole batch
  interpret: bool

  def pair_kinds(self, a, c) -> list[tuple[int, jax.Array]]:
    """``[(kind, condition)]`` of block pair (a, c): visible (c <= a) and near/far/mixed."""
    visible = c <= a
    if self.window is None:
      return [(_NEAR, visible)]
    p, w = self.block, self.window
    near_deltas = max(0, -(-(w - p + 1) // p))  # δ below it: every pair i − j < W
    far_delta = (w + 2 * p - 2) // p  # δ from it on: every visible pair i − j >= W
    delta, both = a - c, jnp.logical_and
    return [
      (_NEAR, both(visible, delta < near_deltas)),
      (_FAR, both(visible, delta >= far_delta)),
      (_MIXED, both(visible, both(delta >= near_deltas, delta < far_delta))),
    ]


def _rows(ref) -> jax.Array:
  """A ``[Y, P, X]`` block as ``[T, X]`` rows."""
  x = ref[...]
  return x.reshape(x.shape[0] * x.shape[1], x.shape[2])


def _store_rows(ref, x_TxX: jax.Array) -> None:
  ref[...] = x_TxX.reshape(ref.shape).astype(ref.dtype)


# Per-row statistics (lse, D) are columns [T, 1] in the kernels and rows [Y, 1, P] in memory
# (a column block would take 128 lanes per value); a column becomes a row by an aligned 2-D
# transpose of its broadcast to 128 lanes, and back.
_LANES = 128


def _store_column(ref, x_Tx1: jax.Array) -> None:
  """Column ``[T, 1]`` into a ``[Y, 1, P]`` block."""
  y, _, p = ref.shape
  for i in range(y):
    ref[i] = jnp.broadcast_to(x_Tx1[i * p : (i + 1) * p], (p, _LANES)).T[:1]


def _load_column(ref) -> jax.Array:
  """A ``[Y, 1, P]`` block as a column ``[T, 1]``."""
  y, _, p = ref.shape
  cols = [jnp.broadcast_to(ref[i], (_LANES, p)).T[:, :1] for i in range(y)]
  return jnp.concatenate(cols, axis=0) if y > 1 else cols[0]


@dataclasses.dataclass
class _Block:
  """Operands of one block pair (a, c), loaded from the refs."""

  cfg: _Config
  a: jax.Array
  c: jax.Array
  g: jax.Array
  refs: dict

  def indices(self) -> tuple[jax.Array, jax.Array]:
    """Sequence indices of the query rows ``[T, 1]`` and keys ``[1, P]``."""
    p = self.cfg.block
    query_Px1 = self.a * p + jax.lax.broadcasted_iota(jnp.int32, (p, 1), 0)
    return self._tile(query_Px1), self.c * p + jax.lax.broadcasted_iota(jnp.int32, (1, p), 1)

  def _tile(self, x_Px1: jax.Array) -> jax.Array:
    return jnp.concatenate([x_Px1] * self.cfg.heads, axis=0) if self.cfg.heads > 1 else x_Px1

  def bias_inputs(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(q_pos_Tx1, k_pos_1xP, head_Tx1)`` for the encoding's ``KernelBias.fn``."""
    p, y = self.cfg.block, self.cfg.heads
    head_Tx1 = jnp.concatenate([jnp.full((p, 1), i, jnp.int32) for i in range(y)], axis=0)
    return self._tile(self.refs["q_pos"][...]), self.refs["k_pos"][...], self.g * y + head_Tx1

  def params(self) -> list[jax.Array]:
    return [r[...] for r in self.refs["params"]]

  def sets(self, kind) -> dict[int, tuple[jax.Array, jax.Array]]:
    """``{set: (q_TxE, k_PxE)}`` of the logit sets the pair reads (0 near, 1 far)."""
    names = (("q", "k"), ("q_far", "k_far"))
    return {i: (_rows(self.refs[names[i][0]]), self.refs[names[i][1]][...]) for i in _SETS[kind]}

  def near_mask(self) -> jax.Array:
    query_Tx1, key_1xP = self.indices()
    return query_Tx1 - key_1xP < self.cfg.window

  def scores(self, kind, sets, bias_TxP) -> jax.Array:
    """Float32 ``[T, P]`` scores ``q . k / sqrt(E) + bias``, masked where key after query."""
    q_TxE, _ = sets[min(sets)]
    s_TxP = _dot(*sets[min(sets)], _NT)
    if kind == _MIXED:
      s_TxP = jnp.where(self.near_mask(), s_TxP, _dot(*sets[1], _NT))
    s_TxP = s_TxP * q_TxE.shape[-1] ** -0.5
    if bias_TxP is not None:
      s_TxP = s_TxP + bias_TxP
    query_Tx1, key_1xP = self.indices()
    return jnp.where(query_Tx1 >= key_1xP, s_TxP, MASK_VALUE)

  def split(self, kind, x_TxP) -> dict[int, jax.Array]:
    """``x`` per logit set: all of it, or on a mixed pair its near and far parts."""
    if kind != _MIXED:
      return {_SETS[kind][0]: x_TxP}
    near_TxP, zero = self.near_mask(), jnp.zeros((), x_TxP.dtype)
    return {0: jnp.where(near_TxP, x_TxP, zero), 1: jnp.where(near_TxP, zero, x_TxP)}


def _named(cfg: _Config, refs, extra: tuple[str, ...], outputs: tuple[str, ...]) -> dict:
  """The kernel's refs by name: inputs, ``extra`` inputs, ``outputs``, then scratch."""
  refs = list(refs)
  named = dict(zip(("q", "k", "v", "q_pos", "k_pos"), refs[:5], strict=True))
  refs = refs[5:]
  named["params"], refs = refs[: cfg.n_params], refs[cfg.n_params :]
  if cfg.far:
    (named["q_far"], named["k_far"]), refs = refs[:2], refs[2:]
  for name in (*extra, *outputs):
    named[name], refs = refs[0], refs[1:]
  named["scratch"] = refs
  return named


def _each_visible_kind(cfg: _Config, a, c, step) -> None:
  for kind, condition in cfg.pair_kinds(a, c):
    pl.when(condition)(functools.partial(step, kind))


def _forward_kernel(cfg: _Config, *refs):
  named = _named(cfg, refs, (), ("out", "lse"))
  m_sc, l_sc, acc_sc = named["scratch"]
  g, a, c = (pl.program_id(i) for i in (1, 2, 3))
  blk = _Block(cfg, a, c, g, named)

  @pl.when(c == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def step(kind):
    bias = None if cfg.bias_fn is None else cfg.bias_fn(*blk.bias_inputs(), *blk.params())
    s_TxP = blk.scores(kind, blk.sets(kind), bias)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, s_TxP.max(axis=-1, keepdims=True))
    correction = jnp.exp(m_prev - m_new)
    p_TxP = jnp.exp(s_TxP - m_new)
    l_sc[...] = l_sc[...] * correction + p_TxP.sum(axis=-1, keepdims=True)
    v_PxE = named["v"][...]
    acc_sc[...] = acc_sc[...] * correction + _dot(p_TxP.astype(v_PxE.dtype), v_PxE, _NN)
    m_sc[...] = m_new

  _each_visible_kind(cfg, a, c, step)

  @pl.when(c == a)  # the last visible key block
  def _finish():
    _store_rows(named["out"], acc_sc[...] / l_sc[...])
    _store_column(named["lse"], m_sc[...] + jnp.log(l_sc[...]))


def _probs_and_ds(blk: _Block, kind, sets, bias_TxP):
  """``(p, ds, ds per logit set)`` of a block pair: ``p = exp(s − lse)``,
  ``ds = p (dout v^T − D)``, and ``ds / sqrt(E)`` in q's dtype split per set
  (:meth:`_Block.split`)."""
  q_TxE = sets[min(sets)][0]
  s_TxP = blk.scores(kind, sets, bias_TxP)
  p_TxP = jnp.exp(s_TxP - _load_column(blk.refs["lse"]))
  dp_TxP = _dot(_rows(blk.refs["dout"]), blk.refs["v"][...], _NT)
  ds_TxP = p_TxP * (dp_TxP - _load_column(blk.refs["delta"]))
  ds_scaled = (ds_TxP * q_TxE.shape[-1] ** -0.5).astype(q_TxE.dtype)
  return p_TxP, ds_TxP, blk.split(kind, ds_scaled)


_BACKWARD_INPUTS = ("dout", "lse", "delta")


def _dq_kernel(cfg: _Config, *refs):
  dq_names = ("dq", "dq_far")[: 1 + cfg.far]
  param_names = tuple(f"dparam{i}" for i in range(cfg.n_params))
  named = _named(cfg, refs, _BACKWARD_INPUTS, (*dq_names, *param_names))
  dq_scs = named["scratch"]
  g, a, c = (pl.program_id(i) for i in (1, 2, 3))
  blk = _Block(cfg, a, c, g, named)

  @pl.when(c == 0)
  def _init():
    for ref in (*dq_scs, *(named[n] for n in param_names)):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  def step(kind):
    bias, bias_vjp = None, None
    if cfg.bias_fn is not None:
      inputs = blk.bias_inputs()
      bias, bias_vjp = jax.vjp(lambda *ps: cfg.bias_fn(*inputs, *ps), *blk.params())
    sets = blk.sets(kind)
    _, ds_TxP, ds_sets = _probs_and_ds(blk, kind, sets, bias)
    for i, ds_set in ds_sets.items():
      dq_scs[i][...] += _dot(ds_set, sets[i][1], _NN)
    if cfg.n_params:
      for name, cot in zip(param_names, bias_vjp(ds_TxP), strict=True):
        named[name][...] += cot

  _each_visible_kind(cfg, a, c, step)

  @pl.when(c == a)
  def _finish():
    for name, sc in zip(dq_names, dq_scs, strict=True):
      _store_rows(named[name], sc[...])


def _dkv_kernel(cfg: _Config, *refs):
  outputs = ("dk", "dv", "dk_far")[: 2 + cfg.far]
  named = _named(cfg, refs, _BACKWARD_INPUTS, outputs)
  dk_sc, dv_sc, *dk_far_sc = named["scratch"]
  dk_scs = (dk_sc, *dk_far_sc)
  g, c, a = (pl.program_id(i) for i in (1, 2, 3))
  blk = _Block(cfg, a, c, g, named)

  @pl.when(a == 0)
  def _init():
    for ref in named["scratch"]:
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  def step(kind):
    bias = None if cfg.bias_fn is None else cfg.bias_fn(*blk.bias_inputs(), *blk.params())
    sets = blk.sets(kind)
    p_TxP, _, ds_sets = _probs_and_ds(blk, kind, sets, bias)
    dout_TxE = _rows(named["dout"])
    dv_sc[...] += _dot(p_TxP.astype(dout_TxE.dtype), dout_TxE, _TN)
    for i, ds_set in ds_sets.items():
      dk_scs[i][...] += _dot(ds_set, sets[i][0], _TN)

  _each_visible_kind(cfg, a, c, step)

  @pl.when(a == cfg.blocks - 1)
  def _finish():
    for name, sc in zip(("dk", "dk_far")[: 1 + cfg.far], dk_scs, strict=True):
      named[name][...] = sc[...].astype(named[name].dtype)
    named["dv"][...] = dv_sc[...].astype(named["dv"].dtype)


def _in_specs(cfg: _Config, q, k, params, key_major: bool, backward: bool) -> list:
  """BlockSpecs of q, k, v, q_pos, k_pos, params, far (q_far, k_far), (dout, lse, delta).
  Grid ``(b, g, i, j)``: ``(a, c) = (i, j)``, or ``(j, i)`` when ``key_major``; invisible pairs
  are clamped to the last visible block of the inner axis."""
  y, p, e = cfg.heads, cfg.block, q.shape[-1]

  def blocks(i, j):
    return (jnp.maximum(j, i), i) if key_major else (i, jnp.minimum(j, i))

  row = lambda b: b if cfg.pos_rows > 1 else 0
  q_spec = pl.BlockSpec((None, y, p, e), lambda b, g, i, j: (b, g, blocks(i, j)[0], 0))
  kv_spec = pl.BlockSpec(
    (None, None, p, k.shape[-1]), lambda b, g, i, j: (b, g, blocks(i, j)[1], 0)
  )
  specs = [
    q_spec,
    kv_spec,
    kv_spec,
    pl.BlockSpec((None, p, 1), lambda b, g, i, j: (row(b), blocks(i, j)[0], 0)),
    pl.BlockSpec((None, 1, p), lambda b, g, i, j: (row(b), 0, blocks(i, j)[1])),
    *(pl.BlockSpec(x.shape, lambda *_: (0, 0)) for x in params),
    *((q_spec, kv_spec) if cfg.far else ()),
  ]
  if backward:
    specs += [q_spec, _stats_spec(cfg, key_major), _stats_spec(cfg, key_major)]
  return specs


def _stats_spec(cfg: _Config, key_major: bool) -> pl.BlockSpec:
  """The ``[Y, 1, P]`` block of a per-row statistic ``[B, H, 1, L]`` (lse, D)."""

  def index(b, g, i, j):
    return (b, g, 0, jnp.maximum(j, i) if key_major else i)

  return pl.BlockSpec((None, cfg.heads, 1, cfg.block), index)


# Scoped on-chip memory a kernel may use (Mosaic's default is 16 MiB): FIRE's backward keeps its
# MLP's hidden planes for the vjp, 35 MiB at T = 1024, P = 256. Below v7x's 64 MiB per core.
_VMEM_LIMIT = 48 << 20


def _call(cfg: _Config, kernel, grid, in_specs, out_specs, out_shape, scratch):
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


def _forward(cfg: _Config, q, k, v, q_pos, k_pos, params, far):
  b, h, length, e = q.shape
  grid = (b, k.shape[1], cfg.blocks, cfg.blocks)
  in_specs = _in_specs(cfg, q, k, params, key_major=False, backward=False)
  rows = cfg.heads * cfg.block
  f32 = jnp.float32
  return _call(
    cfg,
    _forward_kernel,
    grid,
    in_specs,
    (in_specs[0], _stats_spec(cfg, key_major=False)),
    (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, 1, length), f32)),
    [pltpu.VMEM((rows, 1), f32), pltpu.VMEM((rows, 1), f32), pltpu.VMEM((rows, e), f32)],
  )(q, k, v, q_pos, k_pos, *params, *far)


def _backward(cfg: _Config, residuals, dout):
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
    _dq_kernel,
    grid,
    in_specs,
    (in_specs[0],) * len(dqs) + tuple(dparam_specs),
    tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in dqs)
    + tuple(jax.ShapeDtypeStruct((b, g, cfg.blocks, *x.shape), f32) for x in params),
    [pltpu.VMEM((q_rows, x.shape[-1]), f32) for x in dqs],
  )(*inputs)
  dq_sets, dparams = dq_out[: len(dqs)], dq_out[len(dqs) :]

  in_specs = _in_specs(cfg, q, k, params, key_major=True, backward=True)
  dks = (k, *far[1:])
  dkv_out = _call(
    cfg,
    _dkv_kernel,
    grid,
    in_specs,
    (in_specs[1],) * (len(dks) + 1),
    tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k, v, *far[1:])),
    [pltpu.VMEM((cfg.block, x.shape[-1]), f32) for x in (k, v, *far[1:])],
  )(*inputs)
  dk, dv, *dk_far = dkv_out
  far_grads = (dq_sets[1], dk_far[0]) if far else ()
  dparams = tuple(x.sum(axis=(0, 1, 2)) for x in dparams)
  return dq_sets[0], dk, dv, None, None, dparams, far_grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_pos, k_pos, params, far):
  return _forward(cfg, q, k, v, q_pos, k_pos, params, far)[0]


def _attention_fwd(cfg, *args):
  out, lse = _forward(cfg, *args)
  return out, (*args, out, lse)


_attention.defvjp(_attention_fwd, _backward)


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
) -> jax.Array:
  """Causal attention of q ``[B, L, H, E]`` over k, v ``[B, L, G, E]`` -> ``[B, L, H, E]``
  (module docstring); ``far``: None or ``(q_far_BxLxHxE, k_far_BxLxGxE)``, the logit set of
  pairs with ``i − j >= window``; ``interpret``: run the kernels in Pallas's interpreter.

  L is padded to ``n P`` (``P = min(block_size, L)``) as in ``blockwise_attention``: padded keys
  sit after every real query (the causal mask hides them), padded query rows are dropped, and
  positions are padded by repeating the last one."""
  b, length, h, _ = q_BxLxHxE.shape
  g = k_BxLxGxE.shape[2]
  if block_size < 1:
    raise ValueError(f"model.attention_block={block_size} must be a positive integer")
  block = min(block_size, length)
  n = -(-length // block)
  pad_pos = lambda x_BxL: jnp.pad(
    x_BxL.astype(jnp.int32), ((0, 0), (0, n * block - length)), "edge"
  )
  pad_x = ((0, 0), (0, n * block - length), (0, 0), (0, 0))
  heads_first = lambda x_BxLxHxE: jnp.moveaxis(jnp.pad(x_BxLxHxE, pad_x), 2, 1)
  cfg = _Config(
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
  out_BxHxLxE = _attention(
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
