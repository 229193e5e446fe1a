"""The demo's verdicts: made-up rows that must match, must fail, and must stay unseparated."""

import pytest

from experiments import demo


def _rows(ppls, width=0.5):
  return [
    {"length": 128 * 4**i, "ppl": p, "ppl_lo": p - width, "ppl_hi": p + width}
    for i, p in enumerate(ppls)
  ]


def _results(**changes):
  results = {
    "sinusoidal": _rows([10, 20, 40]),
    "rope": _rows([10, 14, 30]),
    "alibi": _rows([10, 10.2, 10.1]),
    "t5": _rows([11, 12, 15]),
    "nope": _rows([12, 13, 14]),
    "kerple": _rows([10, 10.5, 12]),
    "fire": _rows([10, 11, 13]),
  }
  return results | {k: v if isinstance(v[0], dict) else _rows(v) for k, v in changes.items()}


def _line(lines, start):
  (line,) = [x for x in lines if x.startswith(f"- {start}")]
  return line


def test_published_shapes_match():
  lines = demo.findings(_results())
  for claim in ("Sinusoidal", "ALiBi", "RoPE"):
    assert "**matches the paper**" in _line(lines, claim)
  assert "alibi, separated from every other" in _line(lines, "Lowest")


@pytest.mark.parametrize(
  "change, claim",
  [
    ({"sinusoidal": [10, 11, 12]}, "Sinusoidal"),  # grows only 1.1× past L
    ({"alibi": [10, 14, 20]}, "ALiBi"),  # rises, intervals separated
    ({"rope": [10, 9, 8]}, "RoPE"),  # improves past L
  ],
)
def test_rows_that_contradict_the_paper_fail(change, claim):
  assert "**does NOT match the paper**" in _line(demo.findings(_results(**change)), claim)


@pytest.mark.parametrize(
  "change, claim",
  [
    ({"sinusoidal": _rows([10, 16, 20], width=4)}, "Sinusoidal"),  # 1.6× but overlapping
    ({"alibi": _rows([10, 12, 12], width=3)}, "ALiBi"),  # 1.2× but overlapping
    ({"rope": _rows([10, 10.5, 11], width=2)}, "RoPE"),
  ],
)
def test_overlapping_intervals_give_no_verdict(change, claim):
  line = _line(demo.findings(_results(**change)), claim)
  assert "not separated" in line and "matches" not in line and "NOT match" not in line


def test_no_single_best_when_the_lowest_intervals_overlap():
  line = _line(demo.findings(_results(kerple=_rows([10, 10.2, 10.3]))), "Lowest")
  assert "tied (no single best)" in line and "alibi ~ kerple" in line


def test_bad_factors_are_refused_in_one_line(capsys):
  for bad in ("4,16", "1,x", "1,64", "1,4,4", "1"):
    with pytest.raises(SystemExit):
      demo.parse_args([f"--factors={bad}"])
    assert "--factors" in capsys.readouterr().err
