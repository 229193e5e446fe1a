"""Scoring a trained model at any length: one compiled program per (attention, batch shape).

Every evaluation (perplexity, per-position loss, passkey, synthetic tasks) reduces to scoring
batches ``{"inputs", "targets", "weights"}`` of shape ``[B, L]`` with one step that returns

  nll_sum_L[l]    = Σ_b w[b,l] · NLL[b,l]        NLL = −log softmax(logits)[target]
  weight_sum_L[l] = Σ_b w[b,l]
  exact_B[b]      = ∀l: w[b,l] = 0 or argmax(logits[b,l]) = targets[b,l]
  scored_B[b]     = Σ_l w[b,l]
  nll_sum_B[b]    = Σ_l w[b,l] · NLL[b,l]
  nll_BxL[b,l]    = w[b,l] · NLL[b,l]

from which loss = Σ nll_sum / Σ weight_sum (nats per token), ppl = exp(loss), and exact-match
accuracy = mean of exact_B over rows with scored_B > 0 (greedy decoding of the targets, see
``passkey.py``). Language-model sweeps also count the UTF-8 bytes of the scored text on the
host, ``bytes = Σ_b,l w[b,l] · bytes_per_token[targets[b,l]]`` (from the tokenizer's
``utf8_bytes_per_token``; EOS and other specials are 0 bytes), and report

  bits_per_byte = Σ nll_sum / ln 2 / bytes

so byte-level and BPE models are compared on one axis. Host-side sums are float64.
Every ppl and accuracy comes with a 95% bootstrap interval (``pe_research.stats``): ppl over the
scored windows (``nll_sum_B``, ``scored_B``; contiguous blocks of positions when there are fewer
than 16 windows, except in documents mode, where the documents are the units from 2 on;
``interval_units`` says which), accuracy over examples.

Regions: given a ``split`` position (the training length L), every scored window's NLL and
token count are also summed inside (positions l < split) and beyond (l >= split), per window
(``nll_WxR``, ``weight_WxR``, R = 2), so a report can compare the two regions of the same
windows and bootstrap over windows (documents) as the unit; rows add ``loss_inside``,
``loss_beyond`` and their token counts.

Long lengths: dense attention materialises ``B·H·L²`` float32 scores per layer; from
``EVAL_BLOCKWISE_FROM`` positions on, or when that exceeds ``dense_budget_bytes``, a
dense run is evaluated with blockwise attention instead (same parameters, different graph).
Programs are compiled ahead of time and cached by ``(attention, block, shapes)``;
``num_compiles`` counts them, so re-scoring a length never recompiles and a sweep over N
lengths compiles N programs (``backend_compiles`` measures it from JAX's events).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from pe_research import passkey, runtime
from pe_research import stats as bootstrap
from pe_research.data import make_eval_batches, tokenizer_of
from pe_research.model import Transformer, with_attention

Batch = dict[str, np.ndarray]
_DTYPES = {"inputs": np.int32, "targets": np.int32, "weights": np.float32}


# Evaluation of a dense-attention model switches to blockwise attention with 512-position blocks
# from this length on (or earlier, when the dense scores exceed the memory budget).
EVAL_BLOCKWISE_FROM = 1024
EVAL_BLOCK = 512
# Evaluation calls (``batch_size=0``) hold about this many tokens (docs/cpu_performance.md,
# "Evaluation batch").
EVAL_TOKENS_PER_CALL = 1024


def eval_attention(
  model_impl: str, model_block: int, length: int, dense_too_big: bool
) -> tuple[str, int]:
  """``(implementation, block size)`` that scores ``length`` for a model trained with
  ``model_impl``: dense models go blockwise (``EVAL_BLOCK``) from ``EVAL_BLOCKWISE_FROM`` on, or
  when their scores would exceed the memory budget; other implementations are kept."""
  if model_impl == "dense" and (dense_too_big or length >= EVAL_BLOCKWISE_FROM):
    return "blockwise", EVAL_BLOCK
  return model_impl, model_block


def eval_batch_size(length: int) -> int:
  """Windows of ``length`` tokens per evaluation call where the caller passes ``batch_size=0``."""
  return max(1, EVAL_TOKENS_PER_CALL // length)


def dense_score_bytes(batch: int, num_heads: int, length: int) -> int:
  """Bytes of one layer's float32 attention scores: ``B·H·L²·4``."""
  return batch * num_heads * length * length * 4


