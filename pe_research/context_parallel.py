"""Context parallelism: causal attention with the sequence split over the mesh axis "context".

With ``c`` shards on "context", shard ``s`` holds ``L / c`` consecutive positions of q, k, v, of
their positions and (Self-Extend, ReRoPE) of q_far, k_far; the batch is split over whichever of
"data", "fsdp" exist. Attention runs under ``jax.shard_map`` as the flash kernel
(``flash_attention.py``) per pair of chunks, each told how many blocks its queries sit after its
keys, so the causal mask and the window rule ``i − j >= W`` read global sequence indices, and
``bias_fn`` gets the positions that travel with each chunk: every encoding works unchanged.

Zigzag load balancing: L is cut into ``2c`` chunks of ``C = L / (2c)`` positions and shard ``s``
computes for chunks ``s`` and ``2c − 1 − s``, so every shard has ``2c + 1`` chunk pairs of causal
work. Inputs and outputs stay in natural order (shard ``s`` holds chunks ``2s``, ``2s + 1``): two
``ppermute``s move chunks to the zigzag layout and two move the output back (correctness first;
permuting the tokens once at the model's input would save them).

Strategies (``model.context_parallel``):
  * ``all_gather``: k, v, k positions and k_far gathered along "context" (natural order, the
    whole sequence on every device); each query chunk attends to the keys before it, blocks
    above the diagonal skipped; the gather's transpose reduce-scatters dk, dv.
  * ``ring``: k, v, k positions and k_far (zigzag) pass round the ring with ``ppermute`` in
    ``c`` steps; each step's partial ``(out, lse)`` is merged by online softmax. A custom VJP runs
    a backward ring in which dk, dv travel with k, v (each pair's backward takes the merged
    ``out`` and ``lse``), so K/V memory stays at one shard's chunks.

The parameters ``bias_fn`` closes over (T5's table, FIRE's MLP) enter ``shard_map``
replicated; it is closure-converted inside the shard body and its per-shard parameter
gradients are summed by ``shard_map``'s transpose. The bodies run with ``check_vma=False``: with
JAX's varying-axes types the replicated parameters would need a cast inside every block pair's
bias (a psum per block in the backward pass).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pe_research.flash_attention import (
  MASK_VALUE,
  _unpack_heads,
  convert_bias,
  flash,
  flash_backward,
  flash_forward,
  pack_heads,
)
from pe_research.sharding import BATCH_AXES

AXIS = "context"
STRATEGIES = ("all_gather", "ring")


def context_size() -> int:
  """The size of the abstract mesh's "context" axis (1 without one)."""
  return dict(jax.sharding.get_abstract_mesh().shape).get(AXIS, 1)


def attention(
  q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, q_pos_BxL, k_pos_BxL, bias_fn, block_size, far, window, strategy
):
  """Causal attention (``attention.attend``'s arguments; ``far``: None or ``(q_far, k_far)``)
  with L split over the abstract mesh's "context" axis, by ``strategy``."""
  if strategy not in STRATEGIES:
    raise ValueError(
      f"model.context_parallel={strategy!r} is unknown; allowed: {', '.join(STRATEGIES)}"
    )
  mesh = jax.sharding.get_abstract_mesh()
  c = mesh.shape[AXIS]
  b, length = q_BxLxHxE.shape[:2]
  if length % (2 * c):
    raise ValueError(
      f"context parallelism: sequence length {length} must divide by 2 x mesh.context = {2 * c}"
    )
  chunk = length // (2 * c)
  block = max(p for p in range(1, min(block_size, chunk) + 1) if chunk % p == 0)
  batch = tuple(a for a in BATCH_AXES if dict(mesh.shape).get(a, 1) > 1)
  if b % math.prod(mesh.shape[a] for a in batch):
    batch = ()  # rows replicated over the batch axes
  x_spec = P(batch or None, AXIS)
  pos_spec = lambda pos_BxL: x_spec if pos_BxL.shape[0] == b else P(None, AXIS)
  far = tuple(far or ())
  body = _all_gather if strategy == "all_gather" else _ring
  attend_shard = jax.shard_map(
    functools.partial(body, bias_fn, block, window, c),
    mesh=mesh,
    in_specs=((x_spec,) * 3, (pos_spec(q_pos_BxL), pos_spec(k_pos_BxL)), (x_spec,) * len(far)),
    out_specs=x_spec,
    check_vma=False,
  )
  return attend_shard((q_BxLxHxE, k_BxLxGxE, v_BxLxGxE), (q_pos_BxL, k_pos_BxL), far)


