"""grain pipelines: the checkpointable training stream and the evaluation windows.

Training on a corpus: the packed train stream (``documents.PackedStream``) of ``N`` tokens
is cut into ``⌊N / W⌋`` windows of ``W = seq_len + 1`` tokens, ``window_i = s[iW, (i+1)W)``;
inputs ``window[:-1]``, targets ``window[1:]``, weights 1. Windows are shuffled by
``config.seed`` with a different permutation each epoch, repeated forever; process ``p`` of
``P`` takes global elements ``p, p+P, p+2P, ...`` and batches them ``batch_size // P`` at a
time, so the P processes together see global batches independent of ``P``. Tokens are those of
``data.tokenizer`` (bytes or a HF ``tokenizer.json``, ``tokenizer.make_tokenizer``).

Evaluation on a corpus scores the budget of ``N`` targets ``s[1..N]`` of the packed
validation stream ``s`` at length ``L``; window ``k`` has inputs ``s[a_k, a_k + L)`` and
scores position ``i`` iff ``i >= c_k`` and ``a_k + i < N`` (target ``s[a_k+i+1]``):

  nonoverlapping  a_k = kL, c_k = 0,                          k < ⌈N / L⌉
  sliding (S)     a_0 = 0, c_0 = 0;  a_k = kS, c_k = L - S,   k < 1 + ⌈max(0, N - L) / S⌉

so each budgeted target is scored exactly once, ``Σ weights = N``, and every length scores
the same tokens (Press et al. 2022, ALiBi, §4). Stride ``S = L`` reproduces nonoverlapping.

  documents       ``⌈N / L⌉`` windows, each the first ``L + 1`` tokens of one unit (a document
                  or a stated series, ``long_windows``), every position scored; fewer when the
                  split has fewer long units (``DocumentBatches.windows.note`` says so)

Evaluation reads split ``data.eval_split`` ("validation" unless set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grain
import numpy as np

from pe_research.data import batching, synthetic
from pe_research.data.documents import PackedStream, check_dataset, open_documents
from pe_research.data.long_windows import LongWindows, long_windows
from pe_research.data.tokenizer import PAD_ID, tokenizer_of

# In-process reading with a few threads beats worker processes on a 2-core machine.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=256)
MODES = ("nonoverlapping", "sliding", "documents")


class _Windows(Sequence):
  """The ``⌊N / W⌋`` non-overlapping windows of ``W`` tokens of a packed stream."""

  def __init__(self, stream: PackedStream, width: int):
    self.stream, self.width = stream, width

  def __len__(self) -> int:
    return self.stream.num_tokens // self.width

  def __getitem__(self, i: int) -> np.ndarray:
    return self.stream.slice(i * self.width, (i + 1) * self.width)


def _lm_train_dataset(config) -> grain.MapDataset:
  seq_len = config.train.seq_len
  stream = PackedStream(open_documents(config.data, "train", tokenizer_of(config.data)))
  windows = _Windows(stream, seq_len + 1)
  if not len(windows):
    raise ValueError(
      f"train.seq_len={seq_len} needs {seq_len + 1} tokens per window; the train split of "
      f"{config.data.name} has only {stream.num_tokens}"
    )
  source = grain.MapDataset.source(windows).shuffle(seed=config.seed % 2**32).repeat()
  return source.map(batching.lm_example)


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1):
  """This process's infinite training batches ``[batch_size // process_count, seq_len]``.

  Returns a grain ``DatasetIterator``: ``next(it)`` gives ``{"inputs", "targets", "weights"}``
  numpy arrays; ``it.get_state()`` is a JSON-serialisable dict and ``it.set_state(state)``
  resumes with exactly the batch that followed it.
  """
  check_dataset(config.data.name)
  batch_size = config.train.batch_size
  if batch_size % process_count or not 0 <= process_index < process_count:
    raise ValueError(
      f"train.batch_size={batch_size} must be divisible by process_count={process_count} "
      f"(process_index={process_index})"
    )
  if config.data.name == "synthetic":
    ds = synthetic.train_dataset(config.data, seq_len=config.train.seq_len, seed=config.seed)
  else:
    ds = _lm_train_dataset(config)
  ds = ds[process_index::process_count].to_iter_dataset(READ_OPTIONS)
  return iter(ds.batch(batch_size // process_count, drop_remainder=True))


def eval_windows(
  budget: int, length: int, mode: str = "nonoverlapping", stride: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Window starts ``a_W`` and first scored positions ``c_W`` (see the module docstring)."""
  if mode not in MODES[:2]:
    raise ValueError(f"mode must be one of {', '.join(MODES[:2])}; got {mode!r}")
  if length < 1 or budget < 1:
    raise ValueError(f"length and the token budget must be >= 1; got {length}, {budget}")
  if mode == "nonoverlapping":
    if stride is not None:
      raise ValueError(f"stride is only for mode='sliding'; got stride={stride}")
    starts_W = np.arange(0, budget, length)
    return starts_W, np.zeros_like(starts_W)
  stride = max(1, length // 2) if stride is None else stride
  if not 1 <= stride <= length:
    raise ValueError(f"stride must lie in [1, length={length}]; got {stride}")
  num_windows = 1 + math.ceil(max(0, budget - length) / stride)
  starts_W = np.arange(num_windows) * stride
  score_from_W = np.where(starts_W == 0, 0, length - stride)
  return starts_W, score_from_W


class EvalBatches(Sequence):
  """Batches ``[batch_size, L]`` of evaluation windows over ``tokens`` (budget + 1 tokens)."""

  def __init__(self, tokens, length: int, starts_W, score_from_W, batch_size: int):
    self.budget = len(tokens) - 1
    self.length, self.batch_size = length, batch_size
    self.tokens = np.concatenate([tokens, np.full(length, PAD_ID, np.int32)])
    self.starts_W, self.score_from_W = starts_W, score_from_W

  def __len__(self) -> int:
    return math.ceil(len(self.starts_W) / self.batch_size)

  def __getitem__(self, j: int) -> batching.Example:
    if not 0 <= j < len(self):
      raise IndexError(j)
    rows = []
    for k in range(j * self.batch_size, min(len(self.starts_W), (j + 1) * self.batch_size)):
      a = int(self.starts_W[k])
      example = batching.lm_example(self.tokens[a : a + self.length + 1])
      example["weights"][: self.score_from_W[k]] = 0.0
      example["weights"][max(0, self.budget - a) :] = 0.0
      rows.append(example)
    return batching.stack(rows, self.batch_size)


class DocumentBatches(Sequence):
  """Batches ``[batch_size, L]`` of ``windows`` (one unit each, every position scored)."""

  def __init__(self, windows: LongWindows, batch_size: int):
    self.windows, self.batch_size = windows, batch_size

  def __len__(self) -> int:
    return math.ceil(len(self.windows.windows) / self.batch_size)

  def __getitem__(self, j: int) -> batching.Example:
    if not 0 <= j < len(self):
      raise IndexError(j)
    rows = self.windows.windows[j * self.batch_size : (j + 1) * self.batch_size]
    return batching.stack([batching.lm_example(w.tokens) for w in rows], self.batch_size)


def make_eval_batches(
  config,
  *,
  length: int,
  mode: str = "nonoverlapping",
  stride: int | None = None,
  max_tokens: int | None = None,
  batch_size: int = 1,
) -> Sequence[batching.Example]:
  """Evaluation batches at ``length`` over a budget of ``max_tokens or data.eval_tokens``.

  Corpora: windows of the packed validation stream as in the module docstring; sliding
  mode defaults to ``stride = length // 2``; documents mode (no stride) raises ValueError with
  the note when the split has no unit that long. Synthetic data: ``length`` is the task length
  ``n``; batches ``[batch_size, synthetic.sequence_length(task, n)]`` of
  ``max(1, budget // sequence_length)`` fixed examples (mode and stride do not apply).
  """
  check_dataset(config.data.name)
  budget = max_tokens or config.data.eval_tokens
  if mode not in MODES:
    raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}")
  if config.data.name == "synthetic":
    if mode != "nonoverlapping" or stride is not None:
      raise ValueError("synthetic data has no sliding windows: use mode='nonoverlapping'")
    return synthetic.eval_batches(
      config.data, length=length, max_tokens=budget, batch_size=batch_size
    )
  split = config.data.get("eval_split", "validation")
  if mode == "documents":
    if stride is not None:
      raise ValueError(f"stride is only for mode='sliding'; got stride={stride}")
    found = long_windows(
      config.data, tokenizer_of(config.data), length, math.ceil(budget / length), split
    )
    if not found.windows:
      raise ValueError(f"no evaluation window at length {length}: {found.note}")
    return DocumentBatches(found, batch_size)
  starts_W, score_from_W = eval_windows(budget, length, mode, stride)
  stream = PackedStream(open_documents(config.data, split, tokenizer_of(config.data)))
  if stream.num_tokens < budget + 1:
    raise ValueError(
      f"data.eval_tokens={budget} exceeds the {split} split of {config.data.name} "
      f"({stream.num_tokens} tokens, budget + 1 needed)"
    )
  return EvalBatches(stream.slice(0, budget + 1), length, starts_W, score_from_W, batch_size)