def token_stats(nll_BxL: jax.Array, hit_BxL: jax.Array, batch: Batch) -> dict[str, jax.Array]:
  """The per-batch sums of the module docstring from per-token NLL and argmax hits."""
  w_BxL = batch["weights"]
  return {
    "nll_sum_L": jnp.sum(w_BxL * nll_BxL, axis=0),
    "weight_sum_L": jnp.sum(w_BxL, axis=0),
    "nll_sum_B": jnp.sum(w_BxL * nll_BxL, axis=1),
    "nll_BxL": w_BxL * nll_BxL,
    "exact_B": jnp.all(hit_BxL | (w_BxL == 0), axis=1),
    "scored_B": jnp.sum(w_BxL, axis=1),
  }


def _eval_step(graphdef, params, rest, batch: Batch):
  model = nnx.merge(graphdef, params, rest)
  nll_BxL, hit_BxL = model.nll_and_hits(batch["inputs"], batch["targets"])
  return token_stats(nll_BxL, hit_BxL, batch), nnx.split(model, nnx.Param, ...)[2]


@dataclasses.dataclass
class Totals:
  """Float64 host accumulators over the batches of one length."""

  nll_sum_L: np.ndarray
  weight_sum_L: np.ndarray
  nll_W: list[float] = dataclasses.field(default_factory=list)  # Per scored window (row).
  weight_W: list[float] = dataclasses.field(default_factory=list)
  exact_W: list[bool] = dataclasses.field(default_factory=list)  # Per scored window (example).
  # Per scored window, inside / beyond the split (score_all's ``split``; empty without one).
  nll_WxR: list[list[float]] = dataclasses.field(default_factory=list)
  weight_WxR: list[list[float]] = dataclasses.field(default_factory=list)
  scored_bytes: float = 0.0
  correct: int = 0
  examples: int = 0
  seconds: float = 0.0
  compile_seconds: float = 0.0
  attention: str = ""

  @property
  def tokens(self) -> int:
    return int(round(self.weight_sum_L.sum()))

  @property
  def loss(self) -> float:
    return float(self.nll_sum_L.sum() / self.weight_sum_L.sum())

  @property
  def accuracy(self) -> float:
    return self.correct / self.examples

  @property
  def bits_per_byte(self) -> float:
    """``Σ nll / ln 2 / bytes``; NaN when no bytes were counted."""
    if not self.scored_bytes:
      return math.nan
    return float(self.nll_sum_L.sum() / math.log(2) / self.scored_bytes)

  def ppl_interval(self, min_windows: int = bootstrap.MIN_UNITS) -> tuple[float, float, str]:
    """``(lo, hi, units)``: the 95% bootstrap interval of ppl (``pe_research.stats``) over the
    scored windows, or over blocks of positions when there are fewer than ``min_windows``."""
    nll_U, weight_U, units = bootstrap.loss_units(
      np.array(self.nll_W), np.array(self.weight_W), self.nll_sum_L, self.weight_sum_L, min_windows
    )
    return (*bootstrap.ppl_interval(nll_U, weight_U), units)

  def accuracy_interval(self) -> tuple[float, float]:
    """The 95% bootstrap interval of the exact-match accuracy over examples."""
    return bootstrap.accuracy_interval(self.exact_W)

  def region_row(self) -> dict[str, float]:
    """``loss_inside``/``loss_beyond`` (nan where a region has no tokens) and token counts."""
    nll_R, weight_R = np.sum(self.nll_WxR, axis=0), np.sum(self.weight_WxR, axis=0)
    row = {}
    for r, region in enumerate(("inside", "beyond")):
      row[f"tokens_{region}"] = int(round(weight_R[r]))
      row[f"loss_{region}"] = float(nll_R[r] / weight_R[r]) if weight_R[r] else math.nan
    return row

  def lm_row(self, min_windows: int = bootstrap.MIN_UNITS) -> dict[str, float]:
    loss = self.loss
    ppl_lo, ppl_hi, units = self.ppl_interval(min_windows)
    return {
      "tokens": self.tokens,
      "loss": loss,
      "ppl": math.exp(loss) if loss < 700 else math.inf,
      "ppl_lo": ppl_lo,
      "ppl_hi": ppl_hi,
      "windows": len(self.weight_W),
      "interval_units": units,
      "bytes": int(round(self.scored_bytes)),
      "bits_per_byte": self.bits_per_byte,
      "seconds": self.seconds,
      "compile_seconds": self.compile_seconds,
    } | (self.region_row() if self.nll_WxR else {})


