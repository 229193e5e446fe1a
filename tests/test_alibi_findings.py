"""The ALiBi-figure verdicts on made-up rows: ones that match, fail, or are not separated."""

import pytest

from experiments import alibi_train_short_test_long as alibi

LENGTHS = (128, 256, 512, 1024, 2048, 4096)
SHORT = LENGTHS[:3]


def _rows(ppls, width=0.1, lengths=LENGTHS):
  return [
    {"length": n, "ppl": p, "ppl_lo": p - width, "ppl_hi": p + width}
    for n, p in zip(lengths, ppls, strict=True)
  ]


def _tables(res=None, sliding=None):
  base = {
    "sinusoidal": _rows([10, 20, 30, 40, 50, 60]),
    "rope": _rows([10, 12, 14, 16, 20, 30]),
    "t5": _rows([10, 9.5, 9.8, 12, 15, 20]),
    "alibi": _rows([10, 9.9, 9.8, 9.8, 9.7, 9.7]),
    "nope": _rows([12, 13, 14, 15, 16, 17]),
  }
  slide = {
    "sinusoidal": _rows([9, 30, 60], lengths=SHORT),
    "rope": _rows([9, 10, 12], lengths=SHORT),
    "t5": _rows([9, 9.2, 9.4], lengths=SHORT),
    "alibi": _rows([9, 8.9, 8.9], lengths=SHORT),
  }
  return base | (res or {}), slide | (sliding or {})


def _line(lines, start):
  (line,) = [x for x in lines if x.startswith(f"- {start}")]
  return line


CLAIMS = ("Sinusoidal", "RoPE", "ALiBi stays", "T5", "Ranking", "Sliding window", "Sliding, ALiBi")


def test_published_shapes_match():
  lines = alibi.findings(*_tables())
  for claim in CLAIMS:
    assert "**matches the paper**" in _line(lines, claim), claim
  assert "alibi < t5 < rope < sinusoidal" in _line(lines, "Ranking")


@pytest.mark.parametrize(
  "res, sliding, claim",
  [
    (
      {"sinusoidal": _rows([10, 11, 12, 13, 14, 15])},
      {"sinusoidal": _rows([9, 9.5, 10], lengths=SHORT)},
      "Sinusoidal",
    ),
    ({"rope": _rows([10, 10, 10, 10, 10, 10])}, None, "RoPE"),
    ({"rope": _rows([10, 20, 30, 25, 30, 40])}, None, "RoPE"),  # a separated drop
    ({"alibi": _rows([10, 10, 11, 12, 13, 14])}, None, "ALiBi stays"),
    ({"t5": _rows([10, 11, 12, 13, 14, 15])}, None, "T5"),  # never improves
    ({"alibi": _rows([10, 10, 10, 10, 10, 70])}, None, "Ranking"),
    (None, {"rope": _rows([11, 12, 13], lengths=SHORT)}, "Sliding window"),
    (None, {"alibi": _rows([9, 10, 11], lengths=SHORT)}, "Sliding, ALiBi"),
  ],
)
def test_rows_that_contradict_the_paper_fail(res, sliding, claim):
  line = _line(alibi.findings(*_tables(res, sliding)), claim)
  assert "does NOT" in line and "matches the paper" not in line, line


@pytest.mark.parametrize(
  "res, sliding, claim",
  [
    ({"sinusoidal": _rows([10, 16, 20, 30, 40, 50], width=3)}, None, "Sinusoidal"),
    ({"rope": _rows([10, 11, 12, 13, 14, 12], width=2)}, None, "RoPE"),
    ({"alibi": _rows([10, 10, 10.3, 10.4, 10.5, 10.6], width=0.4)}, None, "ALiBi stays"),
    ({"t5": _rows([10, 9.8, 9.9, 12, 15, 20], width=0.5)}, None, "T5"),
    ({"alibi": _rows([10, 9.9, 9.8, 9.8, 9.7, 20])}, None, "Ranking"),  # ALiBi ~ T5 at the end
    (None, {"rope": _rows([10, 12, 13], lengths=SHORT)}, "Sliding window"),
  ],
)
def test_overlapping_intervals_give_no_verdict(res, sliding, claim):
  line = _line(alibi.findings(*_tables(res, sliding)), claim)
  assert "not separated" in line and "matches" not in line and "does NOT" not in line, line
