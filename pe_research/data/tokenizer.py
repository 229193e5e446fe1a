"""Tokenizers behind one small interface: bytes, or any HF ``tokenizers`` ``tokenizer.json``.

Byte ids: ``0..255`` are the raw bytes, then ``PAD_ID=256`` (padding, never scored),
``BOS_ID=257`` (start of a synthetic example), ``EOS_ID=258`` (end of a document or answer),
``SEP_ID=259`` (prompt/answer separator in synthetic tasks); ``vocab_size = 260``.

``make_tokenizer(data.tokenizer)`` gives the byte tokenizer for ``"bytes"`` and an
:class:`HFTokenizer` for the path of a ``tokenizer.json`` (e.g. SmolLM2's BPE, V = 49152).
Every tokenizer states how many UTF-8 bytes each id stands for, ``utf8_bytes_per_token()[v]``,
so byte and BPE models are compared in bits per byte of the same text (``eval_lib``).
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import re

import numpy as np

NUM_BYTES = 256
PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
SEP_ID = 259
VOCAB_SIZE = 260
# Special tokens that end a text (first found wins) and that start one, across common models.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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
    """Returns the ids of ``text`` (str is UTF-8 encoded first): int32 ``[N]``."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Returns the text of ``ids``; special ids are shown as ``<pad>``, ``<eos>``, ..."""

  @abc.abstractmethod
  def utf8_bytes_per_token(self) -> np.ndarray:
    """int64 ``[vocab_size]``: the UTF-8 bytes of text each id decodes to (specials: 0)."""


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
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = ids_N[(ids_N < 0) | (ids_N >= VOCAB_SIZE)]
    if bad.size:
      raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}), got {int(bad[0])}")
    parts, run = [], bytearray()
    for i in ids_N.tolist():
      if i < NUM_BYTES:
        run.append(i)
        continue
      parts += [run.decode("utf-8", errors="replace"), self._SPECIALS[i]]
      run = bytearray()
    parts.append(run.decode("utf-8", errors="replace"))
    return "".join(parts)

  def utf8_bytes_per_token(self) -> np.ndarray:
    """1 for the byte ids ``0..255``, 0 for PAD/BOS/EOS/SEP."""
    return (np.arange(VOCAB_SIZE) < NUM_BYTES).astype(np.int64)


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level BPE alphabet inverted: printable character -> the byte it stands for.

  Printable Latin-1 bytes (``!..~``, ``¡..¬``, ``®..ÿ``) stand for themselves; the other 68
  bytes ``b_n`` (in byte order) are written ``chr(256 + n)``, e.g. space (0x20) is ``Ġ``.
  """
  printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  others = [b for b in range(NUM_BYTES) if b not in printable]
  return {chr(b): b for b in printable} | {chr(NUM_BYTES + n): b for n, b in enumerate(others)}


def _is_byte_level(component: dict | None) -> bool:
  """Whether a tokenizer.json decoder (possibly a ``Sequence``) includes ``ByteLevel``."""
  if not component:
    return False
  parts = component.get("decoders") or [component]
  return any(part.get("type") == "ByteLevel" for part in parts)


class HFTokenizer(Tokenizer):
  """A HF ``tokenizers`` ``tokenizer.json``: BPE, Unigram, ... (no special tokens added).

  ``eos_id`` is the first of :data:`EOS_TOKENS` in the vocabulary (else the lowest-id special
  token); ``pad_id = eos_id`` (padding has weight 0, so its id is never scored); ``bos_id`` is
  the first of :data:`BOS_TOKENS` (else ``eos_id``, GPT-2's convention). There is no separator:
  synthetic tasks are byte tasks (``sep_id`` raises ValueError).
  """

  def __init__(self, path: str):
    import tokenizers

    with open(path, "rb") as f:
      data = f.read()
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
      spec = json.loads(data)
    except Exception as e:  # The Rust loader raises a bare Exception.
      reason = " ".join(str(e).split())
      raise ValueError(f"{path} is not a tokenizers tokenizer.json: {reason}") from None
    self.path = path
    vocab = self._tokenizer.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    self.name = f"hf{self.vocab_size}-{hashlib.sha256(data).hexdigest()[:12]}"
    added = self._tokenizer.get_added_tokens_decoder()
    specials = sorted(i for i, token in added.items() if token.special)
    eos = [vocab[t] for t in EOS_TOKENS if t in vocab] + specials
    if not eos:
      raise ValueError(f"{path} has no end-of-text token; allowed: one of {', '.join(EOS_TOKENS)}")
    self.eos_id = self.pad_id = eos[0]
    self.bos_id = next((vocab[t] for t in BOS_TOKENS if t in vocab), self.eos_id)
    self._bytes_V = self._count_bytes(vocab, set(added), _is_byte_level(spec.get("decoder")))

  @property
  def sep_id(self) -> int:
    raise ValueError(f"{self.name} has no separator id; synthetic tasks need the byte tokenizer")

  def encode(self, text: str | bytes) -> np.ndarray:
    if not isinstance(text, str):
      text = bytes(text).decode("utf-8", errors="replace")
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = ids_N[(ids_N < 0) | (ids_N >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {int(bad[0])}")
    return self._tokenizer.decode(ids_N.tolist(), skip_special_tokens=False)

  def utf8_bytes_per_token(self) -> np.ndarray:
    """Byte-level vocabularies: exact (``len`` of the token's byte string, by
    :func:`byte_level_alphabet`). Others: ``<0xNN>`` byte-fallback tokens 1, any other token
    the UTF-8 length of its piece with SentencePiece's ``▁`` read as a space. Added and special
    tokens (EOS included) 0."""
    return self._bytes_V.copy()

  def _count_bytes(self, vocab: dict[str, int], added: set[int], byte_level: bool) -> np.ndarray:
    alphabet = byte_level_alphabet()
    bytes_V = np.zeros(self.vocab_size, np.int64)
    for piece, i in vocab.items():
      if i in added:
        continue
      if byte_level and all(c in alphabet for c in piece):
        bytes_V[i] = len(piece)  # One alphabet character per byte.
      elif _BYTE_FALLBACK.fullmatch(piece):
        bytes_V[i] = 1
      else:
        bytes_V[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return bytes_V


@functools.cache
def make_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer of ``data.tokenizer``: ``"bytes"`` or the path of a ``tokenizer.json``.

  One object per spec and process, so caches keyed by the tokenizer (opened documents) hit.
  Raises ValueError when the file is missing or does not load.
  """
  if spec == "bytes":
    return ByteTokenizer()
  try:
    return HFTokenizer(spec)
  except OSError as e:
    raise ValueError(f"cannot read tokenizer file {spec!r}: {e.strerror}") from None


def tokenizer_of(data_cfg) -> Tokenizer:
  """``make_tokenizer(data.tokenizer)``; runs recorded before the field existed are bytes."""
  return make_tokenizer(data_cfg.get("tokenizer", "bytes"))
