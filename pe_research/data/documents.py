"""Opening a corpus split as token documents, and the packed stream they form.

The packed stream of a split is ``d_0 EOS d_1 EOS ... d_{K-1} EOS`` over its non-empty
documents in stored order (empty ones are skipped; short ones are kept). Document ``k``
with ``n_k`` tokens ends at ``ends[k] = Σ_{j<=k} (n_j + 1)``, so any slice of the stream
is read from the one or few documents it overlaps.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
from absl import logging

from pe_research.data import builders
from pe_research.data.catalog import CATALOG, catalog_source, prepared_version
from pe_research.data.tokenizer import Tokenizer

LOCAL_DATASETS = ("pystdlib", "sotu", "local_text")
DATASETS = (*LOCAL_DATASETS, *CATALOG, "synthetic")


def dataset_names() -> tuple[str, ...]:
  """Every value ``data.name`` accepts."""
  return DATASETS


def check_dataset(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(f"data.name must be one of {', '.join(DATASETS)}; got {name!r}")


def _local_builder(name: str, data_dir: str, local_dir: str):
  if name == "pystdlib":
    return builders.pystdlib_builder(data_dir)
  if name == "sotu":
    return builders.sotu_builder(data_dir)
  return builders.local_text_builder(data_dir, local_dir)


def prepare(data_cfg) -> str:
  """Prepares pystdlib/sotu/local_text (no-op if present); returns the prepared directory.

  A catalog dataset is only checked (it is never downloaded here): ValueError with the
  command that prepares it when it is missing. Synthetic data needs nothing: returns "".
  """
  check_dataset(data_cfg.name)
  if data_cfg.name in CATALOG:
    version = prepared_version(data_cfg.name, data_cfg.data_dir)
    return os.path.join(data_cfg.data_dir, CATALOG[data_cfg.name].tfds_name, version)
  if data_cfg.name == "synthetic":
    return ""
  builder = _local_builder(data_cfg.name, data_cfg.data_dir, data_cfg.local_dir)
  builders.ensure_prepared(builder)
  return os.fspath(builder.data_dir)


def _record_source(name: str, data_dir: str, local_dir: str, auto_prepare: bool, split: str):
  """(random-access records of ``split``, the record key holding the text)."""
  if name in CATALOG:
    return catalog_source(name, data_dir, split), CATALOG[name].text_key
  builder = _local_builder(name, data_dir, local_dir)
  if not builder.is_prepared():
    if not auto_prepare:
      raise ValueError(
        f"dataset {name} is not prepared in data_dir={data_dir} (data.auto_prepare=False); run: "
        f"python -m pe_research.data prepare --dataset={name} --data_dir={data_dir} "
        f"--local_dir={local_dir}"
      )
    builders.ensure_prepared(builder)
    # Another process may have prepared it while this one waited on the lock: a builder made
    # before that has no splits, so read the prepared dataset's info afresh.
    builder = _local_builder(name, data_dir, local_dir)
  return builder.as_data_source(split), "text"


class Documents:
  """The non-empty documents of one split as int32 token arrays; ``lengths[k]`` = n_k."""

  def __init__(self, records, text_key: str, tokenizer: Tokenizer, split: str):
    self._records = records
    self._text_key = text_key
    self.tokenizer = tokenizer
    counts = self._cached_counts(split)
    self._record_ids = np.flatnonzero(counts > 0)
    self.lengths = counts[self._record_ids]

  def __len__(self) -> int:
    return len(self._record_ids)

  def __getitem__(self, k: int) -> np.ndarray:
    return self.tokenizer.encode(self._records[int(self._record_ids[k])][self._text_key])

  @functools.cache  # noqa: B019 (one Documents per split and process, see _open)
  def names(self) -> list[str]:
    """Each document's name: its relative path (local corpora), else ``"record <index>"``."""
    names = []
    for i in self._record_ids:
      path = self._records[int(i)].get("path")
      names.append(path.decode() if isinstance(path, bytes) else path or f"record {i}")
    return names

  def _cached_counts(self, split: str) -> np.ndarray:
    """Token counts of all records, cached beside a prepared TFDS dataset when writable."""
    info = getattr(self._records, "dataset_info", None)
    path = info and os.path.join(
      os.fspath(info.data_dir),
      f"pe_research-{split}-{self.tokenizer.name}-{len(self._records)}-lengths.npy",
    )
    if path and os.path.isfile(path):
      return np.load(path)
    start = time.perf_counter()
    counts = np.array(
      [len(self.tokenizer.encode(r[self._text_key])) for r in self._records], np.int64
    )
    logging.info(
      "Counted %d tokens of %s in %.1fs", counts.sum(), split, time.perf_counter() - start
    )
    if path:
      try:
        np.save(path + ".tmp.npy", counts)
        os.replace(path + ".tmp.npy", path)
      except OSError as e:
        logging.warning("Cannot cache document lengths at %s: %s", path, e)
    return counts


@functools.lru_cache(maxsize=8)
def _open(name, data_dir, local_dir, auto_prepare, split, tokenizer) -> Documents:
  records, text_key = _record_source(name, data_dir, local_dir, auto_prepare, split)
  return Documents(records, text_key, tokenizer, split)


def open_documents(data_cfg, split: str, tokenizer: Tokenizer) -> Documents:
  """The documents of ``split`` ("train"/"validation"); opened once per process and split."""
  check_dataset(data_cfg.name)
  if data_cfg.name == "synthetic":
    raise ValueError("data.name=synthetic has no documents; it generates examples instead")
  data_dir = os.path.abspath(data_cfg.data_dir)
  local_dir = os.path.abspath(data_cfg.local_dir) if data_cfg.local_dir else ""
  return _open(data_cfg.name, data_dir, local_dir, bool(data_cfg.auto_prepare), split, tokenizer)


class PackedStream:
  """Random access to the packed stream ``d_0 EOS d_1 EOS ...`` of ``docs``."""

  def __init__(self, docs: Documents):
    self.docs = docs
    self.ends = np.cumsum(docs.lengths + 1)
    self.num_tokens = int(self.ends[-1]) if len(docs) else 0

  def slice(self, start: int, stop: int) -> np.ndarray:
    """Tokens ``[start, stop)`` of the stream: int32 ``[stop - start]``."""
    if not 0 <= start <= stop <= self.num_tokens:
      raise IndexError(f"slice [{start}, {stop}) outside the stream of {self.num_tokens}")
    pieces = []
    k = int(np.searchsorted(self.ends, start, side="right"))
    while start < stop:
      doc_start = int(self.ends[k]) - int(self.docs.lengths[k]) - 1
      end = min(stop, int(self.ends[k]))
      pieces.append(self.docs[k][start - doc_start : end - doc_start])
      if end == self.ends[k]:  # The slice reaches the EOS that closes document k.
        pieces.append(np.array([self.docs.tokenizer.eos_id], np.int32))
      start, k = end, k + 1
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
