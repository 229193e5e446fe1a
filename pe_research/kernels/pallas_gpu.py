"""Causal flash attention as a Pallas GPU kernel (Triton lowering), ``interpret`` mode anywhere.

The same attention as ``pallas_attention.py``'s TPU kernel, with its block math
(``pallas_blocks.py``: scores, the far set's near/far/mixed pairs, the online softmax, the
FlashAttention-2 backward, the encoding's ``KernelBias`` and its parameters' vjp); what differs
is how a program walks the blocks, since a Triton program has no scratch memory and no grid
axis that carries state:

  * forward and dq: one program per ``(b, h, a)`` (batch row, query head, query block) loops
    over the visible key blocks ``c <= a`` of each kind (``Config.kind_ranges``: near, mixed,
    far), the running max, sum and output (or dq) as loop carries;
  * dk/dv: one program per ``(b, g, c)`` (KV head, key block) loops over the ``Y = H / G``
    query heads of the group and the query blocks ``a >= c``, so dk and dv sum over the group
    in the program (no atomics, no repeated K/V: each program reads the group's K/V blocks);
  * a parameter's gradient is summed per ``(b, h, a)`` program and reduced outside.

Triton holds arrays with power-of-two sides only, and its matmul needs sides >= 16. So ``P`` is
a power of two from 16 to ``MAX_BLOCK`` (``pallas_attention``), and :func:`attention` pads the
head dimension to a power of two >= 16 with zeros (``q . k`` and v's real columns unchanged,
the logit scale ``1 / sqrt(E)`` of the real E) and each bias parameter to power-of-two sides
with zeros (``KernelBias``: the bias is unchanged); the gradients of the padding are dropped.
``q_pos`` is a column ``[R, L, 1]`` and ``k_pos`` a row ``[R, 1, L]`` (R = 1: one row of
positions for the whole batch); ``lse`` and ``D`` are columns ``[B, H, L, 1]``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pe_research.flash_attention import MASK_VALUE
from pe_research.kernels import pallas_blocks as blocks

MIN_SIDE = 16  # Triton's smallest matmul side
# Largest block: a program holds [P, P] float32 scores (and p, dp, ds in the backward) in
# registers; 64 is the key block of JAX's reference Triton attention. Untuned (no GPU yet).
MAX_BLOCK = 64


def power_of_two_at_least(x: int, least: int = 1) -> int:
  return max(least, 1 << max(0, x - 1).bit_length())


@dataclasses.dataclass
class _Block(blocks._Block):
  """Block pair ``(a, c)`` of query head ``g`` (not a KV head, as on TPU): one side's refs hold
  the block, the other side's the whole sequence, sliced here: keys in the query-major kernels,
  queries (of head ``y`` of the group) in the key-major one."""

  y: jax.Array | int = 0
  key_major: bool = False

  def _tile(self, x_Px1: jax.Array) -> jax.Array:
    return x_Px1  # One head per program: T = P.

  def _query_side(self, name: str) -> jax.Array:
    ref = self.refs[name]
    if not self.key_major:
      return ref[...]
    p = self.cfg.block
    return ref[self.y, pl.ds(self.a * p, p), :]

  def _key_side(self, name: str) -> jax.Array:
    ref = self.refs[name]
    return ref[...] if self.key_major else ref[pl.ds(self.c * self.cfg.block, self.cfg.block), :]

  def bias_inputs(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    p = self.cfg.block
    q_pos, k_pos = self.refs["q_pos"], self.refs["k_pos"]
    q_pos_Px1 = q_pos[pl.ds(self.a * p, p), :] if self.key_major else q_pos[...]
    k_pos_1xP = k_pos[...] if self.key_major else k_pos[:, pl.ds(self.c * p, p)]
    return q_pos_Px1, k_pos_1xP, jnp.full((p, 1), self.g, jnp.int32)

  def sets(self, kind) -> dict[int, tuple[jax.Array, jax.Array]]:
    names = (("q", "k"), ("q_far", "k_far"))
    return {
      i: (self._query_side(names[i][0]), self._key_side(names[i][1])) for i in blocks._SETS[kind]
    }

  def v(self) -> jax.Array:
    return self._key_side("v")

  def dout(self) -> jax.Array:
    return self._query_side("dout")

  def lse(self) -> jax.Array:
    return self._query_side("lse")

  def delta(self) -> jax.Array:
    return self._query_side("delta")


def _loop(cfg: blocks.Config, x, key_major: bool, body, carry):
  """``body(kind, partner, carry)`` over the visible partner blocks of block ``x``, by kind."""
  for kind, lo, hi in cfg.kind_ranges(x, key_major):
    carry = jax.lax.fori_loop(lo, hi, functools.partial(body, kind), carry)
  return carry


def _bias(cfg: blocks.Config, blk: _Block):
  return None if cfg.bias_fn is None else cfg.bias_fn(*blk.bias_inputs(), *blk.params())


def _zeros(shape) -> jax.Array:
  return jnp.zeros(shape, jnp.float32)


def forward_kernel(cfg: blocks.Config, *refs):
  named = blocks._named(cfg, refs, (), ("out", "lse"))
  h, a = pl.program_id(1), pl.program_id(2)

  def step(kind, c, stats):
    blk = _Block(cfg, a, c, h, named)
    return blocks.online_softmax(stats, blk.scores(kind, blk.sets(kind), _bias(cfg, blk)), blk.v())

  p, e = cfg.block, named["v"].shape[-1]
  init = (jnp.full((p, 1), MASK_VALUE, jnp.float32), _zeros((p, 1)), _zeros((p, e)))
  m_Px1, l_Px1, acc_PxE = _loop(cfg, a, False, step, init)
  named["out"][...] = (acc_PxE / l_Px1).astype(named["out"].dtype)
  named["lse"][...] = m_Px1 + jnp.log(l_Px1)


_BACKWARD_INPUTS = ("dout", "lse", "delta")


def dq_kernel(cfg: blocks.Config, *refs):
  dq_names = ("dq", "dq_far")[: 1 + cfg.far]
  param_names = tuple(f"dparam{i}" for i in range(cfg.n_params))
  named = blocks._named(cfg, refs, _BACKWARD_INPUTS, (*dq_names, *param_names))
  h, a = pl.program_id(1), pl.program_id(2)

  def step(kind, c, carry):
    dqs, dparams = carry
    blk = _Block(cfg, a, c, h, named)
    bias, bias_vjp = None, None
    if cfg.bias_fn is not None:
      inputs = blk.bias_inputs()
      bias, bias_vjp = jax.vjp(lambda *ps: cfg.bias_fn(*inputs, *ps), *blk.params())
    sets = blk.sets(kind)
    _, ds_PxP, ds_sets = blocks.probs_and_ds(blk, kind, sets, bias)
    dqs = tuple(
      dq + blocks._dot(ds_sets[i], sets[i][1], blocks._NN) if i in ds_sets else dq
      for i, dq in enumerate(dqs)
    )
    if cfg.n_params:
      dparams = tuple(d + cot for d, cot in zip(dparams, bias_vjp(ds_PxP), strict=True))
    return dqs, dparams

  e = named["q"].shape[-1]
  init = (
    tuple(_zeros((cfg.block, e)) for _ in dq_names),
    tuple(_zeros(r.shape) for r in named["params"]),
  )
  dqs, dparams = _loop(cfg, a, False, step, init)
  for name, x in zip((*dq_names, *param_names), (*dqs, *dparams), strict=True):
    named[name][...] = x.astype(named[name].dtype)


def dkv_kernel(cfg: blocks.Config, *refs):
  dk_names = ("dk", "dk_far")[: 1 + cfg.far]
  named = blocks._named(cfg, refs, _BACKWARD_INPUTS, ("dk", "dv", "dk_far")[: 2 + cfg.far])
  g, c = pl.program_id(1), pl.program_id(2)

  def step(y, kind, a, carry):
    dks, dv_PxE = carry
    blk = _Block(cfg, a, c, g * cfg.heads + y, named, y=y, key_major=True)
    sets = blk.sets(kind)
    p_PxP, _, ds_sets = blocks.probs_and_ds(blk, kind, sets, _bias(cfg, blk))
    dout_PxE = blk.dout()
    dv_PxE = dv_PxE + blocks._dot(p_PxP.astype(dout_PxE.dtype), dout_PxE, blocks._TN)
    dks = tuple(
      dk + blocks._dot(ds_sets[i], sets[i][0], blocks._TN) if i in ds_sets else dk
      for i, dk in enumerate(dks)
    )
    return dks, dv_PxE

  def head(y, carry):
    return _loop(cfg, c, True, functools.partial(step, y), carry)

  shape = (cfg.block, named["k"].shape[-1])
  dks, dv_PxE = jax.lax.fori_loop(
    0, cfg.heads, head, (tuple(_zeros(shape) for _ in dk_names), _zeros(shape))
  )
  for name, x in zip((*dk_names, "dv"), (*dks, dv_PxE), strict=True):
    named[name][...] = x.astype(named[name].dtype)


def _in_specs(cfg: blocks.Config, q, k, params, key_major: bool, backward: bool) -> list:
  """BlockSpecs of q, k, v, q_pos, k_pos, params, far (q_far, k_far), (dout, lse, delta) over
  the grid ``(b, h, a)`` (query-major) or ``(b, g, c)`` (key-major)."""
  y, p, length = cfg.heads, cfg.block, q.shape[2]
  row = lambda b: b if cfg.pos_rows > 1 else 0
  e_q, e_k = q.shape[-1], k.shape[-1]
  if key_major:
    q_spec = pl.BlockSpec((None, y, length, e_q), lambda b, g, c: (b, g, 0, 0))
    kv_spec = pl.BlockSpec((None, None, p, e_k), lambda b, g, c: (b, g, c, 0))
    stats_spec = pl.BlockSpec((None, y, length, 1), lambda b, g, c: (b, g, 0, 0))
    q_pos = pl.BlockSpec((None, length, 1), lambda b, g, c: (row(b), 0, 0))
    k_pos = pl.BlockSpec((None, 1, p), lambda b, g, c: (row(b), 0, c))
  else:
    q_spec = pl.BlockSpec((None, None, p, e_q), lambda b, h, a: (b, h, a, 0))
    kv_spec = pl.BlockSpec((None, None, length, e_k), lambda b, h, a: (b, h // y, 0, 0))
    stats_spec = _stats_spec(cfg)
    q_pos = pl.BlockSpec((None, p, 1), lambda b, h, a: (row(b), a, 0))
    k_pos = pl.BlockSpec((None, 1, length), lambda b, h, a: (row(b), 0, 0))
  specs = [q_spec, kv_spec, kv_spec, q_pos, k_pos]
  specs += [pl.BlockSpec(x.shape, lambda *_: (0, 0)) for x in params]
  specs += [q_spec, kv_spec] if cfg.far else []
  return specs + ([q_spec, stats_spec, stats_spec] if backward else [])


def _call(cfg: blocks.Config, kernel, grid, in_specs, out_specs, out_shape):
  head_dim = in_specs[0].block_shape[-1]
  return pl.pallas_call(
    functools.partial(kernel, cfg),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    interpret=cfg.interpret,
    name=f"pe_{kernel.__name__}",
    # JAX's reference Triton attention's settings (ops/gpu/attention.py); untuned.
    compiler_params=pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2),
  )


def _forward(cfg: blocks.Config, q, k, v, q_pos, k_pos, params, far):
  b, h, length, _ = q.shape
  in_specs = _in_specs(cfg, q, k, params, key_major=False, backward=False)
  return _call(
    cfg,
    forward_kernel,
    (b, h, cfg.blocks),
    in_specs,
    (in_specs[0], _stats_spec(cfg)),
    (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, length, 1), jnp.float32)),
  )(q, k, v, q_pos, k_pos, *params, *far)


def _stats_spec(cfg: blocks.Config) -> pl.BlockSpec:
  return pl.BlockSpec((None, None, cfg.block, 1), lambda b, h, a: (b, h, a, 0))


def _backward(cfg: blocks.Config, residuals, dout):
  q, k, v, q_pos, k_pos, params, far, out, lse = residuals
  b, h, _, _ = q.shape
  g = k.shape[1]
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  inputs = (q, k, v, q_pos, k_pos, *params, *far, dout.astype(v.dtype), lse, delta)

  in_specs = _in_specs(cfg, q, k, params, key_major=False, backward=True)
  dqs = (q, *far[:1])
  dparam_specs = [
    pl.BlockSpec((None, None, None, *x.shape), lambda b, h, a: (b, h, a, 0, 0)) for x in params
  ]
  dq_out = _call(
    cfg,
    dq_kernel,
    (b, h, cfg.blocks),
    in_specs,
    (in_specs[0],) * len(dqs) + tuple(dparam_specs),
    tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in dqs)
    + tuple(jax.ShapeDtypeStruct((b, h, cfg.blocks, *x.shape), jnp.float32) for x in params),
  )(*inputs)

  in_specs = _in_specs(cfg, q, k, params, key_major=True, backward=True)
  dkv_out = _call(
    cfg,
    dkv_kernel,
    (b, g, cfg.blocks),
    in_specs,
    (in_specs[1],) * (2 + cfg.far),
    tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k, v, *far[1:])),
  )(*inputs)
  return blocks.gradients(dq_out, dkv_out, far)


TRITON = (_forward, _backward)  # kernels of blocks.attention


def _pad_to_powers_of_two(x: jax.Array) -> jax.Array:
  return jnp.pad(x, [(0, power_of_two_at_least(n) - n) for n in x.shape])


def attention(cfg: blocks.Config, q, k, v, q_pos, k_pos, params, far):
  """Causal attention of q ``[B, H, L, E]`` over k, v ``[B, G, L, E]`` (L a multiple of
  ``cfg.block``, a power of two), positions ``[R, L, 1]`` and ``[R, 1, L]``, the bias
  parameters and the far set as ``pallas_attention``'s kernel takes them; E and the parameters
  are padded here (module docstring)."""
  e = q.shape[-1]
  pad_e = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, power_of_two_at_least(e, MIN_SIDE) - e),))
  cfg = dataclasses.replace(cfg, scale=cfg.logit_scale(e))
  params = tuple(_pad_to_powers_of_two(x) for x in params)
  out = blocks.attention(
    cfg, TRITON, *map(pad_e, (q, k, v)), q_pos, k_pos, params, tuple(map(pad_e, far))
  )
  return out[..., :e]
