"""Passkey retrieval prompts (Mohtashami & Jaggi 2023, "Landmark Attention").

A prompt of exactly ``length + 1`` tokens hides one needle sentence in repeated filler::

  HEADER + filler[:k] + "\\nThe pass key is 71432. Remember it. 71432 is the pass key.\\n"
         + filler[k:] + "\\nWhat is the pass key? The pass key is " + "71432"

with ``k = round(depth · F)``, F the filler budget in tokens, so depth 0 puts the needle
right after the header and depth 1 right before the question. The filler has no digits, so
the key appears only in the needle and the answer. The question and the key are encoded as
one text and split where its tokens first differ from those of the question alone, so the
answer is exactly the tokens the tokenizer gives the key in context: bytes ``"71432"``; a
byte-level BPE ``" 71432"`` when it merges the space into the number (``Ġ714 32``), else the
digits after a lone ``Ġ``. As a language-model batch,
``inputs = tokens[:-1]`` and ``targets = tokens[1:]`` (both ``length`` long) and the weights
are 1 exactly on the answer's targets.

Positive control: a model that cannot retrieve the key inside its training length says nothing
about retrieval beyond it. :func:`control_header` gives the prompt of a control at the training
length L (the full prompt when it fits, else the same prompt without HEADER: 103 bytes, so a
byte model trained at L = 128 has one), and :func:`control_verdict` the report line: unless
the model passes the control (every depth at accuracy >= 0.5), the grid is not evidence.

Scoring is greedy decoding, computed with one teacher-forced pass: greedy decoding
reproduces the answer iff at every answer position the argmax of the logits equals the
answer token given the correct prefix (induction over the answer's tokens). So an example
is correct iff ``argmax(logits) == targets`` wherever ``weights > 0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

HEADER = (
  "There is an important info hidden inside a lot of irrelevant text. "
  "Find it and memorize it. I will quiz you about the important information there.\n"
)
FILLER = (
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
QUESTION = "\nWhat is the pass key? The pass key is "
CONTROL_MIN_ACCURACY = 0.5  # The control passes when every depth reaches this accuracy.

Encode = Callable[[str], Sequence[int]]


def needle(key: int) -> str:
  return f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
  """One prompt. ``tokens``: int32 ``[length + 1]``; the answer is ``tokens[answer_start:]``;
  ``gap`` tokens of filler lie between the needle's end and the question."""

  tokens: np.ndarray
  key: int
  needle_start: int
  answer_start: int
  gap: int

  def as_batch_row(self) -> dict[str, np.ndarray]:
    """``inputs``/``targets`` int32 ``[length]``, ``weights`` float32 ``[length]``."""
    weights_L = np.zeros(len(self.tokens) - 1, np.float32)
    weights_L[self.answer_start - 1 :] = 1.0
    return {"inputs": self.tokens[:-1], "targets": self.tokens[1:], "weights": weights_L}


def _parts(key: int, encode: Encode, header: str = HEADER) -> tuple[np.ndarray, ...]:
  """(header, needle, question, answer) token arrays; question + answer = encode(Q + key)."""
  head, mark, alone, asked = (
    np.asarray(encode(text), np.int32)
    for text in (header, needle(key), QUESTION, QUESTION + str(key))
  )
  shared = min(len(alone), len(asked))
  split = int(np.argmin(np.append(alone[:shared] == asked[:shared], False)))  # First difference.
  return head, mark, asked[:split], asked[split:]


def min_length(encode: Encode, key: int = 99_999, header: str = HEADER) -> int:
  """The shortest model input (no filler) that holds a prompt for ``key`` after ``header``.

  Bytes: the same for every 5-digit key. A BPE tokenizer may split other keys into a few more
  or fewer tokens.
  """
  return sum(len(part) for part in _parts(key, encode, header)) - 1


def control_header(encode: Encode, train_len: int) -> str | None:
  """The header of the positive control, a prompt of exactly ``train_len`` tokens: HEADER when
  that prompt fits, else "" (needle, filler and question only); None when neither fits."""
  return next((h for h in (HEADER, "") if min_length(encode, header=h) <= train_len), None)