def _zigzag_perms(c: int):
  """``ppermute`` pairs sending shard ``x``'s natural chunk ``2x`` (first) and ``2x + 1``
  (second) to the shard that computes for it: chunk ``j`` to ``j`` if ``j < c``, else to
  ``2c − 1 − j`` (each is a permutation: even chunks go to distinct shards, odd ones too)."""
  owner = lambda j: j if j < c else 2 * c - 1 - j
  return [(x, owner(2 * x)) for x in range(c)], [(x, owner(2 * x + 1)) for x in range(c)]


def _to_zigzag(x_BxLxX, c: int):
  """Shard ``s``'s natural chunks ``(2s, 2s + 1)`` -> its zigzag chunks ``(s, 2c − 1 − s)``.
  Of the two chunks that arrive, the even one is chunk ``s`` when ``s`` is even."""
  even_perm, odd_perm = _zigzag_perms(c)
  first, second = jnp.split(x_BxLxX, 2, axis=1)
  even = jax.lax.ppermute(first, AXIS, even_perm)
  odd = jax.lax.ppermute(second, AXIS, odd_perm)
  s_even = jax.lax.axis_index(AXIS) % 2 == 0
  return jnp.concatenate([jnp.where(s_even, even, odd), jnp.where(s_even, odd, even)], axis=1)


def _from_zigzag(x_BxLxX, c: int):
  """The inverse of :func:`_to_zigzag`."""
  even_perm, odd_perm = _zigzag_perms(c)
  chunk_s, chunk_mirror = jnp.split(x_BxLxX, 2, axis=1)
  s_even = jax.lax.axis_index(AXIS) % 2 == 0
  even = jnp.where(s_even, chunk_s, chunk_mirror)
  odd = jnp.where(s_even, chunk_mirror, chunk_s)
  back = lambda perm: [(dst, src) for src, dst in perm]
  first = jax.lax.ppermute(even, AXIS, back(even_perm))
  return jnp.concatenate([first, jax.lax.ppermute(odd, AXIS, back(odd_perm))], axis=1)


def _zigzag_chunks(c: int) -> tuple[jax.Array, jax.Array]:
  """The global chunk indices of this shard's zigzag chunks, ``(s, 2c − 1 − s)``."""
  s = jax.lax.axis_index(AXIS)
  return s, 2 * c - 1 - s


def _heads_first(x_BxLxHxE: jax.Array) -> jax.Array:
  return jnp.moveaxis(x_BxLxHxE, 2, 1)


