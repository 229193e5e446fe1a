"""Synthetic tasks: every task's answer is right, generation is deterministic, batches fit."""

import json

import numpy as np
import pytest

from configs.base import get_config
from pe_research.data import (
  BOS_ID,
  EOS_ID,
  PAD_ID,
  SEP_ID,
  make_eval_batches,
  make_train_iterator,
  task_names,
)
from pe_research.data.synthetic import make_example, sequence_length


def _parts(example):
  """(prompt bytes, scored answer bytes without EOS) of one unpadded example."""
  seq = np.append(example["inputs"][:1], example["targets"])
  assert seq[0] == BOS_ID and seq[-1] == EOS_ID
  sep = int(np.flatnonzero(seq == SEP_ID)[0])
  scored = example["targets"][example["weights"] > 0]
  np.testing.assert_array_equal(scored, seq[sep + 1 :])  # Exactly the answer and EOS.
  return bytes(seq[1:sep].astype(np.uint8)), bytes(scored[:-1].astype(np.uint8))


def _lsb_int(digits: bytes) -> int:
  return int(digits[::-1])


def _check(task, n, prompt, answer):
  if task == "copy":
    assert answer == prompt and len(prompt) == n
  elif task == "reverse":
    assert answer == prompt[::-1] and len(prompt) == n
  elif task == "sort":
    assert answer == bytes(sorted(prompt)) and len(prompt) == n
  elif task == "addition":
    a, b = prompt.split(b"+")
    assert len(a) == len(b) == n and len(answer) == n + 1
    assert _lsb_int(a) + _lsb_int(b) == _lsb_int(answer)
  elif task == "parity":
    assert set(prompt) <= set(b"01") and len(prompt) == n
    assert answer == str(prompt.count(b"1") % 2).encode()
  elif task == "associative_recall":
    pairs, query = prompt[:-1], prompt[-1]
    keys, values = pairs[0::2], pairs[1::2]
    assert len(keys) == len(set(keys)) == n
    assert answer == bytes([values[keys.index(query)]])
  elif task == "passkey":
    digits = bytes(c for c in prompt if chr(c).isdigit())
    assert answer == digits and len(answer) == 5 and len(prompt) == n + 5
    assert prompt.find(digits) >= 0  # The key is one contiguous run.
  else:
    raise AssertionError(f"no check for task {task}")


@pytest.mark.parametrize("task", task_names())
def test_every_task_answer_is_correct(task):
  for seed in range(20):
    for n in (1, 2, 7, 33, 80):
      example = make_example(task, n, np.random.default_rng([seed, n]))
      assert len(example["inputs"]) == sequence_length(task, n)
      _check(task, n, *_parts(example))


def test_task_names_are_the_issue_tasks():
  assert set(task_names()) == {
    "copy", "reverse", "sort", "addition", "parity", "associative_recall", "passkey"
  }  # fmt: skip


def test_addition_carries():
  prompt, answer = _parts(make_example("addition", 3, np.random.default_rng(5)))
  a, b = prompt.split(b"+")
  assert _lsb_int(a) + _lsb_int(b) == _lsb_int(answer)
  sums = [
    _lsb_int(_parts(make_example("addition", 2, np.random.default_rng(s)))[1]) for s in range(50)
  ]
  assert max(sums) >= 100  # Some sums carry into the extra digit.


def _config(task="copy"):
  config = get_config()
  config.data.name = "synthetic"
  config.data.task = task
  config.train.seq_len = 48
  config.train.batch_size = 8
  return config


def test_training_batches_are_padded_examples_from_the_train_range():
  config = _config("reverse")
  batch = next(make_train_iterator(config))
  assert batch["inputs"].shape == (8, 48)
  for inputs, targets, weights in zip(
    batch["inputs"], batch["targets"], batch["weights"], strict=True
  ):
    size = int(np.flatnonzero(targets == EOS_ID)[0]) + 1
    assert np.all(inputs[size:] == PAD_ID) and np.all(weights[size:] == 0)
    example = {"inputs": inputs[:size], "targets": targets[:size], "weights": weights[:size]}
    prompt, answer = _parts(example)
    assert 1 <= len(prompt) <= 20 and answer == prompt[::-1]


def test_training_stream_is_deterministic_and_resumable():
  config = _config("passkey")
  it = make_train_iterator(config)
  first = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))
  following = next(it)
  again = make_train_iterator(config)
  np.testing.assert_array_equal(next(again)["inputs"], first[0]["inputs"])
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["targets"], following["targets"])
  config.seed = 7
  assert not np.array_equal(next(make_train_iterator(config))["inputs"], first[0]["inputs"])


def test_eval_batches_are_fixed_examples_of_the_requested_length():
  config = _config("sort")
  length = 30
  batches = make_eval_batches(config, length=length, max_tokens=1000, batch_size=4)
  positions = sequence_length("sort", length)
  count = 1000 // positions
  assert len(batches) == -(-count // 4)
  rows = [r for b in batches for r in zip(b["inputs"], b["targets"], b["weights"], strict=True)]
  assert all(b["inputs"].shape == (4, positions) for b in batches)
  for inputs, targets, weights in rows[:count]:
    prompt, answer = _parts({"inputs": inputs, "targets": targets, "weights": weights})
    assert len(prompt) == length and answer == bytes(sorted(prompt))
  assert all(w.sum() == 0 for _, _, w in rows[count:])
  config.seed = 3  # Evaluation examples do not depend on the training seed.
  again = make_eval_batches(config, length=length, max_tokens=1000, batch_size=4)
  np.testing.assert_array_equal(again[0]["inputs"], batches[0]["inputs"])


def test_bad_synthetic_input_names_the_field():
  with pytest.raises(ValueError, match="data.task must be one of copy, reverse, sort, addition"):
    next(make_train_iterator(_config("copyy")))
  config = _config("addition")
  with pytest.raises(ValueError, match="train.seq_len=48 is too short .* needs >= 64"):
    make_train_iterator(config)
  with pytest.raises(ValueError, match="84 distinct keys"):
    make_example("associative_recall", 85, np.random.default_rng(0))
  with pytest.raises(ValueError, match="no sliding windows"):
    make_eval_batches(config, length=5, mode="sliding", stride=2)
