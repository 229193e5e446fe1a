"""Everything that depends on the backend (XLA:CPU, GPU, TPU), in one place.

The model, attention and the encodings are written as their formulas. Where one backend needs
another form of the same arithmetic, they call the kernel here, and :func:`policy` says which
form it takes. The policy is chosen once per process, from the platform JAX runs on, and each
run records it in its ``config.json`` (``"backend"``). ``Policy.reference()`` is every formula
as written; it runs on any backend and is what the tests compare the tuned forms against.

  kernel                   cpu policy (tuned for XLA:CPU)                reference policy
  activation_dtype(dt)     float32: bf16 is only a matmul operand         dt
  matmul / linear          fp32 accumulation in the forward and both backward products
                           (custom VJP, dW float32) on every policy; on the CPU every
                           transpose is a row-major copy and the result a fp32 convert
  over_batch_pieces        attention's batch in per-core pieces          one call
  materialised(*tables)    tables through an identity matmul (a buffer)  the tables
  lookup_columns(t, idx)   one-hot matmul up to ``LOOKUP_MAX`` entries    a gather
  sum_leading(x)           pairwise halving over axis 0                   jnp.sum
  key_grads(dtype, rows)   flash backward: dk, dv summed transposed       summed directly
                           (bf16), from copies of q^T, dout^T
  block_loops(n, may_unroll)  flash block loops: Python loops up to ``unroll_blocks`` (8) per
                           side in a gradient's passes, else ``lax`` loops (every policy)
  dot_product_attention_implementation: cuDNN for bf16/fp16 on GPU, else XLA.
  fast_attention(biased)   model.attention="fast": blockwise on the CPU; on TPU splash
                           without a bias, else the Pallas kernel; on GPU cuDNN without a
                           bias, else blockwise
  pallas_interpret         Pallas kernels interpreted, but on TPU (Mosaic) and GPU (Triton)
  pallas_lowering          model.attention="pallas": the Mosaic (TPU) kernel, or on GPU the
                           Triton one (kernels/pallas_gpu.py)

Why each tuned form exists, with the commands and numbers that measured it:
docs/cpu_performance.md. The GPU and TPU policy is the reference, except that a bf16 matmul
writes its bf16 output directly (cuBLAS accumulates in fp32).

Process set-up (XLA flags, the CPU's ISA check, compile counting) is in
:mod:`pe_research.runtime`; the attention an evaluation length is scored with, in
:mod:`pe_research.eval_lib`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Policy:
  """Which form each kernel of this module takes (module docstring)."""

  platform: str
  float32_activations: bool = False
  cpu_matmul: bool = False
  low_precision_matmul_output: bool = False
  attention_batch_pieces: int = 1  # At most this many pieces (the cores this process may use).
  materialise_tables: bool = False
  lookup_by_matmul: bool = False
  pairwise_sum_leading: bool = False
  transposed_key_grads: bool = False
  # Flash attention in a gradient computation: Python block loops up to this many blocks per side.
  unroll_blocks: int = 8
  pallas_interpret: bool = True  # Pallas kernels in the interpreter (compiled on TPU and GPU)
  # model.attention="pallas": the TPU ("mosaic") or GPU ("triton") form of the kernel.
  pallas_lowering: str = "mosaic"
  # model.attention="fast": the implementation without a bias, and with a bias or far set.
  fast_attention_plain: str = "blockwise"
  fast_attention_bias: str = "blockwise"

  @classmethod
  def reference(cls, platform: str = "any") -> Policy:
    return cls(platform)

  @classmethod
  def for_platform(cls, platform: str, cores: int, local_devices: int) -> Policy:
    """The tuned policy of ``platform`` (``jax.default_backend()``)."""
    if platform != "cpu":
      return cls(
        platform,
        low_precision_matmul_output=True,
        pallas_interpret=platform not in ("tpu", "gpu"),
        pallas_lowering="triton" if platform == "gpu" else "mosaic",
        **_FAST_ATTENTION.get(platform, {}),
      )
    return cls(
      platform,
      float32_activations=True,
      cpu_matmul=True,
      # Several CPU devices (data parallelism) already run their shards side by side.
      attention_batch_pieces=cores if local_devices == 1 else 1,
      materialise_tables=True,
      lookup_by_matmul=True,
      pairwise_sum_leading=True,
      transposed_key_grads=True,
    )

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def interprets(self, lowering: str) -> bool:
    """Whether a Pallas kernel written for ``lowering`` ("mosaic", "triton") runs in Pallas's
    interpreter here: everywhere but on its own platform (splash is a Mosaic kernel)."""
    return self.pallas_interpret or lowering != self.pallas_lowering


# model.attention="fast" per platform, without a bias and with a bias or a far logit set. TPU:
# splash attention without, else the Pallas kernel (the bias in-kernel). GPU: cuDNN through
# jax.nn.dot_product_attention without, else blockwise (cuDNN would take a materialised
# [B, H, L, L] bias). The Pallas kernel's GPU form (kernels/pallas_gpu.py, model.attention=
# "pallas") lowers to Triton for every encoding, but no GPU has compiled or timed it yet: it
# replaces blockwise here once `make bench-gpu` measures it faster (docs/pallas_attention.md).
# Other platforms keep the class defaults (blockwise).
_FAST_ATTENTION = {
  "tpu": dict(fast_attention_plain="splash", fast_attention_bias="pallas"),
  "gpu": dict(fast_attention_plain="xla", fast_attention_bias="blockwise"),
}

_POLICY: Policy | None = None


def policy() -> Policy:
  """This process's policy, chosen at the first call (:meth:`Policy.for_platform`)."""
  global _POLICY
  if _POLICY is None:
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    _POLICY = Policy.for_platform(jax.default_backend(), cores, jax.local_device_count())
  return _POLICY


