"""The bodies of the Pallas attention kernels (``pallas_attention.py`` sets up their grids) and
the custom VJP (:func:`attention`) that their TPU and GPU forms share.

One call of a body is one grid step: block pair ``(a, c)`` of KV head ``g`` of one batch row,
its operands in refs (on-chip copies of the blocks). A query block holds T = Y P rows,
head-major (row ``y P + i`` is head ``g Y + y`` at position ``a P + i``). The math is
``flash_attention.py``'s: online softmax forward, and a FlashAttention-2 backward that
recomputes ``p = exp(s − lse)`` per block, split over a dq body and a dk/dv body.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pe_research.flash_attention import MASK_VALUE

_NEAR, _FAR, _MIXED = 0, 1, 2  # kinds of block pairs with a far set; near/far index the sets
_SETS = {_NEAR: (0,), _FAR: (1,), _MIXED: (0, 1)}
_NT = (((1,), (1,)), ((), ()))  # x y^T
_NN = (((1,), (0,)), ((), ()))  # x y
_TN = (((0,), (0,)), ((), ()))  # x^T y


def _dot(x, y, dims) -> jax.Array:
  return jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Config:
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
  scale: float | None = None  # of q . k; None: 1 / sqrt(E), E the operands' last side

  def logit_scale(self, head_dim: int) -> float:
    return head_dim**-0.5 if self.scale is None else self.scale

  def _deltas(self) -> tuple[int, int]:
    """``(near, far)``: block pairs ``δ = a − c`` below ``near`` hold only pairs ``i − j < W``,
    those from ``far`` on only pairs ``i − j >= W`` (between: mixed)."""
    p, w = self.block, self.window
    return max(0, -(-(w - p + 1) // p)), (w + 2 * p - 2) // p

  def pair_kinds(self, a, c) -> list[tuple[int, jax.Array]]:
    """``[(kind, condition)]`` of block pair (a, c): visible (c <= a) and near/far/mixed."""
    visible = c <= a
    if self.window is None:
      return [(_NEAR, visible)]
    near_deltas, far_delta = self._deltas()
    delta, both = a - c, jnp.logical_and
    return [
      (_NEAR, both(visible, delta < near_deltas)),
      (_FAR, both(visible, delta >= far_delta)),
      (_MIXED, both(visible, both(delta >= near_deltas, delta < far_delta))),
    ]

  def kind_ranges(self, x, key_major: bool) -> list[tuple[int, jax.Array, jax.Array]]:
    """``[(kind, lo, hi)]``: the visible partners of block ``x`` of one kind are ``lo .. hi−1``,
    key blocks ``c <= x`` of query block ``x``, or query blocks ``a >= x`` of key block ``x``
    (``key_major``); the same kinds as :meth:`pair_kinds`, as loop bounds."""
    n = self.blocks
    if self.window is None:
      return [(_NEAR, 0, x + 1) if not key_major else (_NEAR, x, n)]
    near, far = self._deltas()
    if key_major:  # a = x + δ
      cut = lambda d: jnp.clip(x + d, x, n)
      return [(_NEAR, x, cut(near)), (_MIXED, cut(near), cut(far)), (_FAR, cut(far), n)]
    cut = lambda d: jnp.clip(x - d + 1, 0, x + 1)  # c = x − δ
    return [(_FAR, 0, cut(far)), (_MIXED, cut(far), cut(near)), (_NEAR, cut(near), x + 1)]


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

  cfg: Config
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

  def v(self) -> jax.Array:
    return self.refs["v"][...]

  def dout(self) -> jax.Array:
    return _rows(self.refs["dout"])

  def lse(self) -> jax.Array:
    return _load_column(self.refs["lse"])

  def delta(self) -> jax.Array:
    return _load_column(self.refs["delta"])

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
    s_TxP = s_TxP * self.cfg.logit_scale(q_TxE.shape[-1])
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


def _named(cfg: Config, refs, extra: tuple[str, ...], outputs: tuple[str, ...]) -> dict:
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


def _each_visible_kind(cfg: Config, a, c, step) -> None:
  for kind, condition in cfg.pair_kinds(a, c):
    pl.when(condition)(functools.partial(step, kind))


def forward_kernel(cfg: Config, *refs):
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
    stats = online_softmax((m_sc[...], l_sc[...], acc_sc[...]), s_TxP, blk.v())
    m_sc[...], l_sc[...], acc_sc[...] = stats

  _each_visible_kind(cfg, a, c, step)

  @pl.when(c == a)  # the last visible key block
  def _finish():
    _store_rows(named["out"], acc_sc[...] / l_sc[...])
    _store_column(named["lse"], m_sc[...] + jnp.log(l_sc[...]))


def online_softmax(stats, s_TxP: jax.Array, v_PxE: jax.Array):
  """``(m, l, acc)`` (running max ``[T, 1]``, sum ``[T, 1]``, output ``[T, E]``, float32) after
  one more block of scores ``s`` and values ``v``."""
  m_prev, l_prev, acc_prev = stats
  m_new = jnp.maximum(m_prev, s_TxP.max(axis=-1, keepdims=True))
  correction = jnp.exp(m_prev - m_new)
  p_TxP = jnp.exp(s_TxP - m_new)
  l_new = l_prev * correction + p_TxP.sum(axis=-1, keepdims=True)
  return m_new, l_new, acc_prev * correction + _dot(p_TxP.astype(v_PxE.dtype), v_PxE, _NN)


def probs_and_ds(blk: _Block, kind, sets, bias_TxP):
  """``(p, ds, ds per logit set)`` of a block pair: ``p = exp(s − lse)``,
  ``ds = p (dout v^T − D)``, and ``ds / sqrt(E)`` in q's dtype split per set
  (:meth:`_Block.split`)."""
  q_TxE = sets[min(sets)][0]
  s_TxP = blk.scores(kind, sets, bias_TxP)
  p_TxP = jnp.exp(s_TxP - blk.lse())
  dp_TxP = _dot(blk.dout(), blk.v(), _NT)
  ds_TxP = p_TxP * (dp_TxP - blk.delta())
  ds_scaled = (ds_TxP * blk.cfg.logit_scale(q_TxE.shape[-1])).astype(q_TxE.dtype)
  return p_TxP, ds_TxP, blk.split(kind, ds_scaled)


_BACKWARD_INPUTS = ("dout", "lse", "delta")


def dq_kernel(cfg: Config, *refs):
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
    _, ds_TxP, ds_sets = probs_and_ds(blk, kind, sets, bias)
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


def dkv_kernel(cfg: Config, *refs):
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
    p_TxP, _, ds_sets = probs_and_ds(blk, kind, sets, bias)
    dout_TxE = blk.dout()
    dv_sc[...] += _dot(p_TxP.astype(dout_TxE.dtype), dout_TxE, _TN)
    for i, ds_set in ds_sets.items():
      dk_scs[i][...] += _dot(ds_set, sets[i][0], _TN)

  _each_visible_kind(cfg, a, c, step)

  @pl.when(a == cfg.blocks - 1)
  def _finish():
    for name, sc in zip(("dk", "dk_far")[: 1 + cfg.far], dk_scs, strict=True):
      named[name][...] = sc[...].astype(named[name].dtype)
    named["dv"][...] = dv_sc[...].astype(named["dv"].dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def attention(cfg: Config, kernels, q, k, v, q_pos, k_pos, params, far):
  """Attention through one lowering's ``kernels = (forward, backward)`` (``pallas_attention``:
  Mosaic, ``pallas_gpu``: Triton): ``forward(cfg, *args) -> (out, lse)`` and
  ``backward(cfg, (*args, out, lse), dout)`` -> the gradients of ``args``."""
  return kernels[0](cfg, q, k, v, q_pos, k_pos, params, far)[0]


def _attention_fwd(cfg, kernels, *args):
  out, lse = kernels[0](cfg, *args)
  return out, (*args, out, lse)


def _attention_bwd(cfg, kernels, residuals, dout):
  return kernels[1](cfg, residuals, dout)


attention.defvjp(_attention_fwd, _attention_bwd)


def gradients(dq_out, dkv_out, far) -> tuple:
  """The custom VJP's gradients of ``(q, k, v, q_pos, k_pos, params, far)`` from the dq
  kernel's outputs (dq, dq_far with a far set, then each parameter's partial sums
  ``[B, heads, n, ...]``) and the dk/dv kernel's (dk, dv, dk_far with a far set)."""
  sets = 1 + bool(far)
  (dq, *dq_far), dparams = dq_out[:sets], dq_out[sets:]
  dk, dv, *dk_far = dkv_out
  far_grads = (dq_far[0], dk_far[0]) if far else ()
  return dq, dk, dv, None, None, tuple(x.sum(axis=(0, 1, 2)) for x in dparams), far_grads