def _all_gather(bias_fn, block, window, c, qkv, positions, far):
  """Shard body: the two zigzag query chunks (one ``lax.map`` step each, so the kernel is
  compiled once) over the gathered keys (module docstring)."""
  (q_BxLxHxE, k_BxLxGxE, v_BxLxGxE), (q_pos_BxL, k_pos_BxL) = qkv, positions
  b, length, h, d = q_BxLxHxE.shape
  g = k_BxLxGxE.shape[2]
  gather = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
  k_all, v_all, k_pos_all, *k_far = map(gather, (k_BxLxGxE, v_BxLxGxE, k_pos_BxL, *far[1:]))
  k_sets = [_heads_first(x) for x in (k_all, v_all, *k_far)]
  bias_fn, consts = convert_bias(bias_fn, q_pos_BxL[:, :block])
  # [2, B, C, ...]: this shard's zigzag chunks, with their first key block (keys start at 0).
  as_slots = lambda x: jnp.moveaxis(x.reshape(x.shape[0], 2, -1, *x.shape[2:]), 1, 0)
  queries = [as_slots(_to_zigzag(x, c)) for x in (q_BxLxHxE, q_pos_BxL, *far[:1])]
  shifts = jnp.stack(_zigzag_chunks(c)) * (length // 2 // block)

  def attend_chunk(chunk):
    (q_CxHxE, q_pos_C, *q_far), shift = chunk
    q_sets = [pack_heads(_heads_first(x), g) for x in (q_CxHxE, *q_far)]
    far_packed = (q_sets[1], k_sets[2]) if far else ()
    args = (q_sets[0], *k_sets[:2], q_pos_C, k_pos_all, consts, far_packed, (shift,))
    return jnp.moveaxis(_unpack_heads(flash(bias_fn, block, window, *args), h), 1, 2)

  out_JxBxCxHxE = jax.lax.map(attend_chunk, (queries, shifts))
  return _from_zigzag(jnp.moveaxis(out_JxBxCxHxE, 0, 1).reshape(b, length, h, d), c)


def _ring(bias_fn, block, window, c, qkv, positions, far):
  """Shard body: zigzag q, k, v, the ring (:func:`_ring_attention`) and back."""
  q_BxLxHxE, k_BxLxGxE, v_BxLxGxE = (_to_zigzag(x, c) for x in qkv)
  positions = tuple(_to_zigzag(x, c) for x in positions)
  h, g = q_BxLxHxE.shape[2], k_BxLxGxE.shape[2]
  far = tuple(_to_zigzag(x, c) for x in far)
  far_packed = (pack_heads(_heads_first(far[0]), g), _heads_first(far[1])) if far else ()
  bias_fn, consts = convert_bias(bias_fn, positions[0][:, :block])
  out_BxGxMxE = _ring_attention(
    bias_fn,
    block,
    window,
    c,
    pack_heads(_heads_first(q_BxLxHxE), g),
    _heads_first(k_BxLxGxE),
    _heads_first(v_BxLxGxE),
    *positions,
    consts,
    far_packed,
  )
  return _from_zigzag(jnp.moveaxis(_unpack_heads(out_BxGxMxE, h), 1, 2), c)


# The chunk pairs (query slot, key slot) a ring step may see: the shard's first query chunk s
# never sees a key chunk 2c − 1 − r >= c; of the others, a masked one runs no block.
_PAIRS = ((0, 0), (1, 0), (1, 1))


def _ring_pairs(c: int, step, chunk_blocks: int):
  """``[(q slot, k slot, shift)]`` at ring step ``step``: this shard holds the keys of shard
  ``r = s − step``, chunks ``(r, 2c − 1 − r)``; shift in blocks, as :func:`flash_forward`."""
  q_index = _zigzag_chunks(c)
  r = (jax.lax.axis_index(AXIS) - step) % c
  k_index = (r, 2 * c - 1 - r)
  return [(i, j, (q_index[i] - k_index[j]) * chunk_blocks) for i, j in _PAIRS]


def _slots(*xs):
  """Per zigzag slot, ``xs`` cut to its chunk: positions ``[B, 2C]`` on axis 1, packed
  ``[B, G, 2C(Y), E]`` tensors and ``lse`` on axis 2."""
  halves = [jnp.split(x, 2, axis=1 if x.ndim == 2 else 2) for x in xs]
  return [tuple(h[slot] for h in halves) for slot in (0, 1)]


def _add_to_slot(xs, grads, slot: int):
  """``xs[:, :, slot's chunk] += grads``, pair by pair."""
  add = lambda x, grad: x.at[:, :, slot * grad.shape[2] : (slot + 1) * grad.shape[2]].add(grad)
  return tuple(map(add, xs, grads))


def _pair(query, key, consts):
  """:func:`flash_forward`'s arguments up to ``far`` for a query chunk ``(q, q_pos, q_far?)``
  and a key chunk ``(k, v, k_pos, k_far?)``."""
  (q, q_pos, *q_far), (k, v, k_pos, *k_far) = query, key
  return q, k, v, q_pos, k_pos, consts, (*q_far, *k_far)


def _pass_on(xs, c: int):
  """Every shard sends ``xs`` to the next one round the ring."""
  return jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, [(i, (i + 1) % c) for i in range(c)]), xs)


