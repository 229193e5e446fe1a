"""Examples and batches: ``{"inputs": int32[L], "targets": int32[L], "weights": float32[L]}``.

Padding is ``PAD_ID`` in inputs and targets with weight 0, so it is never scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pe_research.data.tokenizer import PAD_ID

Example = dict[str, np.ndarray]


def lm_example(window: np.ndarray) -> Example:
  """Next-token example from ``window`` (``L + 1`` tokens): inputs ``[:-1]``, targets ``[1:]``."""
  window = np.asarray(window, np.int32)
  return {
    "inputs": window[:-1],
    "targets": window[1:],
    "weights": np.ones(len(window) - 1, np.float32),
  }


def padded(example: Example, length: int) -> Example:
  """``example`` right-padded to ``length`` positions (PAD tokens, weight 0)."""
  missing = length - len(example["inputs"])
  if missing < 0:
    raise ValueError(f"example of {len(example['inputs'])} tokens exceeds length {length}")
  return {
    "inputs": np.pad(example["inputs"], (0, missing), constant_values=PAD_ID),
    "targets": np.pad(example["targets"], (0, missing), constant_values=PAD_ID),
    "weights": np.pad(example["weights"], (0, missing)),
  }


def stack(examples: Sequence[Example], batch_size: int) -> Example:
  """Stacks equal-length examples into ``[batch_size, L]``; missing rows are all padding."""
  if not 0 < len(examples) <= batch_size:
    raise ValueError(f"need 1..{batch_size} examples for a batch, got {len(examples)}")
  length = len(examples[0]["inputs"])
  batch = {
    "inputs": np.full((batch_size, length), PAD_ID, np.int32),
    "targets": np.full((batch_size, length), PAD_ID, np.int32),
    "weights": np.zeros((batch_size, length), np.float32),
  }
  for row, example in enumerate(examples):
    for key, value in example.items():
      batch[key][row] = value
  return batch