def control_verdict(rows: Sequence[dict], train_len: int) -> str:
  """The report line on the positive control's rows (``accuracy`` per depth at ``train_len``):
  the passkey grid is evidence only when every depth reaches ``CONTROL_MIN_ACCURACY``."""
  if not rows:
    return (
      f"no positive control: no passkey prompt fits inside the training length {train_len}, "
      "so the grid is not evidence"
    )
  worst = min(r["accuracy"] for r in rows)
  if worst >= CONTROL_MIN_ACCURACY:
    return (
      f"positive control passed (min accuracy {worst:.2f} at {train_len}): the grid is evidence"
    )
  return (
    f"positive control FAILED (min accuracy {worst:.2f} over depths at the training length "
    f"{train_len}): the grid is not evidence"
  )


def make_example(
  length: int,
  depth: float,
  key: int,
  encode: Encode,
  header: str = HEADER,
  haystack: np.ndarray | None = None,
) -> PasskeyExample:
  """The passkey prompt whose model input is exactly ``length`` tokens (see module doc); with
  ``haystack`` (int32 tokens of a real text, at least the filler budget) its first tokens
  stand in for the repeated filler."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"passkey depth={depth} must be in [0, 1]")
  if key < 0:
    raise ValueError(f"passkey key={key} must be a non-negative integer")
  head, mark, question, answer = _parts(key, encode, header)
  budget = length - min_length(encode, key, header)
  if budget < 0:
    raise ValueError(f"passkey length={length} is too short: at least {length - budget} needed")
  if haystack is None:
    unit = np.asarray(encode(FILLER), np.int32)
    filler = np.tile(unit, budget // len(unit) + 1)[:budget]
  elif len(haystack) < budget:
    raise ValueError(f"haystack of {len(haystack)} tokens is shorter than the {budget} needed")
  else:
    filler = np.asarray(haystack[:budget], np.int32)
  k = round(depth * budget)
  tokens = np.concatenate([head, filler[:k], mark, filler[k:], question, answer])
  return PasskeyExample(
    tokens=tokens,
    key=key,
    needle_start=len(head) + k,
    answer_start=len(tokens) - len(answer),
    gap=budget - k,
  )


def make_batches(
  length: int,
  depth: float,
  *,
  trials: int,
  batch_size: int,
  encode: Encode,
  seed: int = 0,
  header: str = HEADER,
) -> list[dict[str, np.ndarray]]:
  """``trials`` prompts with random 5-digit keys, stacked into batches of ``batch_size``.

  The last batch is padded with zero-weight rows so every batch has one shape (one compiled
  program per length). Keys depend only on ``(seed, length, depth)``.
  """
  rng = np.random.default_rng([seed, length, round(depth * 1000)])
  rows = [
    make_example(length, depth, int(rng.integers(10_000, 100_000)), encode, header).as_batch_row()
    for _ in range(trials)
  ]
  return stack_rows(rows, batch_size)


def stack_rows(rows: Sequence[dict[str, np.ndarray]], batch_size: int) -> list[dict]:
  """Prompt rows (``as_batch_row``) stacked into batches of ``batch_size``, the last padded
  with zero-weight rows."""
  pad = {name: np.zeros_like(value) for name, value in rows[0].items()}
  rows = [*rows, *[pad] * (-len(rows) % batch_size)]
  return [
    {name: np.stack([r[name] for r in rows[i : i + batch_size]]) for name in pad}
    for i in range(0, len(rows), batch_size)
  ]


def parse_depths(text: str) -> Sequence[float]:
  """``"0,0.5,1"`` -> ``(0.0, 0.5, 1.0)``; each depth must lie in [0, 1]."""
  error = ValueError(f"--passkey_depths={text!r} must be comma-separated numbers in [0, 1]")
  try:
    depths = tuple(float(d) for d in text.split(","))
  except ValueError:
    raise error from None
  if not all(0.0 <= d <= 1.0 for d in depths):
    raise error
  return depths
