"""Randomized positions (Ruoss et al. 2023) around ANY base encoding.

For a sequence of length n, draw n distinct integers from [0, max_random_len), sort them and
use them as the positions of that row; each row of the batch gets its own draw. The base
encoding then sees positions spread over the whole range [0, max_random_len) during training,
so longer test sequences do not bring unseen positions.

Evaluation draws its positions the same way by default (``pe.randomize_eval=True``), as the
reference code does: the model then never sees positions off the training distribution, at any
test length up to max_random_len. ``pe.randomize_eval=False`` evaluates at the sequential
positions 0..n−1 instead. The draw comes from an ``nnx.Rngs`` stream owned by this module, so
its key and counter are model state (checkpointed and restored with the parameters in
training). Evaluation (``runs.load_model``) restores only the parameters, so its draws start
from the stream's initial state: an evaluation repeated with the same ``config.seed`` and the
same request (lengths and batches in the same order) draws the same positions, and it scores
the same tokens as a sequential evaluation.

Attention kernels take positions as inputs (``pe_research/kernels``), so the drawn ``[B, L]``
positions need no kernel form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pe_research.encodings.base import PositionalEncoding, PositionsWrapper
from pe_research.encodings.spec import POSITIVE, EncodingSpec, Field, require


@functools.partial(jax.jit, static_argnames=("batch", "length", "max_len"))
def random_sorted_positions(key: jax.Array, batch: int, length: int, max_len: int) -> jax.Array:
  """int32 ``[batch, length]``: per row, ``length`` distinct draws from [0, max_len), sorted."""
  if not 1 <= length <= max_len:
    raise ValueError(f"sequence length {length} must be in [1, pe.max_random_len={max_len}]")

  def one_row(row_key: jax.Array) -> jax.Array:
    return jnp.sort(jax.random.choice(row_key, max_len, (length,), replace=False))

  return jax.vmap(one_row)(jax.random.split(key, batch)).astype(jnp.int32)


class RandomizedPositions(PositionsWrapper):
  """Draws the positions; ``embed``/``rotate``/``rotate_far``/``bias`` (and ``window``) are the
  base encoding's.

  ``max_length`` is ``max_random_len`` when evaluation is randomized, else the base's.
  """

  def __init__(
    self,
    base: PositionalEncoding,
    *,
    max_random_len: int,
    randomize_eval: bool,
    rngs: nnx.Rngs,
  ):
    if max_random_len < 1:
      raise ValueError(f"pe.max_random_len={max_random_len} must be >= 1")
    super().__init__(base, longest=max_random_len, field="pe.max_random_len")
    self.max_random_len = max_random_len
    self.randomize_eval = randomize_eval
    self.max_length = max_random_len if randomize_eval else base.max_length
    self.rngs = nnx.Rngs(positions=rngs.params())

  def positions(self, batch: int, length: int, *, train: bool) -> jax.Array:
    if not (train or self.randomize_eval):
      return self.base.positions(batch, length, train=train)
    return random_sorted_positions(self.rngs.positions(), batch, length, self.max_random_len)


def _validate(pe_cfg, model_cfg, train_cfg) -> None:
  del model_cfg
  seq_len = train_cfg.seq_len
  require(
    not pe_cfg.randomized or pe_cfg.max_random_len >= seq_len,
    "pe.max_random_len",
    pe_cfg.max_random_len,
    f"a length >= train.seq_len={seq_len} when pe.randomized",
  )


SPEC = EncodingSpec(
  fields=(
    Field("randomized", False, "Randomized positions (Ruoss et al. 2023) around pe.name."),
    Field(
      "max_random_len",
      2048,
      "Randomized positions are sorted samples from [0, this).",
      POSITIVE,
    ),
    # A run may resume with it changed (it acts only at evaluation).
    Field(
      "randomize_eval",
      True,
      "Evaluate at sorted draws from [0, max_random_len) as trained (True) or at 0..n-1.",
    ),
  ),
  validate=_validate,
  train_span=lambda pe_cfg: pe_cfg.max_random_len if pe_cfg.randomized else 0,
)


def randomize(pe_cfg, base: PositionalEncoding, *, rngs: nnx.Rngs) -> PositionalEncoding:
  """Wraps ``base`` when ``pe.randomized`` is true (reads pe.max_random_len, pe.randomize_eval).

  ``build_encoding`` already calls this; an encoding that is already randomized is returned as
  is, so a second call never stacks two draws.
  """
  if not pe_cfg.get("randomized", False) or isinstance(base, RandomizedPositions):
    return base
  return RandomizedPositions(
    base,
    max_random_len=pe_cfg.max_random_len,
    randomize_eval=pe_cfg.randomize_eval,
    rngs=rngs,
  )
