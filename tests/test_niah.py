"""Needle in a haystack beyond L: depths, keys and haystacks per cell, the control, verdicts."""

import types

import numpy as np
import pytest

from configs.base import get_config
from pe_research import niah, passkey
from pe_research.data import ByteTokenizer

TOKENIZER = ByteTokenizer()
L = 300  # Training length of the pretend model.
DEPTHS = (0.0, 0.2, 1.0)  # At 700 tokens, 0 and 0.2 are beyond L.


def test_beyond_depths_put_the_needle_more_than_L_before_the_question():
  depths = niah.beyond_depths(800, L, TOKENIZER.encode)
  assert depths and depths == niah.DEPTHS[: len(depths)]  # A prefix: shallow needles only.
  first_out = niah.DEPTHS[len(depths)]
  for depth in (*depths, first_out):
    example = passkey.make_example(800, depth, 12345, TOKENIZER.encode)
    question = len(example.tokens) - len(passkey.QUESTION) - 5
    needle_end = example.needle_start + len(passkey.needle(12345))
    assert example.gap == question - needle_end
    assert (example.gap >= L) == (depth in depths), depth
  # At n = L + a little no depth is beyond L: the control's length has none.
  assert niah.beyond_depths(L + 50, L, TOKENIZER.encode) == ()


def _haystack(i, first_key):
  """Digit-bearing text; haystack 0 holds the key the cell would draw first."""
  text = f"doc {i}: " + " ".join(f"item {1000 * i + j} costs {j}." for j in range(60))
  return TOKENIZER.encode(text + (f" code {first_key}" if i == 0 else ""))


def test_each_trial_has_its_own_key_and_haystack_and_no_key_is_in_its_haystack():
  first_key = int(np.random.default_rng([0, 400]).integers(10_000, 100_000))
  haystacks = [_haystack(i, first_key) for i in range(4)]
  examples = niah.cell_examples(400, 0.2, TOKENIZER, trials=6, haystacks=haystacks)
  assert len({e.key for e in examples}) == 6 and examples[0].key != first_key  # Redrawn.
  for t, example in enumerate(examples):
    text = TOKENIZER.decode(example.tokens)
    assert text.count(str(example.key)) == 3  # Needle twice and the answer, nowhere else.
    body = text[len(passkey.HEADER) :].replace(passkey.needle(example.key), "", 1)
    assert TOKENIZER.decode(haystacks[t % 4]).startswith(body[: -len(passkey.QUESTION) - 5])
  again = niah.cell_examples(400, 0.7, TOKENIZER, trials=6, haystacks=haystacks)
  assert [e.key for e in again] == [e.key for e in examples]  # Depth moves only the needle.
  with pytest.raises(ValueError, match="shorter than"):
    niah.cell_examples(4000, 0.5, TOKENIZER, trials=1, haystacks=haystacks)


