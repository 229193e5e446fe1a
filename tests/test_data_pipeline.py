"""Training stream and evaluation windows on a tiny local_text corpus."""

import json

import numpy as np
import pytest

from configs.base import get_config
from pe_research.data import EOS_ID, PAD_ID, make_eval_batches, make_train_iterator
from pe_research.data.documents import PackedStream, open_documents
from pe_research.data.tokenizer import make_tokenizer

SEQ_LEN = 15
TOKENIZER = make_tokenizer("bytes")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  """train/ (30 docs, some empty, most shorter than a window) and validation/ (12 docs)."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for split, count in (("train", 30), ("validation", 12)):
    (root / split).mkdir()
    for i in range(count):
      size = 0 if i % 7 == 3 else int(rng.integers(1, 60))
      (root / split / f"doc{i:02d}.txt").write_bytes(rng.integers(97, 123, size).astype(np.uint8))
  config = get_config()
  config.data.name = "local_text"
  config.data.local_dir = str(root)
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.train.seq_len = SEQ_LEN
  config.train.batch_size = 4
  return config


def _stream(config, split):
  """The packed stream built the obvious way: every non-empty document, then EOS."""
  docs = open_documents(config.data, split, TOKENIZER)
  return np.concatenate([np.append(docs[k], EOS_ID) for k in range(len(docs))])


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    for key in ("inputs", "targets", "weights"):
      np.testing.assert_array_equal(a[key], b[key])


def test_packing_keeps_short_documents_and_skips_empty_ones(config):
  docs = open_documents(config.data, "train", TOKENIZER)
  assert len(docs) == 30 - 4  # Documents 3, 10, 17 and 24 are empty.
  assert docs.lengths.min() >= 1 and docs.lengths.min() < SEQ_LEN
  stream = PackedStream(docs)
  expected = _stream(config, "train")
  assert stream.num_tokens == len(expected)
  for start, stop in ((0, 5), (3, 100), (17, len(expected)), (len(expected), len(expected))):
    np.testing.assert_array_equal(stream.slice(start, stop), expected[start:stop])


def test_training_batches_are_windows_of_the_packed_stream(config):
  it = make_train_iterator(config)
  batch = next(it)
  assert batch["inputs"].shape == (4, SEQ_LEN) and batch["inputs"].dtype == np.int32
  assert batch["weights"].dtype == np.float32 and np.all(batch["weights"] == 1)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  expected = _stream(config, "train")
  w = SEQ_LEN + 1
  windows = {tuple(expected[i * w : (i + 1) * w]) for i in range(len(expected) // w)}
  for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
    assert tuple(np.append(inputs, targets[-1])) in windows


def test_each_epoch_is_a_new_permutation_of_all_windows(config):
  config = config.copy_and_resolve_references()
  config.train.batch_size = 1
  num_windows = len(_stream(config, "train")) // (SEQ_LEN + 1)
  it = make_train_iterator(config)
  rows = [tuple(b["inputs"][0]) for b in _batches(it, 2 * num_windows)]
  first, second = rows[:num_windows], rows[num_windows:]
  assert sorted(first) == sorted(second) and len(set(first)) == num_windows
  assert first != second


def test_same_seed_same_batches_other_seed_other_batches(config):
  _assert_same(_batches(make_train_iterator(config), 3), _batches(make_train_iterator(config), 3))
  other = config.copy_and_resolve_references()
  other.seed = 1
  a, b = next(make_train_iterator(config)), next(make_train_iterator(other))
  assert not np.array_equal(a["inputs"], b["inputs"])


def test_resume_from_saved_state_gives_exactly_the_next_batches(config):
  it = make_train_iterator(config)
  _batches(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  expected = _batches(it, 3)
  resumed = make_train_iterator(config)
  resumed.set_state(state)
  _assert_same(expected, _batches(resumed, 3))


def test_process_shards_partition_the_global_batch(config):
  global_batches = _batches(make_train_iterator(config), 3)
  shards = [
    _batches(make_train_iterator(config, process_index=p, process_count=2), 3) for p in (0, 1)
  ]
  for k, batch in enumerate(global_batches):
    for p in (0, 1):
      assert shards[p][k]["inputs"].shape == (2, SEQ_LEN)
      np.testing.assert_array_equal(shards[p][k]["inputs"], batch["inputs"][p::2])
  with pytest.raises(ValueError, match="train.batch_size=4 must be divisible by process_count=3"):
    make_train_iterator(config, process_count=3)


@pytest.mark.parametrize(
  "length, mode, stride, budget",
  [
    (8, "nonoverlapping", None, 100),
    (7, "nonoverlapping", None, 5),
    (16, "sliding", 4, 101),
    (9, "sliding", 1, 40),
    (10, "sliding", 10, 37),
    (32, "sliding", 8, 20),
    (6, "sliding", None, 50),
  ],
)
def test_eval_scores_each_budgeted_token_exactly_once(config, length, mode, stride, budget):
  stream = _stream(config, "validation")
  batches = make_eval_batches(
    config, length=length, mode=mode, stride=stride, max_tokens=budget, batch_size=3
  )
  step = length if mode == "nonoverlapping" else (stride or length // 2)
  assert all(b["inputs"].shape == (3, length) for b in batches)
  rows = [r for b in batches for r in zip(b["inputs"], b["targets"], b["weights"], strict=True)]
  num_windows = sum(1 for _, _, w in rows if w.sum() > 0)
  assert all(w.sum() == 0 for _, _, w in rows[num_windows:])  # Padding rows come last.
  scored = []
  for k, (inputs, targets, weights) in enumerate(rows[:num_windows]):
    start = k * step
    real = min(length, budget - start)  # Positions whose target lies in the budget.
    np.testing.assert_array_equal(inputs[:real], stream[start : start + real])
    np.testing.assert_array_equal(targets[:real], stream[start + 1 : start + real + 1])
    assert np.all(targets[real:] == PAD_ID) and np.all(weights[real:] == 0)
    scored += [start + i + 1 for i in np.flatnonzero(weights)]
  assert sorted(scored) == list(range(1, budget + 1))
  assert sum(float(b["weights"].sum()) for b in batches) == budget


def test_sliding_masks_at_the_stream_edges(config):
  budget, length, stride = 30, 12, 5
  rows = [
    r
    for b in make_eval_batches(
      config, length=length, mode="sliding", stride=stride, max_tokens=budget
    )
    for r in b["weights"]
  ]
  assert len(rows) == 1 + 4  # 1 + ceil((30 - 12) / 5)
  np.testing.assert_array_equal(rows[0], np.ones(length))  # The first window scores all.
  for k, weights in enumerate(rows[1:-1], start=1):
    np.testing.assert_array_equal(weights, [0] * (length - stride) + [1] * stride, err_msg=str(k))
  # Last window starts at 20: positions 7.. score targets 28, 29, 30; 31 and 32 are past it.
  np.testing.assert_array_equal(rows[-1], [0] * 7 + [1] * 3 + [0] * 2)
  short = make_eval_batches(config, length=length, mode="sliding", stride=stride, max_tokens=4)
  np.testing.assert_array_equal(short[0]["weights"][0], [1] * 4 + [0] * 8)


def test_sliding_with_stride_equal_to_length_is_nonoverlapping(config):
  kwargs = dict(length=10, max_tokens=73, batch_size=2)
  _assert_same(
    make_eval_batches(config, mode="sliding", stride=10, **kwargs),
    make_eval_batches(config, mode="nonoverlapping", **kwargs),
  )


def test_documents_mode_scores_each_window_of_one_document_whole(config):
  docs = open_documents(config.data, "validation", TOKENIZER)
  long_docs = {bytes(docs[k][:31].astype(np.uint8)) for k in np.flatnonzero(docs.lengths > 30)}
  batches = make_eval_batches(config, length=30, mode="documents", max_tokens=61, batch_size=2)
  assert 0 < len(batches.windows.windows) <= 3  # ceil(61 / 30) windows asked for.
  rows = [(b["inputs"][i], b["targets"][i], b["weights"][i]) for b in batches for i in range(2)]
  seen = set()
  for inputs, targets, weights in rows[: len(batches.windows.windows)]:
    assert weights.sum() == 30 and EOS_ID not in inputs  # One document, all positions scored.
    seen.add(bytes(np.append(inputs, targets[-1]).astype(np.uint8)))
  assert seen <= long_docs and len(seen) == len(batches.windows.windows)
  assert (len(long_docs) < 3) == bool(batches.windows.note)
  with pytest.raises(ValueError, match="no evaluation window at length 500: .* has 0 of the 1"):
    make_eval_batches(config, length=500, mode="documents", max_tokens=500)


def test_units_command_lists_each_lengths_units_and_the_shortfall(config, capsys):
  from pe_research.data.__main__ import main

  flags = [f"--local_dir={config.data.local_dir}", f"--data_dir={config.data.data_dir}"]
  assert main(["units", "--dataset=local_text", "--lengths=30,500", "--count=2", *flags]) == 0
  out = capsys.readouterr().out
  assert "local_text validation length 30: " in out and "length 500: 0 units long enough" in out
  assert "has 0 of the 2 requested units holding 501 tokens" in out
  assert out.strip().endswith("units: each document alone")


def test_eval_rejects_bad_arguments(config):
  with pytest.raises(ValueError, match="data.eval_tokens=100000 exceeds the validation split"):
    make_eval_batches(config, length=8, max_tokens=100_000)
  with pytest.raises(ValueError, match="mode must be one of nonoverlapping, sliding"):
    make_eval_batches(config, length=8, mode="strided", max_tokens=10)
  with pytest.raises(ValueError, match=r"stride must lie in \[1, length=8\]"):
    make_eval_batches(config, length=8, mode="sliding", stride=9, max_tokens=10)
