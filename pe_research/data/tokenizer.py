"""Tokenizers: bytes (256 ids) plus four special ids, behind a small interface.

Byte ids: ``0..255`` are the raw bytes, then ``PAD_ID=256`` (padding, never scored),
``BOS_ID=257`` (start of a synthetic example), ``EOS_ID=258`` (end of a document or answer),
``SEP_ID=259`` (prompt/answer separator in synthetic tasks); ``vocab_size = 260``.
A SentencePiece tokenizer would implement the same :class:`Tokenizer` interface.
"""

from __future__ import annotations

import abc

import numpy as np

NUM_BYTES = 256
PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
SEP_ID = 259
VOCAB_SIZE = 260


class Tokenizer(abc.ABC):
  """Text <-> int32 ids. ``name`` keys caches of per-document token counts."""

  name: str
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  sep_id: int

  @abc.abstractmethod
  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns the ids of ``text`` (str is UTF-8 encoded first): int32 ``[T]``."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Returns the text of ``ids``; special ids are shown as ``<pad>``, ``<eos>``, ..."""


class ByteTokenizer(Tokenizer):
  """One id per byte: ``encode(b) = list(b)``; ``decode`` replaces invalid UTF-8."""

  name = "bytes"
  vocab_size = VOCAB_SIZE
  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  sep_id = SEP_ID
  _SPECIALS = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>", SEP_ID: "<sep>"}

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids_T = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = ids_T[(ids_T < 0) | (ids_T >= VOCAB_SIZE)]
    if bad.size:
      raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}), got {int(bad[0])}")
    parts, run = [], bytearray()
    for i in ids_T.tolist():
      if i < NUM_BYTES:
        run.append(i)
        continue
      parts += [run.decode("utf-8", errors="replace"), self._SPECIALS[i]]
      run = bytearray()
    parts.append(run.decode("utf-8", errors="replace"))
    return "".join(parts)