class Evaluator:
  """Scores batches with ``model`` (a :class:`Transformer` holding the trained parameters).

  ``attention="auto"`` follows :func:`eval_attention`: a dense model is scored blockwise
  from ``EVAL_BLOCKWISE_FROM`` on, or when ``dense_score_bytes`` exceeds
  ``dense_budget_bytes``; any other value forces that implementation at every length. Views
  share the parameters (``with_attention``). ``num_compiles`` counts the compiled programs;
  ``backend_compiles`` the XLA compilations measured while this evaluator scored (its programs
  plus any small helper computation).
  """

  def __init__(self, model: Transformer, *, attention: str = "auto", dense_budget_bytes=2**30):
    self.model = model
    self.attention = attention
    self.dense_budget_bytes = dense_budget_bytes
    self.num_heads = model.blocks[0].attn.num_heads
    self.params = nnx.state(model, nnx.Param)
    self._graphs: dict[str, tuple[nnx.GraphDef, nnx.State]] = {}
    self._programs: dict[tuple, jax.stages.Compiled] = {}
    self.backend_compiles = 0

  @property
  def num_compiles(self) -> int:
    return len(self._programs)

  def _plan(self, batch: int, length: int) -> tuple[str, int | None]:
    if self.attention != "auto":
      return self.attention, None
    too_big = dense_score_bytes(batch, self.num_heads, length) > self.dense_budget_bytes
    return eval_attention(self.model.attention, self.model.attention_block, length, too_big)

  def attention_for(self, batch: int, length: int) -> str:
    return self._plan(batch, length)[0]

  def _graph(self, plan: tuple[str, int | None]) -> tuple[nnx.GraphDef, nnx.State]:
    if plan not in self._graphs:
      graphdef, _, rest = nnx.split(with_attention(self.model, *plan), nnx.Param, ...)
      self._graphs[plan] = (graphdef, rest)
    return self._graphs[plan]

  def score(self, batch: Batch) -> tuple[dict[str, np.ndarray], float]:
    """Runs one batch; returns its stats as numpy and the seconds spent compiling."""
    batch = {name: np.asarray(batch[name], dtype) for name, dtype in _DTYPES.items()}
    size, length = batch["inputs"].shape
    plan = self._plan(size, length)
    graphdef, rest = self._graph(plan)
    key = (*plan, size, length)
    compile_seconds, before = 0.0, runtime.CompileCounter.count
    if key not in self._programs:
      start = time.perf_counter()
      step = jax.jit(_eval_step, static_argnums=0)
      self._programs[key] = step.lower(graphdef, self.params, rest, batch).compile()
      compile_seconds = time.perf_counter() - start
    stats, rest = self._programs[key](self.params, rest, batch)
    self._graphs[plan] = (graphdef, rest)  # RNG state advances (randomized positions)
    stats = jax.tree.map(np.asarray, stats)
    self.backend_compiles += runtime.CompileCounter.count - before
    return stats, compile_seconds

  def score_all(
    self,
    batches: Iterable[Batch],
    *,
    batch_size: int,
    desc: str,
    bytes_per_token_V: np.ndarray | None = None,
    split: int | None = None,
  ) -> Totals:
    """Scores every batch (short ones padded with zero-weight rows) with a progress bar.

    With ``bytes_per_token_V`` (int ``[V]``) also counts the scored UTF-8 bytes on the host,
    ``Σ w · bytes_per_token_V[targets]`` per batch (the compiled step is unchanged). With
    ``split``, each window's sums inside and beyond it (module docstring: regions).
    """
    totals = None
    start = time.perf_counter()
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in tqdm.tqdm(batches, desc=desc, total=total, unit="batch", leave=False):
      batch = pad_batch(batch, batch_size)
      stats, compile_seconds = self.score(batch)
      if totals is None:
        length = stats["nll_sum_L"].shape[0]
        totals = Totals(np.zeros(length, np.float64), np.zeros(length, np.float64))
      totals.nll_sum_L += stats["nll_sum_L"]
      totals.weight_sum_L += stats["weight_sum_L"]
      if bytes_per_token_V is not None:
        bytes_BxL = bytes_per_token_V[batch["targets"]]
        totals.scored_bytes += float(np.sum(batch["weights"] * bytes_BxL, dtype=np.float64))
      scored_B = stats["scored_B"] > 0
      totals.correct += int(np.sum(stats["exact_B"] & scored_B))
      totals.examples += int(np.sum(scored_B))
      totals.exact_W += stats["exact_B"][scored_B].tolist()
      totals.nll_W += stats["nll_sum_B"][scored_B].tolist()
      totals.weight_W += stats["scored_B"][scored_B].tolist()
      if split is not None:
        totals.nll_WxR += region_sums(stats["nll_BxL"][scored_B], split)
        totals.weight_WxR += region_sums(batch["weights"][scored_B], split)
      totals.compile_seconds += compile_seconds
      totals.attention = self.attention_for(batch_size, length)
    if totals is None:
      raise ValueError(f"{desc}: the evaluation data produced no batches")
    totals.seconds = time.perf_counter() - start - totals.compile_seconds
    return totals


