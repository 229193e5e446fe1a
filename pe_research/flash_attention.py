"""Flash-style causal attention with a custom VJP: ``O(L * P)`` memory, masked blocks skipped.

L is cut into ``n`` blocks of ``P`` positions. Query block ``a`` visits key blocks ``c <= a``
only (``n (n + 1) / 2`` of the ``n^2`` pairs), in the forward and in the backward pass, with
running max ``m``, normaliser ``l`` and accumulator ``o`` per query row::

  s = q_a . k_c / sqrt(E) + bias(p_a, p_c)   (masked where j > i, only on the diagonal c = a)
  m' = max(m, max_j s);  l' = l e^(m - m') + sum_j e^(s - m');  o' = o e^(m - m') + e^(s - m') v_c
  out_a = o / l,  lse_a = m + log l

The backward pass (FlashAttention-2) recomputes each visible block from ``lse`` instead of
storing probabilities. The bias is evaluated per block pair, never as an ``[H, L, L]`` table,
and is closure-converted so the parameters it reads (T5's table, KERPLE's r, FIRE's MLP) are
explicit inputs: their gradients are pulled back block by block with ``jax.vjp``.

Grouped-query attention (k, v with ``G`` heads, query head ``h = g Y + y``, ``Y = H / G``) is
packed as in FlashAttention-3: q ``[B, H, L, E]`` is viewed as ``[B, G, M, E]`` with ``M = L Y``
rows ordered position-major (row ``l Y + y``), so a query block of ``T = P Y`` rows (P positions
times Y heads) meets key blocks of P positions of the G KV heads and K/V are never repeated;
``dk``, ``dv`` sum over the Y heads in their matmuls. ``G = H`` is ``Y = 1``, ``M = L``.

A far logit set (Self-Extend, ReRoPE; ``window`` W and q_far, k_far) replaces ``q_i . k_j`` by
``q_far_i . k_far_j`` where ``i − j >= W``. A block pair ``(a, c)`` holds distances
``(a − c) P ± (P − 1)``, so its kind depends on ``δ = a − c`` only: near (every pair < W,
``δ < ⌈(W − P + 1) / P⌉``), far (every visible pair >= W, ``δ >= ⌈(W + P − 1) / P⌉``) or mixed
(at most 2 values of δ). Each block loop is cut into the three ranges of δ, each with its own
body: near and far blocks cost what a block costs without a far set, mixed ones compute both
score matmuls and select (and split ``ds`` between the sets in the backward pass). The ranges
are static in the unrolled path and traced loop bounds in the ``lax`` path, so neither pays a
``cond`` or a discarded matmul. ``dq_far`` is a second ``[B, G, M, E]`` float32 accumulator.

Which loops run (Python loops unrolled or ``lax`` loops: :func:`~pe_research.backend.block_loops`)
and the form of the ``dk``, ``dv`` sums (:func:`~pe_research.backend.key_grads`) are the backend
policy's; they change the program, not the values.

Chunks (context parallelism, ``context_parallel.py``): :func:`flash_forward` and
:func:`flash_backward` also take a query chunk over a key chunk of another part of the sequence,
the queries ``shift`` blocks after the keys (possibly a traced value, e.g. from the shard's
``axis_index``): the mask and the window rule then read ``δ = a + shift − c``, the block loops
stop at the causal edge (a fully masked chunk pair runs no block), and the forward returns the
log-sum-exp that merges partial softmaxes; the backward takes the merged ``out`` and ``lse``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pe_research import backend

# Finite, so exp(mask - running_max) is 0 instead of NaN when a whole row is masked.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _block(x: jax.Array, i, size: int, axis: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def pack_heads(x_BxHxLxX: jax.Array, groups: int) -> jax.Array:
  """``[B, H, L, X] -> [B, G, L Y, X]``: head ``g Y + y`` at position ``l`` becomes row
  ``l Y + y`` of group ``g`` (a reshape when ``Y = 1``)."""
  b, h, length, x = x_BxHxLxX.shape
  x_BxGxYxLxX = x_BxHxLxX.reshape(b, groups, h // groups, length, x)
  return x_BxGxYxLxX.swapaxes(2, 3).reshape(b, groups, length * (h // groups), x)


def _unpack_heads(x_BxGxMxX: jax.Array, heads: int) -> jax.Array:
  """``[B, G, L Y, X] -> [B, H, L, X]``, the inverse of :func:`pack_heads`."""
  b, g, m, x = x_BxGxMxX.shape
  r = heads // g
  return x_BxGxMxX.reshape(b, g, m // r, r, x).swapaxes(2, 3).reshape(b, heads, m // r, x)


def _grouped_bias(bias_fn, groups: int, q_pos_BxP, k_pos_BxP, *consts) -> jax.Array:
  """``bias_fn``'s block ``[B, H, P, P]`` packed to ``[B, G, T, P]`` (:func:`pack_heads`)."""
  return pack_heads(bias_fn(q_pos_BxP, k_pos_BxP, *consts), groups)