def _ring_forward(bias_fn, block, window, c, q, k, v, q_pos, k_pos, consts, far):
  """``(out_BxGxMxE, lse_BxGxM)``: the merged softmax of the zigzag queries over every key, a
  ``fori_loop`` over the ``c`` steps (the keys' last pass brings them home, unused)."""
  chunk_blocks = k.shape[2] // 2 // block
  queries = _slots(q, q_pos, *far[:1])

  def step(t, carry):
    keys, merged = carry
    merged = list(merged)
    for i, j, shift in _ring_pairs(c, t, chunk_blocks):
      pair = _pair(queries[i], _slots(*keys)[j], consts)
      out, lse = flash_forward(bias_fn, block, window, *pair, (shift,), unroll=False)
      merged[i] = _merge(merged[i], out, lse)
    return _pass_on(keys, c), tuple(merged)

  rows = q.shape[:3]
  empty = (jnp.zeros(q.shape, jnp.float32), jnp.full(rows, MASK_VALUE, jnp.float32))
  init = ((k, v, k_pos, *far[1:]), tuple(_slots(*empty)))
  _, merged = jax.lax.fori_loop(0, c, step, init)
  out, lse = (jnp.concatenate(x, axis=2) for x in zip(*merged, strict=True))
  return out.astype(q.dtype), lse


def _merge(merged, out_BxGxTxE, lse_BxGxT):
  """Online softmax of two partial results ``(out, lse)`` of the same queries (an empty one
  has lse ``MASK_VALUE``)."""
  acc_BxGxTxE, acc_lse_BxGxT = merged
  lse = jnp.logaddexp(acc_lse_BxGxT, lse_BxGxT)
  return (
    acc_BxGxTxE * jnp.exp(acc_lse_BxGxT - lse)[..., None]
    + out_BxGxTxE.astype(jnp.float32) * jnp.exp(lse_BxGxT - lse)[..., None],
    lse,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ring_attention(bias_fn, block, window, c, q, k, v, q_pos, k_pos, consts, far):
  return _ring_forward(bias_fn, block, window, c, q, k, v, q_pos, k_pos, consts, far)[0]


def _ring_fwd(bias_fn, block, window, c, *args):
  out, lse = _ring_forward(bias_fn, block, window, c, *args)
  return out, (*args, out, lse)


def _ring_bwd(bias_fn, block, window, c, residuals, dout):
  """The backward ring: each step's pairs as in the forward, ``flash_backward`` with the merged
  out and lse; dk, dv (and dk_far) accumulate on the key chunks and travel with them, so after
  ``c`` passes they are back at their shard."""
  q, k, v, q_pos, k_pos, consts, far, out, lse = residuals
  chunk_blocks = k.shape[2] // 2 // block
  queries, merged = _slots(q, q_pos, *far[:1]), _slots(out, lse, dout)

  def step(t, carry):
    keys, dkeys, dqueries, dconsts = carry
    for i, j, shift in _ring_pairs(c, t, chunk_blocks):
      pair = _pair(queries[i], _slots(*keys)[j], consts)
      out_i, lse_i, dout_i = merged[i]
      grads = flash_backward(bias_fn, block, window, (*pair, (shift,), out_i, lse_i), dout_i)
      dq, dk, dv, _, _, dconst, dfar, _ = grads
      dqueries = _add_to_slot(dqueries, (dq, *dfar[:1]), i)
      dkeys = _add_to_slot(dkeys, (dk, dv, *dfar[1:]), j)
      dconsts = jax.tree.map(jnp.add, dconsts, dconst)
    return _pass_on(keys, c), _pass_on(dkeys, c), dqueries, dconsts

  zeros = lambda xs: tuple(jnp.zeros(x.shape, jnp.float32) for x in xs)
  keys = (k, v, k_pos, *far[1:])
  init = (keys, zeros((k, v, *far[1:])), zeros((q, *far[:1])), zeros(consts))
  _, (dk, dv, *dk_far), (dq, *dq_far), dconsts = jax.lax.fori_loop(0, c, step, init)
  cast = lambda grad, x: grad.astype(x.dtype)
  far_grads = tuple(map(cast, (*dq_far, *dk_far), far))
  dconsts = tuple(map(cast, dconsts, consts))
  return cast(dq, q), cast(dk, k), cast(dv, v), None, None, dconsts, far_grads


_ring_attention.defvjp(_ring_fwd, _ring_bwd)