class _Reach:
  """Retrieves a key iff its needle ends within ``reach`` tokens of the answer (a pretend model
  with an attention span), scoring the grid's batches as ``eval_lib.Evaluator`` does."""

  def __init__(self, reach):
    self.reach = reach

  def score_all(self, batches, *, batch_size, desc):
    correct = examples = 0
    for batch in batches:
      for inputs, targets, weights in zip(
        *(batch[k] for k in ("inputs", "targets", "weights")), strict=True
      ):
        if weights.sum() == 0:
          continue
        answer = bytes(targets[weights > 0].astype(np.uint8))
        window = bytes(inputs[-self.reach :].astype(np.uint8))
        examples += 1
        correct += window.count(answer) >= 2  # The needle says the key twice.
    return types.SimpleNamespace(
      correct=correct, examples=examples, seconds=0.25 * examples, compile_seconds=1.0
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("text")
  for split, count in (("train", 1), ("validation", 12)):
    (root / split).mkdir()
    for i in range(count):
      (root / split / f"d{i:02d}.txt").write_bytes(bytes(_haystack(i + 1, 0).astype(np.uint8)))
  config = get_config()
  config.data.name, config.data.local_dir = "local_text", str(root)
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return config.data


def test_grid_has_a_control_at_L_and_only_beyond_L_cells_past_it(corpus):
  kwargs = dict(trials=10, depths=DEPTHS, data_cfg=corpus, batch_size=4)
  rows = niah.grid(_Reach(L), TOKENIZER, [700, 1500], L, **kwargs)
  long = [r for r in rows if r["length"] == 1500]  # No document that long: the filler, said so.
  assert long and all(r["haystack"] == "filler" and "has 0 of the 10" in r["note"] for r in long)
  rows = [r for r in rows if r["length"] != 1500]
  control = [r for r in rows if r["control"]]
  beyond = [r for r in rows if not r["control"]]
  assert {r["length"] for r in control} == {L} and [r["depth"] for r in control] == list(DEPTHS)
  assert beyond and all(r["length"] == 700 and r["gap_min"] >= L and r["beyond"] for r in beyond)
  assert all(r["trials"] == 10 and r["haystacks"] == 10 for r in rows)
  assert all(r["seconds"] == 3.5 for r in rows)  # scoring and compilation, per cell
  assert all(r["haystack"] == "local_text validation" and r["note"] == "" for r in rows)
  assert all(r["correct"] == 10 for r in control) and all(r["correct"] == 0 for r in beyond)
  assert rows[0]["accuracy_lo"] == pytest.approx(0.025**0.1)  # Clopper–Pearson at 10/10.
  lines = niah.verdicts(rows, L, "short reach")
  assert "control at L=300 passed" in lines[0] and "fails beyond L (evidence" in lines[1]
  far = niah.grid(_Reach(10_000), TOKENIZER, [700], L, **kwargs)
  lines = niah.verdicts(far, L, "far", base=("short reach", rows))
  assert "retrieves beyond L (evidence" in lines[1]
  assert "above short reach (evidence: the intervals separate)" in lines[2]


def test_a_short_training_length_drops_the_header_or_has_no_control():
  rows = niah.grid(_Reach(128), TOKENIZER, [400], 128, trials=2, depths=(0.0,))
  assert [(r["length"], r["control"]) for r in rows] == [(128, True), (400, False)]
  assert rows[1]["gap_min"] >= 128 and rows[0]["correct"] == 2  # The 103-token prompt fits.
  rows = niah.grid(_Reach(64), TOKENIZER, [400], 64, trials=2, depths=(0.0,))
  assert [r["control"] for r in rows] == [False]
  assert "no positive control" in niah.verdicts(rows, 64, "m")[0]


def _rows(control, beyond, trials=10):
  """One control cell and one beyond-L cell at 700 with the given numbers correct."""
  return [
    {"length": n, "control": c, "beyond": not c, "correct": k, "trials": trials, "gap_min": g}
    for n, c, k, g in ((L, True, control, 10), (700, False, beyond, 350))
  ]


@pytest.mark.parametrize(
  "control,beyond,expected",
  [
    (10, 10, "retrieves beyond L (evidence"),
    (10, 0, "fails beyond L (evidence"),
    (10, 5, "inconclusive"),
    (9, 8, "inconclusive"),  # 8/10: CP [0.44, 0.97] straddles 0.5.
    (7, 10, "not evidence, the control failed"),  # 7/10: CP lower bound 0.35.
  ],
)
def test_verdict_needs_a_passed_control_and_a_separated_interval(control, beyond, expected):
  lines = niah.verdicts(_rows(control, beyond), L, "m")
  assert expected in lines[1]
  assert ("(evidence" in " ".join(lines)) == ("(evidence" in expected)


def test_comparison_with_the_base_needs_separated_intervals():
  lines = niah.verdicts(_rows(10, 6), L, "m", base=("none", _rows(10, 3)))
  assert "not separated from none" in lines[2] and "(evidence" not in lines[2]
  lines = niah.verdicts(_rows(10, 0), L, "m", base=("none", _rows(10, 9)))
  assert "below none (evidence" in lines[2]
  assert "no positive control" in niah.verdicts(_rows(10, 10)[1:], L, "m")[0]


def test_grid_without_room_for_a_prompt_at_L_has_no_control_and_is_not_evidence():
  # One token too few for the control, even without the header (passkey.control_header).
  short = passkey.min_length(TOKENIZER.encode, header="") - 1
  rows = niah.grid(_Reach(10_000), TOKENIZER, [short + 400], short, trials=2, depths=(0.0,))
  assert rows and not any(r["control"] for r in rows) and all(r["beyond"] for r in rows)
  assert all(r["correct"] == 2 for r in rows)  # Retrieved, yet:
  assert "no positive control" in niah.verdicts(rows, short, "m")[0]


def test_horizon_cells_sit_below_L_at_depth_zero_and_locate_where_retrieval_stops():
  # L = 800 bytes (the header alone is ~250), a model that sees its last 500 tokens.
  big, reach = 800, _Reach(500)
  rows = niah.grid(reach, TOKENIZER, [], big, trials=4, depths=DEPTHS, horizon=[600, 400])
  ladder = [(r["length"], r["depth"], r["horizon"], r["control"]) for r in rows]
  assert ladder[:3] == [(400, 0.0, True, False), (600, 0.0, True, False), (big, 0.0, False, True)]
  assert not any(r["beyond"] for r in rows[:2]) and rows[0]["gap_min"] < rows[1]["gap_min"]
  assert [r["correct"] for r in rows[:3]] == [4, 4, 0]  # 4/4 still straddles 0.5: CP [0.40, 1].
  rows = niah.grid(reach, TOKENIZER, [], big, trials=10, depths=(0.0,), horizon=[400, 600])
  (line,) = niah.horizon_verdict(rows, big, "m")
  assert f"between {rows[1]['gap_min']} and {rows[2]['gap_min']} tokens (evidence" in line
  assert niah.horizon_verdict([r for r in rows if not r["horizon"]], big, "m") == []
  with pytest.raises(ValueError, match=r"niah horizon: \[800, 100\] not in \[2"):
    niah.grid(reach, TOKENIZER, [], big, trials=1, depths=(0.0,), horizon=[400, 800, 100])


def _ladder(*correct, trials=10):
  """Horizon cells at gaps 100, 200, ... with ``correct`` retrieved; the last is the control."""
  n = len(correct)
  return [
    {"length": 100 * i + 50, "depth": 0.0, "horizon": i < n, "control": i == n, "beyond": False}
    | {"correct": k, "trials": trials, "gap_min": 100 * i}
    for i, k in enumerate(correct, 1)
  ]


@pytest.mark.parametrize(
  "correct,expected",
  [
    ((10, 10, 0), "between 200 and 300 tokens (evidence"),
    ((10, 7, 0), "between 100 and 300 tokens (evidence"),  # 7/10 straddles: named, undecided.
    ((10, 10, 10), "at least 300 tokens (evidence"),
    ((10, 7, 7), "at least 100 tokens (evidence"),
    ((0, 0, 0), "shorter than 100 tokens (evidence"),
    ((0, 10, 10), "not located: a shorter gap fails"),
    ((10, 0, 10), "not located: a shorter gap fails"),
    ((5, 6, 7), "not located: no gap tried is separated"),
  ],
)
def test_horizon_verdict_needs_passes_below_fails_and_separated_intervals(correct, expected):
  (line,) = niah.horizon_verdict(_ladder(*correct), L, "m")
  assert expected in line and ("(evidence" in line) == ("(evidence" in expected)
  assert ("undecided: 7/10" in line) == (correct[1:] in {(7, 0), (7, 7)})