# Kinds of block pairs with a far logit set; near and far also index the sets (q, q_far).
_NEAR, _FAR, _MIXED = 0, 1, 2
_SETS = {_NEAR: (0,), _FAR: (1,), _MIXED: (0, 1)}


def _clamp(x, lo, hi, static: bool):
  return min(max(x, lo), hi) if static else jnp.clip(x, lo, hi)


def _pair_ranges(x, n: int, block: int, window, static: bool, *, query_major: bool, shift=0):
  """``[(kind, lo, hi, masked)]``: the other block index's ranges per kind (module docstring)
  for query block ``a`` over key blocks ``c <= a + shift``, ``c < n`` (``query_major``, ``x = a +
  shift``: the query block in key-block units), or key block ``x = c`` over query blocks ``a >= c
  − shift``, ``a < n``. ``masked``: whether the range's blocks need the causal mask; None when
  static (the body compares the block indices). Without a far set the ``lax`` path gives the
  diagonal block a range of its own, so the blocks below it skip the mask's pass over the
  scores (docs/cpu_performance.md, "Forward attention at batch 1")."""
  diagonal = x if query_major else x - shift  # the other block index at δ = 0
  lo, hi = (0, _clamp(x + 1, 0, n, static)) if query_major else (_clamp(diagonal, 0, n, static), n)
  if window is None:
    if static:
      return [(_NEAR, lo, hi, None)]
    cut = _clamp(diagonal + (0 if query_major else 1), lo, hi, static)
    return [(_NEAR, lo, cut, not query_major), (_NEAR, cut, hi, query_major)]  # diagonal masked
  masked = None if static else True
  near_deltas = max(0, -(-(window - block + 1) // block))  # δ below it: every pair near
  far_delta = (window + 2 * block - 2) // block  # δ from it on: every visible pair far (>= 1)
  if query_major:  # c = a + shift − δ
    cuts = [_clamp(diagonal - d + 1, lo, hi, static) for d in (far_delta, near_deltas)]
    kinds = [(_FAR, lo, cuts[0]), (_MIXED, cuts[0], cuts[1]), (_NEAR, cuts[1], hi)]
  else:  # a = c − shift + δ
    cuts = [_clamp(diagonal + d, lo, hi, static) for d in (near_deltas, far_delta)]
    kinds = [(_NEAR, lo, cuts[0]), (_MIXED, cuts[0], cuts[1]), (_FAR, cuts[1], hi)]
  return [(*r, masked) for r in kinds]


def _indices(a, c, rows: int, block: int) -> tuple[jax.Array, jax.Array]:
  """Sequence indices of query block ``a``'s rows (row ``i`` is ``a P + i // Y``), ``[T]``, and
  of key block ``c``'s keys, ``[P]``."""
  # lax.div (truncating; rows >= 0) is dropped by XLA when Y = 1; jnp's // keeps a sign fix-up.
  query_T = a * block + jax.lax.div(jnp.arange(rows), rows // block)
  return query_T, c * block + jnp.arange(block)


def _near_mask(a, c, rows: int, block: int, window: int) -> jax.Array:
  """``[T, P]``: ``i − j < W``, the pairs of block ``(a, c)`` in the near logit set."""
  query_T, key_P = _indices(a, c, rows, block)
  return query_T[:, None] - key_P < window


def _qk(q_BxGxTxE: jax.Array, k_BxGxPxE: jax.Array) -> jax.Array:
  """``q . k`` of a :func:`_scaled` q, float32 ``[B, G, T, P]``."""
  return jnp.einsum("bgqd,bgkd->bgqk", q_BxGxTxE, k_BxGxPxE, preferred_element_type=jnp.float32)


def _scaled(q_BxGxMxE: jax.Array) -> jax.Array:
  """``q / sqrt(E)`` in q's dtype: the whole q, once per pass (forward, backward), so no pass
  over the scores scales them. Computed in float32 and rounded to q's dtype: exact where the
  scale is a power of 2 (E a power of 4, e.g. 64), else one rounding of q in its dtype."""
  return (q_BxGxMxE.astype(jnp.float32) * float(q_BxGxMxE.shape[-1]) ** -0.5).astype(
    q_BxGxMxE.dtype
  )


def _block_scores(pairs, bias_BxGxTxP, a, c, masked: bool, window: int | None) -> jax.Array:
  """Float32 scores of query block ``a`` against key block ``c``, masked where the key's
  position is after the query row's. ``pairs``: ``[(q_a, k_c)]`` of the near or the far set,
  or of both (near first) on a mixed block, merged by :func:`_near_mask`."""
  (q_BxGxTxE, k_BxGxPxE), *far = pairs
  rows, block = q_BxGxTxE.shape[2], k_BxGxPxE.shape[2]
  s_BxGxTxP = _qk(q_BxGxTxE, k_BxGxPxE)
  if far:
    near_TxP = _near_mask(a, c, rows, block, window)
    s_BxGxTxP = jnp.where(near_TxP, s_BxGxTxP, _qk(*far[0]))
  if bias_BxGxTxP is not None:
    s_BxGxTxP = s_BxGxTxP + bias_BxGxTxP
  if not masked:
    return s_BxGxTxP
  query_T, key_P = _indices(a, c, rows, block)
  return jnp.where(query_T[:, None] >= key_P, s_BxGxTxP, MASK_VALUE)


def flash_forward(
  bias_fn,
  block,
  window,
  q_BxGxMxE,
  k_BxGxKxE,
  v_BxGxKxE,
  q_pos_BxQ,
  k_pos_BxK,
  consts,
  far,
  shift,
  *,
  unroll: bool,
):
  """Online softmax per query block ``a`` over key blocks ``0..a + s``: ``(out_BxGxMxE,
  lse_BxGxM)``. ``far``: ``()`` or ``(q_far_BxGxMxE, k_far_BxGxKxE)``, used where ``i − j >=
  window``. ``shift``: ``()`` (q and k are one sequence: ``s = 0``) or ``(s,)``, an int32
  scalar (may be traced): the queries start ``s`` blocks after the keys, so ``i − j`` in the
  mask and the window rule is ``(a + s − c) P`` plus the offsets within the blocks. A query
  row that sees no key gets out 0 and lse ``MASK_VALUE`` (a key chunk after a query chunk)."""
  b, g, _, d = k_BxGxKxE.shape
  nq, nk = q_pos_BxQ.shape[1] // block, k_pos_BxK.shape[1] // block
  rows = q_BxGxMxE.shape[2] // nq
  s = shift[0] if shift else 0
  loops = backend.block_loops(nq, may_unroll=unroll and not shift)
  q_sets, k_sets = tuple(_scaled(x) for x in (q_BxGxMxE, *far[:1])), (k_BxGxKxE, *far[1:])

  def query_block(a, carry):
    q_blocks = tuple(_block(x, a, rows, 2) for x in q_sets)
    q_pos_BxP = _block(q_pos_BxQ, a, block, 1)

    def key_block(kind, masked, c, state):
      m_BxGxT, l_BxGxT, o_BxGxTxE = state
      k_pos_BxP = _block(k_pos_BxK, c, block, 1)
      bias = None if bias_fn is None else _grouped_bias(bias_fn, g, q_pos_BxP, k_pos_BxP, *consts)
      pairs = [(q_blocks[i], _block(k_sets[i], c, block, 2)) for i in _SETS[kind]]
      masked = a + s == c if masked is None else masked
      s_BxGxTxP = _block_scores(pairs, bias, a + s, c, masked, window)
      m_new = jnp.maximum(m_BxGxT, s_BxGxTxP.max(axis=-1))
      correction_BxGxT = jnp.exp(m_BxGxT - m_new)
      p_BxGxTxP = jnp.exp(s_BxGxTxP - m_new[..., None])
      l_new = l_BxGxT * correction_BxGxT + p_BxGxTxP.sum(axis=-1)
      pv_BxGxTxE = jnp.einsum(
        "bgqk,bgkd->bgqd",
        p_BxGxTxP.astype(v_BxGxKxE.dtype),
        _block(v_BxGxKxE, c, block, 2),
        preferred_element_type=jnp.float32,
      )
      return m_new, l_new, o_BxGxTxE * correction_BxGxT[..., None] + pv_BxGxTxE

    init = (
      jnp.full((b, g, rows), MASK_VALUE, jnp.float32),
      jnp.zeros((b, g, rows), jnp.float32),
      jnp.zeros((b, g, rows, d), jnp.float32),
    )
    state = init
    ranges = _pair_ranges(a + s, nk, block, window, loops.static, query_major=True)
    for kind, lo, hi, masked in ranges:
      state = loops.fori(lo, hi, functools.partial(key_block, kind, masked), state)
    m_BxGxT, l_BxGxT, o_BxGxTxE = state
    if shift:  # A query block before every key of the chunk sees none (l = 0): out 0.
      l_BxGxT = jnp.maximum(l_BxGxT, np.finfo(np.float32).tiny)
    out_BxGxTxE = (o_BxGxTxE / l_BxGxT[..., None]).astype(q_BxGxMxE.dtype)
    return (out_BxGxTxE, m_BxGxT + jnp.log(l_BxGxT)), carry

  (out_JxBxGxTxE, lse_JxBxGxT), _ = loops.map(nq, query_block, ())
  out_BxGxMxE = jnp.moveaxis(out_JxBxGxTxE, 0, 2).reshape(b, g, nq * rows, d)
  return out_BxGxMxE, jnp.moveaxis(lse_JxBxGxT, 0, 2).reshape(b, g, nq * rows)


def flash_backward(bias_fn, block, window, residuals, dout_BxGxMxE):
  """FlashAttention-2 backward: per key block ``c``, query blocks ``a >= c − s``. ``residuals``:
  :func:`flash_forward`'s arguments, then ``out`` and ``lse`` of the whole softmax (those of a
  query chunk over every key chunk when the keys come in chunks: ring attention).

  With ``p = exp(s - lse)``, ``D_i = sum_d dout_i out_i``:  ``dv_c += p^T dout_a``,
  ``ds = p (dout_a v_c^T - D_a)``, ``dq_a += ds k_c / sqrt(E)``, ``dk_c += ds^T q_a / sqrt(E)``
  (``p^T``, ``ds^T`` contract the T rows: positions and the Y heads of a group), and ``ds`` is
  the cotangent of the bias block, pulled back to the bias parameters. With a far set, ``ds``
  of the far pairs goes to ``dq_far``, ``dk_far`` instead. ``dk_c``, ``dv_c`` are summed in the
  backend's form (``keys``: :func:`~pe_research.backend.key_grads`).
  """
  q_BxGxMxE, k_BxGxKxE, v_BxGxKxE, q_pos_BxQ, k_pos_BxK, consts, far, shift = residuals[:8]
  out_BxGxMxE, lse_BxGxM = residuals[8:]
  q_sets, k_sets = (q_BxGxMxE, *far[:1]), (k_BxGxKxE, *far[1:])
  q_scaled_sets = tuple(_scaled(x) for x in q_sets)  # once, as in the forward pass
  b, g, length, d = k_BxGxKxE.shape
  nq, nk = q_pos_BxQ.shape[1] // block, length // block
  rows = q_BxGxMxE.shape[2] // nq
  s = shift[0] if shift else 0
  loops = backend.block_loops(nk, may_unroll=not shift)
  scale = float(d) ** -0.5
  delta_BxGxM = jnp.sum(dout_BxGxMxE.astype(jnp.float32) * out_BxGxMxE.astype(jnp.float32), -1)
  dout_BxGxMxE = dout_BxGxMxE.astype(v_BxGxKxE.dtype)

  keys = backend.key_grads(q_BxGxMxE.dtype, rows)
  q_key_operands = tuple(keys.operand(x) for x in q_sets)
  dout_key_operand = keys.operand(dout_BxGxMxE)

  def key_block(c, carry):
    k_blocks = tuple(_block(x, c, block, 2) for x in k_sets)
    v_BxGxPxE = _block(v_BxGxKxE, c, block, 2)
    k_pos_BxP = _block(k_pos_BxK, c, block, 1)

    def query_block(kind, masked, a, state):
      dks, dv_BxGxPxE, dqs, dconsts = state  # dk per set, dv: in the form of keys
      dks, dqs = list(dks), list(dqs)
      q_blocks = {i: _block(q_scaled_sets[i], a, rows, 2) for i in _SETS[kind]}
      dout_BxGxTxE = _block(dout_BxGxMxE, a, rows, 2)
      bias, bias_vjp = None, None
      if bias_fn is not None:
        q_pos_BxP = _block(q_pos_BxQ, a, block, 1)
        block_bias = lambda *cs: _grouped_bias(bias_fn, g, q_pos_BxP, k_pos_BxP, *cs)
        bias, bias_vjp = jax.vjp(block_bias, *consts)
      pairs = [(q_blocks[i], k_blocks[i]) for i in _SETS[kind]]
      masked = a + s == c if masked is None else masked
      s_BxGxTxP = _block_scores(pairs, bias, a + s, c, masked, window)
      p_BxGxTxP = jnp.exp(s_BxGxTxP - _block(lse_BxGxM, a, rows, 2)[..., None])
      p_cast = p_BxGxTxP.astype(v_BxGxKxE.dtype)
      dv_BxGxPxE = dv_BxGxPxE + keys.product(p_cast, dout_key_operand, a)
      dp_BxGxTxP = jnp.einsum(
        "bgqd,bgkd->bgqk", dout_BxGxTxE, v_BxGxPxE, preferred_element_type=jnp.float32
      )
      ds_BxGxTxP = p_BxGxTxP * (dp_BxGxTxP - _block(delta_BxGxM, a, rows, 2)[..., None])
      ds_scaled = (ds_BxGxTxP * scale).astype(q_BxGxMxE.dtype)
      ds_sets = {kind: ds_scaled}
      if kind == _MIXED:
        near_TxP, zero = _near_mask(a + s, c, rows, block, window), jnp.zeros((), ds_scaled.dtype)
        ds_sets = {
          _NEAR: jnp.where(near_TxP, ds_scaled, zero),
          _FAR: jnp.where(near_TxP, zero, ds_scaled),
        }
      for i, ds_set in ds_sets.items():
        dq_BxGxTxE = _block(dqs[i], a, rows, 2) + jnp.einsum(
          "bgqk,bgkd->bgqd", ds_set, k_blocks[i], preferred_element_type=jnp.float32
        )
        dqs[i] = jax.lax.dynamic_update_slice_in_dim(dqs[i], dq_BxGxTxE, a * rows, 2)
        dks[i] = dks[i] + keys.product(ds_set, q_key_operands[i], a)
      if bias_vjp is not None:
        if bias.shape[0] == 1:  # One bias row broadcast over the batch: sum its cotangent.
          ds_BxGxTxP = backend.sum_leading(ds_BxGxTxP)
        dconsts = jax.tree.map(jnp.add, dconsts, bias_vjp(ds_BxGxTxP))
      return tuple(dks), dv_BxGxPxE, tuple(dqs), dconsts

    zeros = keys.zeros((b, g, block, d))
    state = ((zeros,) * len(k_sets), zeros, *carry)
    ranges = _pair_ranges(c, nq, block, window, loops.static, query_major=False, shift=s)
    for kind, lo, hi, masked in ranges:
      state = loops.fori(lo, hi, functools.partial(query_block, kind, masked), state)
    dks, dv, dqs, dconsts = state
    return (dks, dv), (dqs, dconsts)

  init = (
    tuple(jnp.zeros(x.shape, jnp.float32) for x in q_sets),
    tuple(jnp.zeros_like(x) for x in consts),
  )
  (dks, dv), (dqs_BxGxMxE, dconsts) = loops.map(nk, key_block, init)
  dks_JxBxGxPxE, dv_JxBxGxPxE = tuple(keys.result(x) for x in dks), keys.result(dv)
  to_full = lambda x_JxBxGxPxE: jnp.moveaxis(x_JxBxGxPxE, 0, 2).reshape(b, g, length, d)
  grads = (dqs_BxGxMxE[0], to_full(dks_JxBxGxPxE[0]), to_full(dv_JxBxGxPxE))
  grads = tuple(grad.astype(x.dtype) for grad, x in zip(grads, residuals[:3], strict=True))
  far_grads = ()
  if far:
    far_grads = (
      dqs_BxGxMxE[1].astype(far[0].dtype),
      to_full(dks_JxBxGxPxE[1]).astype(far[1].dtype),
    )
  return (*grads, None, None, dconsts, far_grads, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def flash(
  bias_fn, block, window, q_BxGxMxE, k_BxGxKxE, v_BxGxKxE, q_pos_BxQ, k_pos_BxK, consts, far, shift
):
  """Attention of packed q over k, v (:func:`flash_forward`'s arguments) with the custom VJP."""
  args = (q_BxGxMxE, k_BxGxKxE, v_BxGxKxE, q_pos_BxQ, k_pos_BxK, consts, far, shift)
  return flash_forward(bias_fn, block, window, *args, unroll=False)[0]


def _flash_fwd(bias_fn, block, window, *args):
  out_BxGxMxE, lse_BxGxM = flash_forward(bias_fn, block, window, *args, unroll=True)
  return out_BxGxMxE, (*args, out_BxGxMxE, lse_BxGxM)


flash.defvjp(_flash_fwd, flash_backward)


def convert_bias(bias_fn, example_pos_BxP: jax.Array):
  """``(converted, consts)``: ``bias_fn`` closure-converted for position blocks shaped as
  ``example_pos_BxP``, ``converted(q_pos, k_pos, *consts)``, its parameters ``consts`` explicit
  inputs (gradients per block pair); ``(None, ())`` without a bias. ``bias_fn`` is wrapped in a
  fresh lambda before ``jax.closure_convert``, whose cache is keyed on the function: a bound
  method seen before would get the parameters of its earlier trace."""
  if bias_fn is None:
    return None, ()
  example = example_pos_BxP
  converted, consts = jax.closure_convert(lambda qp, kp: bias_fn(qp, kp), example, example)
  return converted, tuple(consts)


def blockwise_attention(
  q_BxLxHxE,
  k_BxLxGxE,
  v_BxLxGxE,
  q_pos_BxL,
  k_pos_BxL,
  bias_fn,
  block_size,
  far=None,
  window: int | None = None,
):
  """Causal attention of q ``[B, L, H, E]`` over k, v ``[B, L, G, E]`` -> ``[B, L, H, E]`` by
  blocks, q packed to ``[B, G, L Y, E]`` (module docstring); ``far``: None or
  ``(q_far_BxLxHxE, k_far_BxLxGxE)``, the logit set of pairs with ``i − j >= window``.

  L is padded to ``n * P`` (``P = min(block_size, L)``); padded keys sit after every real
  query so the causal mask hides them, padded query rows are dropped. Positions are padded by
  repeating the last one, so ``bias_fn`` only sees ordinary positions.
  """
  b, length, h, d = q_BxLxHxE.shape
  g = k_BxLxGxE.shape[2]
  if block_size < 1:
    raise ValueError(f"model.attention_block={block_size} must be a positive integer")
  block = min(block_size, length)
  padded = -(-length // block) * block
  pad_x = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  q_pos_BxL = jnp.pad(q_pos_BxL, ((0, 0), (0, padded - length)), mode="edge")
  k_pos_BxL = jnp.pad(k_pos_BxL, ((0, 0), (0, padded - length)), mode="edge")
  heads_first = lambda x_BxLxHxE: jnp.moveaxis(jnp.pad(x_BxLxHxE, pad_x), 2, 1)
  converted, consts = convert_bias(bias_fn, q_pos_BxL[:, :block])
  far_packed = ()
  if far is not None:
    far_packed = (pack_heads(heads_first(far[0]), g), heads_first(far[1]))
  out_BxGxMxE = flash(
    converted,
    block,
    window,
    pack_heads(heads_first(q_BxLxHxE), g),
    heads_first(k_BxLxGxE),
    heads_first(v_BxLxGxE),
    q_pos_BxL,
    k_pos_BxL,
    consts,
    far_packed,
    (),
  )
  return jnp.moveaxis(_unpack_heads(out_BxGxMxE, h), 1, 2)[:, :length]
