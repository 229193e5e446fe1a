"""PoSE positions (Zhu et al., ICLR 2024) around ANY base encoding.

Positional skip-wise training: train on the original window of L_c tokens while the position
ids cover a target length L_t. The window is split into N chunks, positions stay consecutive
inside a chunk, and chunk k is shifted by a skip bias u_k, so relative distances inside a chunk
are the original window's while distances between chunks span up to L_t. Each row of the batch
gets its own draw. Evaluation uses the base's sequential positions (the model is then evaluated
at long lengths); the RoPE frequencies for L_t (``pe.rope_scaling``: PI, NTK, YaRN) are the
base encoding's business.

The official code also skips content: its second chunk's tokens come from later in the document
(the text between the chunks is dropped). That needs documents longer than the window and is
not done here: the training windows are contiguous text (the positions skip, the text does not).

The draw comes from an ``nnx.Rngs`` stream owned by this module, so its key and counter are
model state (checkpointed and restored with the parameters).

Attention kernels take positions as inputs (``pe_research/kernels``), so PoSE's ``[B, L]``
positions need no kernel form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pe_research.encodings.base import PositionalEncoding, PositionsWrapper
from pe_research.encodings.spec import (
  NON_NEGATIVE,
  POSITIVE,
  EncodingSpec,
  Field,
  one_of,
  require,
)

# How the chunk starts are drawn (``pe.pose_first_chunk``).
FIRST_CHUNK = ("uniform", "official")


@functools.partial(
  jax.jit, static_argnames=("batch", "length", "target_len", "chunks", "first_chunk")
)
def pose_positions(
  key: jax.Array,
  batch: int,
  length: int,
  target_len: int,
  chunks: int,
  first_chunk: str = "uniform",
) -> jax.Array:
  """int32 ``[batch, length]``: per row, ``chunks`` consecutive runs skipped over [0, L_t).

  With L_c = ``length``, L_t = ``target_len``, N = ``chunks``, per row:

    chunk starts  0 = c_0 < c_1 < … < c_{N−1} < L_c:  c_1..c_{N−1} are N−1 distinct draws
                  from {1, …, L_c − 1}, sorted (every split into N chunks of >= 1 token
                  equally likely); with ``first_chunk="official"`` (N = 2, the official
                  code's ``train_preprocess_function_pose``) c_1 ~ U{1, …, ⌊(L_c + 1)/2⌋}:
                  the first chunk is never longer than half the window;
    skip biases   0 = u_0 <= u_1 <= … <= u_{N−1} <= L_t − L_c:  u_1..u_{N−1} are N−1
                  i.i.d. uniform draws from {0, …, L_t − L_c}, sorted (N = 2, the paper's
                  setting: u_1 ~ U{0, …, L_t − L_c});
    position      p_i = i + u_k  for token i in chunk k (c_k <= i < c_{k+1}).

  So p is strictly increasing, p_0 = 0, p_{L_c−1} = L_c − 1 + u_{N−1} < L_t, p_{i+1} − p_i = 1
  inside a chunk and 1 + u_{k+1} − u_k across the boundary into chunk k + 1. N = 1 or
  L_t = L_c gives the sequential 0 … L_c − 1.
  """
  if not 1 <= length <= target_len:
    raise ValueError(f"sequence length {length} must be in [1, pe.pose_target_len={target_len}]")
  if not 1 <= chunks <= length:
    raise ValueError(f"pe.pose_chunks={chunks} must be in [1, sequence length {length}]")
  if first_chunk == "official" and chunks != 2:
    raise ValueError(f"pe.pose_chunks={chunks} must be 2 with pe.pose_first_chunk='official'")

  def one_row(row_key: jax.Array) -> jax.Array:
    split_key, skip_key = jax.random.split(row_key)
    if first_chunk == "official":
      starts = jax.random.randint(split_key, (1,), 1, (length + 1) // 2 + 1)
    else:
      starts = 1 + jax.random.choice(split_key, length - 1, (chunks - 1,), replace=False)
    skips = jax.random.randint(skip_key, (chunks - 1,), 0, target_len - length + 1)
    u = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.sort(skips).astype(jnp.int32)])
    i_L = jnp.arange(length, dtype=jnp.int32)
    chunk_L = jnp.sum(i_L[:, None] >= starts[None, :], axis=1)  # k with c_k <= i < c_{k+1}
    return i_L + u[chunk_L]

  return jax.vmap(one_row)(jax.random.split(key, batch)).astype(jnp.int32)


class PoSEPositions(PositionsWrapper):
  """Draws PoSE positions in training; ``embed``/``rotate``/``bias`` are the base encoding's.

  ``max_length`` is the base's: evaluation uses sequential positions.
  """

  def __init__(
    self,
    base: PositionalEncoding,
    *,
    target_len: int,
    chunks: int,
    rngs: nnx.Rngs,
    first_chunk: str = "uniform",
  ):
    if chunks < 1:
      raise ValueError(f"pe.pose_chunks={chunks} is invalid; allowed: a chunk count >= 1")
    super().__init__(base, longest=target_len, field="pe.pose_target_len")
    self.target_len = target_len
    self.chunks = chunks
    self.first_chunk = first_chunk
    self.max_length = base.max_length
    self.rngs = nnx.Rngs(positions=rngs.params())

  def positions(self, batch: int, length: int, *, train: bool) -> jax.Array:
    if not train:
      return self.base.positions(batch, length, train=train)
    return pose_positions(
      self.rngs.positions(), batch, length, self.target_len, self.chunks, self.first_chunk
    )


def _validate(pe_cfg, model_cfg, train_cfg) -> None:
  """With PoSE on: L_c <= L_t, no randomized positions, and at most L_c chunks."""
  del model_cfg
  target_len, seq_len = pe_cfg.pose_target_len, train_cfg.seq_len
  if not target_len:
    return
  require(
    target_len >= seq_len,
    "pe.pose_target_len",
    target_len,
    f"0 (off) or a target length >= train.seq_len={seq_len}",
  )
  require(
    not pe_cfg.randomized,
    "pe.pose_target_len",
    target_len,
    "0 when pe.randomized=True (both choose the training positions)",
  )
  require(
    pe_cfg.pose_chunks <= seq_len,
    "pe.pose_chunks",
    pe_cfg.pose_chunks,
    f"a chunk count in [1, train.seq_len={seq_len}] when pe.pose_target_len > 0",
  )
  require(
    pe_cfg.pose_first_chunk != "official" or pe_cfg.pose_chunks == 2,
    "pe.pose_chunks",
    pe_cfg.pose_chunks,
    "2 when pe.pose_first_chunk='official' (the official code's two chunks)",
  )


SPEC = EncodingSpec(
  fields=(
    Field(
      "pose_target_len",
      0,
      "PoSE (Zhu et al. 2024) target length L_t: train.seq_len windows over [0, L_t); 0 = off.",
      NON_NEGATIVE,
    ),
    Field("pose_chunks", 2, "PoSE chunks N per training window (2 in the paper).", POSITIVE),
    Field(
      "pose_first_chunk",
      "uniform",
      "PoSE chunk starts: 'uniform' (every split equally likely) or 'official' (the official "
      "code: N = 2, first chunk ~ U{1..(L_c+1)//2}); skips uniform either way.",
      one_of(*FIRST_CHUNK),
    ),
  ),
  validate=_validate,
  train_span=lambda pe_cfg: pe_cfg.pose_target_len,
)


def pose(pe_cfg, base: PositionalEncoding, *, rngs: nnx.Rngs) -> PositionalEncoding:
  """Wraps ``base`` when ``pe.pose_target_len`` > 0 (reads pe.pose_target_len, pe.pose_chunks).

  ``build_encoding`` already calls this; an encoding already wrapped is returned as is. PoSE and
  ``pe.randomized`` both choose the training positions, so together they are an error.
  """
  target_len = pe_cfg.get("pose_target_len", 0)
  if not target_len or isinstance(base, PoSEPositions):
    return base
  if pe_cfg.get("randomized", False):
    raise ValueError(
      f"pe.pose_target_len={target_len} is invalid with pe.randomized=True; allowed: 0 (both "
      "choose the training positions)"
    )
  return PoSEPositions(
    base,
    target_len=target_len,
    chunks=pe_cfg.pose_chunks,
    rngs=rngs,
    first_chunk=pe_cfg.get("pose_first_chunk", "uniform"),
  )
