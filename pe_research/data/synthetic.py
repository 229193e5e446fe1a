"""Algorithmic length-generalisation tasks, generated from a seed with no files.

An example of task length ``n`` is the byte sequence ``BOS prompt SEP answer EOS``; the
model reads ``inputs = seq[:-1]``, predicts ``targets = seq[1:]``, and the loss mask
``weights`` is 1 exactly where the target is an answer token or the final EOS:

  copy                x ∈ {a..z}^n                  -> x
  reverse             x ∈ {a..z}^n                  -> x reversed
  sort                x ∈ {a..z}^n                  -> x sorted by byte value
  addition            a "+" b, a, b ∈ {0..9}^n       -> a + b as n+1 digits; every number is
                      written least-significant digit first (the carry flows left to right)
  parity              x ∈ {0,1}^n                   -> "1" if x has an odd number of ones else "0"
  associative_recall  k_1 v_1 ... k_n v_n q          -> v_j where q = k_j; keys are distinct
                      printable non-digit ASCII (n <= 84), values are digits
  passkey             n letters with a 5-digit key inserted at a random place -> the key

Training examples draw ``n ~ U[train_min_len, train_max_len]`` with the generator seeded
by ``(seed, index)``; evaluation examples use a fixed seed ``(EVAL_SEED, n, index)``, the
same for every run, so models are compared on identical examples.
"""

from __future__ import annotations

import string
import sys

import grain
import numpy as np

from pe_research.data import batching
from pe_research.data.tokenizer import BOS_ID, EOS_ID, SEP_ID

EVAL_SEED = 20240101
PASSKEY_DIGITS = 5
_LETTERS = np.frombuffer(string.ascii_lowercase.encode(), np.uint8)
_DIGITS = np.frombuffer(string.digits.encode(), np.uint8)
_KEYS = np.array([c for c in range(33, 127) if not chr(c).isdigit()], np.uint8)


def _copy(rng, n):
  x = rng.choice(_LETTERS, n)
  return x, x


def _reverse(rng, n):
  x = rng.choice(_LETTERS, n)
  return x, x[::-1]


def _sort(rng, n):
  x = rng.choice(_LETTERS, n)
  return x, np.sort(x)


def _digits_lsb_first(value: int, width: int) -> np.ndarray:
  return np.frombuffer(str(value).zfill(width)[::-1].encode(), np.uint8)


def _addition(rng, n):
  a, b = (int("".join(map(str, rng.integers(0, 10, n)))) for _ in range(2))
  prompt = np.concatenate([_digits_lsb_first(a, n), [ord("+")], _digits_lsb_first(b, n)])
  return prompt, _digits_lsb_first(a + b, n + 1)


def _parity(rng, n):
  bits = rng.integers(0, 2, n)
  return (bits + ord("0")).astype(np.uint8), np.array([ord("0") + bits.sum() % 2], np.uint8)


def _associative_recall(rng, n):
  if n > len(_KEYS):
    raise ValueError(f"associative_recall has {len(_KEYS)} distinct keys; task length {n} > that")
  keys, values = rng.choice(_KEYS, n, replace=False), rng.choice(_DIGITS, n)
  j = rng.integers(n)
  pairs = np.stack([keys, values], axis=1).reshape(-1)
  return np.append(pairs, keys[j]), values[j : j + 1]


def _passkey(rng, n):
  key, filler = rng.choice(_DIGITS, PASSKEY_DIGITS), rng.choice(_LETTERS, n)
  at = rng.integers(n + 1)
  return np.concatenate([filler[:at], key, filler[at:]]), key


TASKS = {
  "copy": _copy,
  "reverse": _reverse,
  "sort": _sort,
  "addition": _addition,
  "parity": _parity,
  "associative_recall": _associative_recall,
  "passkey": _passkey,
}


def task_names() -> tuple[str, ...]:
  """Every value ``data.task`` accepts."""
  return tuple(TASKS)


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"data.task must be one of {', '.join(TASKS)}; got {task!r}")


def make_example(task: str, n: int, rng: np.random.Generator) -> batching.Example:
  """One example of task length ``n``: arrays of ``sequence_length(task, n)`` positions."""
  _check_task(task)
  if n < 1:
    raise ValueError(f"task length must be >= 1, got {n}")
  prompt, answer = TASKS[task](rng, n)
  seq = np.concatenate([[BOS_ID], prompt, [SEP_ID], answer, [EOS_ID]]).astype(np.int32)
  example = batching.lm_example(seq)
  example["weights"][: len(prompt) + 1] = 0.0  # Targets before the first answer token.
  return example


def sequence_length(task: str, n: int) -> int:
  """Positions of an example of task length ``n`` (e.g. copy: 2n + 2)."""
  return len(make_example(task, n, np.random.default_rng(0))["inputs"])


def train_dataset(data_cfg, *, seq_len: int, seed: int) -> grain.MapDataset:
  """Infinite training examples padded to ``seq_len``; element ``i`` depends on (seed, i)."""
  _check_task(data_cfg.task)
  lo, hi = data_cfg.train_min_len, data_cfg.train_max_len
  if not 1 <= lo <= hi:
    raise ValueError(f"data.train_min_len..train_max_len must satisfy 1 <= min <= max: {lo}..{hi}")
  needed = sequence_length(data_cfg.task, hi)
  if seq_len < needed:
    raise ValueError(
      f"train.seq_len={seq_len} is too short for {data_cfg.task} of length "
      f"data.train_max_len={hi}: needs >= {needed}"
    )

  def example(index: int) -> batching.Example:
    rng = np.random.default_rng([seed % 2**32, index])
    return batching.padded(make_example(data_cfg.task, int(rng.integers(lo, hi + 1)), rng), seq_len)

  return grain.MapDataset.range(sys.maxsize).map(example)


def eval_batches(data_cfg, *, length: int, max_tokens: int, batch_size: int):
  """Batches of ``max(1, max_tokens // L)`` examples of task length ``length`` (``L`` positions
  each: ``[batch_size, L]``, the last batch padded with weight-0 rows)."""
  _check_task(data_cfg.task)
  count = max(1, max_tokens // sequence_length(data_cfg.task, length))
  examples = [
    make_example(data_cfg.task, length, np.random.default_rng([EVAL_SEED, length, i]))
    for i in range(count)
  ]
  return [
    batching.stack(examples[i : i + batch_size], batch_size) for i in range(0, count, batch_size)
  ]