def region_sums(x_BxL: np.ndarray, split: int) -> list[list[float]]:
  """Per row ``[Σ_{l < split} x, Σ_{l >= split} x]`` in float64."""
  x_BxL = np.asarray(x_BxL, np.float64)
  return np.stack([x_BxL[:, :split].sum(1), x_BxL[:, split:].sum(1)], axis=1).tolist()


def pad_batch(batch: Batch, batch_size: int) -> Batch:
  """Pads the batch axis to ``batch_size`` with zero rows (weight 0: scored nowhere)."""
  missing = batch_size - len(batch["inputs"])
  if missing < 0:
    raise ValueError(f"batch of {len(batch['inputs'])} rows exceeds batch_size={batch_size}")
  padded = {}
  for name, dtype in _DTYPES.items():
    value = np.asarray(batch[name], dtype)
    padded[name] = np.concatenate([value, np.zeros((missing, *value.shape[1:]), dtype)])
  return padded


def lm_sweep(
  evaluator: Evaluator,
  config,
  lengths: Sequence[int],
  *,
  mode: str = "nonoverlapping",
  stride: int | None = None,
  max_tokens: int | None = None,
  batch_size: int = 1,
  split: int | None = None,
) -> tuple[list[dict], dict[int, tuple[np.ndarray, np.ndarray]], dict[int, dict]]:
  """Loss/ppl/bits per byte at each length over one token budget (``data.make_eval_batches``),
  ``batch_size`` windows per call (0: ``eval_batch_size(length)``).

  Bytes are those of ``data.tokenizer``'s ``utf8_bytes_per_token`` (see the module docstring).
  Returns one row per length, per length ``(nll_sum_L, weight_sum_L)`` for the per-position
  diagnostic and, with ``split``, per length ``{"nll_WxR", "weight_WxR"}`` (the regions of the
  module docstring; ``{}`` without). Sliding mode uses ``stride`` (default ``length // 2``);
  non-overlapping rows report ``stride = length``. Synthetic data (``length`` = task length)
  adds ``seq_len``, ``examples`` and exact-match ``accuracy``.
  """
  synthetic = config.data.name == "synthetic"
  bytes_per_token_V = tokenizer_of(config.data).utf8_bytes_per_token()
  rows, per_position, per_window = [], {}, {}
  for length in lengths:
    step = length if mode != "sliding" else stride or max(1, length // 2)
    size = batch_size or eval_batch_size(length)
    batches = make_eval_batches(
      config,
      length=length,
      mode=mode,
      stride=step if mode == "sliding" else None,
      max_tokens=max_tokens,
      batch_size=size,
    )
    totals = evaluator.score_all(
      batches,
      batch_size=size,
      desc=f"length {length}",
      bytes_per_token_V=bytes_per_token_V,
      split=split,
    )
    row = {"length": length, "mode": mode, "stride": step, "attention": totals.attention}
    row |= totals.lm_row(min_windows=2 if mode == "documents" else bootstrap.MIN_UNITS)
    if mode == "documents":  # Which units the windows are, and why there are fewer if so.
      row |= {"units": ";".join(batches.windows.units), "units_note": batches.windows.note}
      if batches.windows.note:
        tqdm.tqdm.write(f"length {length:>7}: {batches.windows.note}")
    if synthetic:
      row |= {
        "seq_len": len(totals.nll_sum_L),
        "examples": totals.examples,
        "accuracy": totals.accuracy,
        **dict(zip(("accuracy_lo", "accuracy_hi"), totals.accuracy_interval(), strict=True)),
      }
    rows.append(row)
    per_position[length] = (totals.nll_sum_L, totals.weight_sum_L)
    if split is not None:
      per_window[length] = {"nll_WxR": totals.nll_WxR, "weight_WxR": totals.weight_WxR}
    tqdm.tqdm.write(
      f"length {length:>7}: loss {row['loss']:.4f}  ppl {row['ppl']:.3f}  "
      f"bits/byte {row['bits_per_byte']:.4f}  "
      f"({row['tokens']} tokens, {row['seconds']:.1f}s + {row['compile_seconds']:.1f}s compile)"
    )
  return rows, per_position, per_window


def passkey_sweep(
  evaluator: Evaluator,
  lengths: Sequence[int],
  depths: Sequence[float],
  *,
  trials: int,
  batch_size: int,
  encode: passkey.Encode,
  seed: int = 0,
  header: str = passkey.HEADER,
) -> tuple[list[dict], np.ndarray]:
  """Passkey accuracy (greedy exact match) on a ``len(lengths) × len(depths)`` grid of prompts
  that start with ``header`` (the positive control may drop it: ``passkey.control_header``)."""
  rows, accuracy_grid = [], np.zeros((len(lengths), len(depths)))
  for i, length in enumerate(lengths):
    size = batch_size or eval_batch_size(length)
    for j, depth in enumerate(depths):
      batches = passkey.make_batches(
        length, depth, trials=trials, batch_size=size, encode=encode, seed=seed, header=header
      )
      totals = evaluator.score_all(batches, batch_size=size, desc=f"passkey {length}@{depth}")
      accuracy_grid[i, j] = totals.accuracy
      lo, hi = totals.accuracy_interval()
      rows.append(
        {"length": length, "depth": depth, "trials": trials, "accuracy": totals.accuracy}
        | {"accuracy_lo": lo, "accuracy_hi": hi}
      )
    tqdm.tqdm.write(
      f"passkey {length:>7}: accuracy by depth {np.round(accuracy_grid[i], 2).tolist()}"
    )
  return rows, accuracy_grid