def set_policy(new: Policy | None) -> None:
  """Replaces the process's policy (None: choose again). Functions traced before keep the form
  they were traced with; tests call this before building what they compare."""
  global _POLICY
  _POLICY = new


def activation_dtype(compute_dtype):
  """The dtype of activations between matmuls for ``compute_dtype``."""
  return jnp.float32 if policy().float32_activations else compute_dtype


# ---- matmul: x W with operands in a compute dtype, accumulated in float32 ----------------------


def linear(x_BxLxD: jax.Array, w: jax.Array, out_dtype, operand_dtype, w_transposed=False):
  """``x W`` (``W`` is ``[D, F]``) or, with ``w_transposed``, ``x W^T`` (``W`` is ``[F, D]``)
  by :func:`matmul` on the rows of ``x`` flattened to ``[N, D]`` (XLA:CPU transposes a 3-D
  ``x`` before the weight-gradient matmul; the reshape is free elsewhere)."""
  x_NxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
  y_NxF = matmul(x_NxD, w, out_dtype, w_transposed, operand_dtype)
  return y_NxF.reshape(*x_BxLxD.shape[:-1], -1)


def _transposed(x_NxD: jax.Array) -> jax.Array:
  """``x^T``; tuned for XLA:CPU, a row-major ``[D, N]`` copy (its fast kernel contracts a left
  operand on its last, contiguous axis only). The barrier keeps XLA from folding the copy into
  the matmul; any reshape it sees forces the physical copy."""
  if not policy().cpu_matmul:
    return x_NxD.T
  n, d = x_NxD.shape
  rows = 8 if n % 8 == 0 else 1
  return jax.lax.optimization_barrier(x_NxD.T.reshape(d, n // rows, rows)).reshape(d, n)


def _kept_apart(x: jax.Array) -> jax.Array:
  """``x``; for XLA:CPU behind a barrier, so a transpose that follows is not folded into the
  matmul that computed ``x`` (it would contract a non-contiguous axis again)."""
  return jax.lax.optimization_barrier(x) if policy().cpu_matmul else x


def _dot(a_NxD: jax.Array, b: jax.Array, b_axis: int, out_dtype) -> jax.Array:
  """``a b`` (``b_axis=0``, ``b`` is ``[D, F]``) or ``a b^T`` (``b_axis=1``, ``[F, D]``),
  accumulated in float32, result in ``out_dtype``: written directly where the platform's matmul
  rounds its own output (cuBLAS), else accumulated in float32 and converted."""
  dims = (((1,), (b_axis,)), ((), ()))
  if out_dtype != jnp.float32 and policy().low_precision_matmul_output:
    return jax.lax.dot_general(a_NxD, b, dims, preferred_element_type=out_dtype)
  return jax.lax.dot_general(a_NxD, b, dims, preferred_element_type=jnp.float32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def matmul(x_NxD, w, out_dtype, w_transposed: bool = False, operand_dtype=None) -> jax.Array:
  """``x W`` (or ``x W^T``) with operands in ``operand_dtype`` (default ``x``'s) and float32
  accumulation in the forward and both backward matmuls (``dx = g W^T`` with ``g`` rounded to
  the operand dtype, ``dW = x^T g``): ``dx`` has ``x``'s dtype (a float32 ``x`` never gets a
  bf16 gradient), ``dW`` is accumulated in float32 and has ``W``'s dtype (float32 master
  weights; bf16 where W was cast before an FSDP gather, ``model.gather_dtype``). Every
  contraction takes the form :func:`_transposed` chooses."""
  return _matmul_fwd(x_NxD, w, out_dtype, w_transposed, operand_dtype)[0]


def _matmul_fwd(x_NxD, w, out_dtype, w_transposed, operand_dtype):
  dtype = operand_dtype or x_NxD.dtype
  # Residuals are arrays: x's and w's dtypes, carried by 0 bytes.
  dtypes = (jnp.zeros((0,), x_NxD.dtype), jnp.zeros((0,), w.dtype))
  x_NxD, w = x_NxD.astype(dtype), w.astype(dtype)
  return _dot(x_NxD, w, int(w_transposed), out_dtype), (x_NxD, w, dtypes)


def _matmul_bwd(out_dtype, w_transposed, operand_dtype, residuals, g_NxF):
  del out_dtype, operand_dtype
  x_NxD, w, (x_dtype, w_dtype) = residuals
  g_NxF = g_NxF.astype(x_NxD.dtype)
  dx_NxD = _dot(g_NxF, w, 1 - int(w_transposed), x_dtype.dtype)
  # dW = x^T g: transpose the narrower of x and g, and the small [D, F] result if it comes out
  # the other way round.
  if x_NxD.shape[1] <= g_NxF.shape[1]:
    dw_DxF = _dot(_transposed(x_NxD), g_NxF, 0, jnp.float32)
    dw = _kept_apart(dw_DxF).T if w_transposed else dw_DxF
  else:
    dw_FxD = _dot(_transposed(g_NxF), x_NxD, 0, jnp.float32)
    dw = dw_FxD if w_transposed else _kept_apart(dw_FxD).T
  return dx_NxD, dw.astype(w_dtype.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ---- batch pieces, tables ---------------------------------------------------------------------


def batch_pieces(batch: int) -> int:
  """Into how many pieces :func:`over_batch_pieces` cuts a batch: the largest divisor of
  ``batch`` up to ``policy().attention_batch_pieces``."""
  limit = min(batch, policy().attention_batch_pieces)
  return max(n for n in range(1, limit + 1) if batch % n == 0)


def over_batch_pieces(fn, *xs_BxX: jax.Array | None) -> jax.Array:
  """``fn(*xs)`` computed on :func:`batch_pieces` pieces of the batch and concatenated (the same
  values: ``fn`` must treat batch rows independently). Arguments with a batch axis of 1 (shared
  positions) or None are passed whole to every piece. XLA:CPU runs each batched attention matmul
  on one core; independent pieces run side by side."""
  batch = max(x.shape[0] for x in xs_BxX if x is not None)
  pieces = batch_pieces(batch)
  if pieces == 1:
    return fn(*xs_BxX)

  def cut(x):
    if x is None or x.shape[0] == 1:
      return (x,) * pieces
    return tuple(jnp.split(x, pieces, 0))

  cuts = [cut(x) for x in xs_BxX]
  return jnp.concatenate([fn(*(c[i] for c in cuts)) for i in range(pieces)], axis=0)


def materialised(*tables_LxR: jax.Array) -> tuple[jax.Array, ...]:
  """The float32 tables, unchanged; in the tuned form computed once into a buffer, so XLA does
  not recompute them inside every ``[B, L, H, R]`` consumer. A matmul's output is such a buffer
  (an optimization barrier is gone before fusion): the identity matmul, exact in float32."""
  if not policy().materialise_tables:
    return tables_LxR
  stacked_NxR = jnp.concatenate(tables_LxR, axis=-1).reshape(-1, tables_LxR[0].shape[-1])
  r = stacked_NxR.shape[-1]
  eye_RxR = jnp.eye(r, dtype=jnp.float32)
  out_NxR = jnp.dot(stacked_NxR, eye_RxR, precision=jax.lax.Precision.HIGHEST)
  out = out_NxR.reshape(*tables_LxR[0].shape[:-1], len(tables_LxR) * r)
  return tuple(jnp.split(out, len(tables_LxR), axis=-1))


# The most one-hot entries (64 MiB of float32) for which lookup_columns is a matmul.
LOOKUP_MAX = 1 << 24


def lookup_columns(table_ZxH: jax.Array, index: jax.Array) -> jax.Array:
  """``table[index, h]`` for every column ``h``: float32 ``[H, *index.shape]``. Tuned form, up to
  ``LOOKUP_MAX`` one-hot entries: the matmul ``table^T onehot(index)``, exact in float32, whose
  gradient is a matmul where a gather's is a scatter-add, and whose output is a buffer XLA
  computes once instead of fusing the index arithmetic into every consumer."""
  table_HxZ = table_ZxH.T.astype(jnp.float32)
  n = table_HxZ.shape[1]
  if not policy().lookup_by_matmul or index.size * n > LOOKUP_MAX:
    return jnp.take(table_HxZ, index, axis=1)
  onehot_ZxN = (jnp.arange(n, dtype=jnp.int32)[:, None] == index.reshape(1, -1)).astype(jnp.float32)
  out_HxN = jnp.dot(table_HxZ, onehot_ZxN, precision=jax.lax.Precision.HIGHEST)
  return out_HxN.reshape(-1, *index.shape)


def sum_leading(x: jax.Array) -> jax.Array:
  """``jnp.sum(x, axis=0, keepdims=True)``; tuned form: pairwise halving (XLA:CPU's reduction
  over a leading axis is slow), which is also the more accurate sum."""
  if not policy().pairwise_sum_leading:
    return jnp.sum(x, axis=0, keepdims=True)
  while x.shape[0] > 1:
    half = x.shape[0] // 2
    odd_row = x[2 * half :]
    x = x[:half] + x[half : 2 * half]
    if odd_row.shape[0]:
      x = x.at[:1].add(odd_row)
  return x


def dot_product_attention_implementation(dtype) -> str | None:
  """``jax.nn.dot_product_attention``'s ``implementation``: cuDNN for half-precision inputs on
  GPU, else None (XLA)."""
  half = dtype in (jnp.bfloat16, jnp.float16)
  return "cudnn" if policy().platform == "gpu" and half else None


def fast_attention(biased: bool) -> str:
  """The attention implementation ``model.attention="fast"`` stands for, for an encoding with a
  bias or a far logit set (``biased``) or without."""
  return policy().fast_attention_bias if biased else policy().fast_attention_plain


# ---- flash attention: its block loops and the form of dk, dv -----------------------------------


@dataclasses.dataclass(frozen=True)
class BlockLoops:
  """Flash attention's loops over blocks: Python loops (``static``: static slices, one
  straight-line program XLA schedules as a whole; int bounds) or ``lax`` loops (program size
  independent of L; bounds may be traced)."""

  static: bool

  def fori(self, lo, hi, body, carry):
    """``for i in range(lo, hi): carry = body(i, carry)``."""
    if self.static:
      for i in range(lo, hi):
        carry = body(i, carry)
      return carry
    return jax.lax.fori_loop(lo, hi, body, carry)

  def map(self, n: int, fn, carry):
    """``ys[i], carry = fn(i, carry)`` for i < n; returns (stacked ys, carry)."""
    if self.static:
      ys = []
      for i in range(n):
        y, carry = fn(i, carry)
        ys.append(y)
      return jax.tree.map(lambda *y: jnp.stack(y), *ys), carry
    carry, ys = jax.lax.scan(lambda c, i: fn(i, c)[::-1], carry, jnp.arange(n))
    return ys, carry


def block_loops(blocks: int, may_unroll: bool) -> BlockLoops:
  """Python loops where the caller allows them (``may_unroll``: a pass of a gradient computation,
  its block bounds static) over up to ``policy().unroll_blocks`` blocks per side, else ``lax``
  loops (always for a forward pass without a gradient, i.e. evaluation)."""
  return BlockLoops(may_unroll and blocks <= policy().unroll_blocks)


@dataclasses.dataclass(frozen=True)
class KeyGrads:
  """How flash attention's backward pass sums ``x^T y_a`` into a key block's gradient (``dv +=
  p^T dout_a``, ``dk += ds^T q_a``: ``x`` ``[B, G, T, P]``, ``y_a`` the T rows of query block
  ``a``, contracted). Direct: ``[B, G, P, E]`` sums. ``transposed`` (bf16 on XLA:CPU, whose fast
  matmul contracts a left operand on its last axis only): ``[B, G, E, P]`` sums of ``y_a^T x``,
  reading row-major copies of ``y``'s blocks transposed, made once per call."""

  transposed: bool
  rows: int  # T, the rows of a query block

  def operand(self, y_BxGxMxE: jax.Array) -> jax.Array:
    """What :meth:`product` reads for ``y``: ``y``, or ``[J, B, G, E, T]`` (block ``j``
    transposed) behind a barrier that keeps XLA from folding the copy back into the matmuls."""
    if not self.transposed:
      return y_BxGxMxE
    b, g, m, d = y_BxGxMxE.shape
    y_JxBxGxTxE = jnp.moveaxis(y_BxGxMxE.reshape(b, g, m // self.rows, self.rows, d), 2, 0)
    return jax.lax.optimization_barrier(jnp.swapaxes(y_JxBxGxTxE, -1, -2))

  def zeros(self, shape_BxGxPxE: tuple[int, ...]) -> jax.Array:
    """A float32 sum of nothing for a key block shaped ``[B, G, P, E]``."""
    *lead, block, d = shape_BxGxPxE
    return jnp.zeros((*lead, d, block) if self.transposed else shape_BxGxPxE, jnp.float32)

  def product(self, x_BxGxTxP: jax.Array, y_operand: jax.Array, a) -> jax.Array:
    """``x^T y_a`` in the sums' form, float32; ``y_operand`` from :meth:`operand`."""
    if self.transposed:
      y_t_BxGxExT = y_operand[a]
      return jnp.einsum(
        "bgdq,bgqk->bgdk", y_t_BxGxExT, x_BxGxTxP, preferred_element_type=jnp.float32
      )
    y_BxGxTxE = jax.lax.dynamic_slice_in_dim(y_operand, a * self.rows, self.rows, axis=2)
    return jnp.einsum("bgqk,bgqd->bgkd", x_BxGxTxP, y_BxGxTxE, preferred_element_type=jnp.float32)

  def result(self, sums: jax.Array) -> jax.Array:
    """The sums as ``[..., P, E]``."""
    return jnp.swapaxes(sums, -1, -2) if self.transposed else sums


def key_grads(dtype, rows: int) -> KeyGrads:
  """The form of flash attention's ``dk``, ``dv`` sums for q of ``dtype`` and query blocks of
  ``rows`` rows: transposed where the policy asks for it, and not in float32."""
  return KeyGrads(policy().transposed_key_grads and dtype != jnp.float32, rows)
