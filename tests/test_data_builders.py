"""Tokenizer, TFDS builders on temporary folders, catalog reading (mocked pg19), and the CLI."""

import json
import os
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs.base import get_config
from pe_research.data import (
  BOS_ID,
  EOS_ID,
  PAD_ID,
  SEP_ID,
  VOCAB_SIZE,
  ByteTokenizer,
  dataset_names,
  make_eval_batches,
  make_train_iterator,
  prepare,
)
from pe_research.data.__main__ import main
from pe_research.data.builders import (
  ensure_prepared,
  hash_split,
  local_text_builder,
  pystdlib_builder,
)
from pe_research.data.documents import Documents


def test_byte_tokenizer_round_trips_text_and_names_specials():
  tok = ByteTokenizer()
  assert tok.vocab_size == VOCAB_SIZE == 260
  assert (PAD_ID, BOS_ID, EOS_ID, SEP_ID) == (256, 257, 258, 259)
  ids = tok.encode("héllo\n")
  assert ids.dtype == np.int32 and ids.tolist() == list("héllo\n".encode())
  assert tok.decode(ids) == "héllo\n" and tok.encode(b"\xff").tolist() == [255]
  assert tok.decode([BOS_ID, 104, 105, SEP_ID, EOS_ID, PAD_ID]) == "<bos>hi<sep><eos><pad>"
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 260\)"):
    tok.decode([260])


def _write(root, files):
  for relpath, data in files.items():
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _docs(builder, split):
  return {ex["path"].decode(): bytes(ex["text"]) for ex in builder.as_data_source(split)}


def test_pystdlib_builder_stores_py_files_split_by_path_hash(tmp_path):
  files = {f"pkg/mod{i}.py": f"x = {i}\n".encode() * (i + 1) for i in range(40)}
  _write(tmp_path / "lib", files)
  _write(tmp_path / "lib", {"site-packages/skip.py": b"no", "README.txt": b"no"})
  builder = pystdlib_builder(str(tmp_path / "tfds"), source_dir=str(tmp_path / "lib"))
  version = ".".join(map(str, sys.version_info[:3]))
  assert builder.builder_config.name.startswith(f"{sys.implementation.name}{version}-")
  ensure_prepared(builder)
  stored = {split: _docs(builder, split) for split in ("train", "validation")}
  assert stored["validation"] and stored["train"]
  for split, docs in stored.items():
    assert all(hash_split(path) == split for path in docs)
  assert {**stored["train"], **stored["validation"]} == files
  # A different file list (here: fewer files) is a different config, never the stale copy.
  fewer = pystdlib_builder(str(tmp_path / "tfds"), source_dir=str(tmp_path / "lib"), max_files=5)
  assert fewer.builder_config.name != builder.builder_config.name and not fewer.is_prepared()


def _local_config(tmp_path, local_dir):
  config = get_config()
  config.data.name = "local_text"
  config.data.local_dir = str(local_dir)
  config.data.data_dir = str(tmp_path / "tfds")
  config.train.seq_len = 8
  config.train.batch_size = 2
  return config


def test_local_text_splits_by_subfolder_and_auto_prepares(tmp_path):
  _write(tmp_path / "txt", {"train/a.txt": b"alpha " * 20, "validation/b.txt": b"beta " * 20})
  config = _local_config(tmp_path, tmp_path / "txt")
  batch = next(make_train_iterator(config))  # data.auto_prepare=True prepares on first use.
  assert set(ByteTokenizer().decode(batch["inputs"][0])) <= set("alph <eos>")
  evals = make_eval_batches(config, length=16, max_tokens=50)
  assert set(ByteTokenizer().decode(evals[0]["inputs"][0])) <= set("beta <eos>")
  assert prepare(config.data).endswith("1.0.0")


def test_a_dataset_prepared_by_another_process_while_waiting_is_read(tmp_path, monkeypatch):
  """make demo's worker processes race to prepare pystdlib: the loser waits on the lock and
  must then read what the winner wrote (its own builder, made before, has no splits)."""
  from pe_research.data import builders, documents

  _write(tmp_path / "txt", {"train/a.txt": b"alpha " * 5, "validation/b.txt": b"beta " * 5})

  def other_process_prepares(builder):
    assert not builder.is_prepared()
    local_text_builder(str(tmp_path / "tfds"), str(tmp_path / "txt")).download_and_prepare()

  monkeypatch.setattr(builders, "ensure_prepared", other_process_prepares)
  records, key = documents._record_source(
    "local_text", str(tmp_path / "tfds"), str(tmp_path / "txt"), True, "train"
  )
  assert Documents(records, key, ByteTokenizer(), "train").lengths.tolist() == [len("alpha ") * 5]


def test_document_lengths_are_cached_beside_the_prepared_data(tmp_path):
  _write(tmp_path / "txt", {"train/a.txt": b"abc", "validation/b.txt": b"de"})
  builder = local_text_builder(str(tmp_path / "tfds"), str(tmp_path / "txt"))
  ensure_prepared(builder)
  records = builder.as_data_source("train")
  assert Documents(records, "text", ByteTokenizer(), "train").lengths.tolist() == [3]
  cache = os.path.join(builder.data_dir, "pe_research-train-bytes-1-lengths.npy")
  np.save(cache, np.array([7]))  # The cached count wins over counting again.
  assert Documents(records, "text", ByteTokenizer(), "train").lengths.tolist() == [7]


def test_local_text_hash_split_needs_validation_files_and_respects_auto_prepare(tmp_path):
  _write(tmp_path / "one", {"only.txt": b"text"})
  with pytest.raises(ValueError, match="data.local_dir=.* has no validation files"):
    prepare(_local_config(tmp_path, tmp_path / "one").data)
  _write(tmp_path / "many", {f"f{i}.txt": b"some text" for i in range(60)})
  config = _local_config(tmp_path, tmp_path / "many")
  config.data.auto_prepare = False
  with pytest.raises(ValueError, match="python -m pe_research.data prepare --dataset=local_text"):
    make_train_iterator(config)


def test_unknown_dataset_lists_the_known_ones():
  assert dataset_names() == (
    *("pystdlib", "sotu", "local_text", "pg19", "wiki40b", "lm1b", "synthetic"),
  )
  config = get_config()
  config.data.name = "c4"
  with pytest.raises(ValueError, match="data.name must be one of pystdlib, sotu, local_text, pg19"):
    make_train_iterator(config)


def _catalog_config(tmp_path, name):
  config = get_config()
  config.data.name = name
  config.data.data_dir = str(tmp_path)
  config.train.seq_len = 16
  config.train.batch_size = 2
  return config


@pytest.mark.parametrize("name, tfds_name", [("pg19", "pg19"), ("wiki40b", "wiki40b/en")])
def test_missing_catalog_dataset_fails_fast_with_the_prepare_command(tmp_path, name, tfds_name):
  start = time.perf_counter()
  with pytest.raises(ValueError) as error:
    make_train_iterator(_catalog_config(tmp_path, name))
  assert time.perf_counter() - start < 5  # No network retries.
  message = str(error.value)
  assert "\n" not in message and f"dataset {name} is not prepared in data_dir={tmp_path}" in message
  assert f"tfds build {tfds_name} --data_dir={tmp_path} --file_format=array_record" in message


def _fake_prepared(tmp_path, file_format):
  version_dir = tmp_path / "pg19" / "0.1.1"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text(json.dumps({"fileFormat": file_format}))


def test_catalog_dataset_prepared_as_tfrecord_is_rejected(tmp_path):
  _fake_prepared(tmp_path, "tfrecord")
  with pytest.raises(ValueError, match="prepared as tfrecord, which has no random access"):
    prepare(_catalog_config(tmp_path, "pg19").data)


def test_pg19_reading_path_with_mock_data(tmp_path):
  _fake_prepared(tmp_path, "array_record")
  books = {  # Real data gives bytes, mock data str: both must work; empty books are skipped.
    "train": [b"Call me Ishmael. " * 5, "", "It was the best of times. " * 4],
    "validation": ["Once upon a time. " * 3, b"The end."],
  }

  def as_data_source(self, split, **kwargs):
    del self, kwargs
    return [{"book_text": text, "book_id": i} for i, text in enumerate(books[split])]

  config = _catalog_config(tmp_path, "pg19")
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    assert prepare(config.data) == str(tmp_path / "pg19" / "0.1.1")
    batch = next(make_train_iterator(config))
    evals = make_eval_batches(config, length=32, max_tokens=60)
  text = ByteTokenizer().decode(np.append(batch["inputs"][0], batch["targets"][0, -1]))
  assert text in "Call me Ishmael. " * 5 + "<eos>" + "It was the best of times. " * 4 + "<eos>"
  stream = ("Once upon a time. " * 3 + "<eos>The end.<eos>").encode()
  first = evals[0]
  assert ByteTokenizer().decode(first["inputs"][0]) == stream[:32].decode()
  assert sum(float(b["weights"].sum()) for b in evals) == 60


def test_cli_show_and_prepare(tmp_path, capsys):
  _write(tmp_path / "txt", {"train/a.txt": b"hello world", "validation/b.txt": b"goodbye"})
  args = [f"--data_dir={tmp_path / 'tfds'}", f"--local_dir={tmp_path / 'txt'}"]
  assert main(["prepare", "--dataset=local_text", *args]) == 0
  assert main(["show", "--dataset=local_text", "--split=validation", "--n=2", *args]) == 0
  out = capsys.readouterr().out
  assert "goodbye" in out and "local_text validation: 1 documents, 8 tokens" in out
  assert main(["show", "--dataset=synthetic", "--task=reverse", "--min_len=3", "--max_len=3"]) == 0
  assert "task reverse: lengths 3..3 -> 8..8 tokens" in capsys.readouterr().out
  assert main(["prepare", "--dataset=lm1b", f"--data_dir={tmp_path}"]) == 2
  assert "tfds build lm1b" in capsys.readouterr().err
