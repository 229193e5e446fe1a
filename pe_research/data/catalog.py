"""TFDS catalog corpora (pg19, wiki40b/en, lm1b), read from a ``data_dir`` prepared elsewhere.

Their preparation needs TensorFlow (and apache-beam for wiki40b) and the network, so it
happens on another machine with ``prepare_command(name, data_dir)``; here they are only
read, with ``tfds.data_source(..., download=False)``: a dataset that is missing or was
prepared as tfrecord (no random access) gets a one-line ValueError with that command.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow_datasets as tfds


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
  """Where a catalog corpus keeps its text and which split serves as validation."""

  tfds_name: str
  text_key: str
  splits: dict[str, str]  # Our split name -> the TFDS split.
  beam: bool = False  # Preparation runs an apache-beam pipeline.


CATALOG = {
  "pg19": CatalogEntry("pg19", "book_text", {"train": "train", "validation": "validation"}),
  "wiki40b": CatalogEntry(
    "wiki40b/en", "text", {"train": "train", "validation": "validation"}, beam=True
  ),
  "lm1b": CatalogEntry("lm1b", "text", {"train": "train", "validation": "test"}),
}


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that prepares catalog dataset ``name`` as array_record in ``data_dir``."""
  entry = CATALOG[name]
  beam = (
    ' --beam_pipeline_options="runner=DirectRunner,direct_num_workers=8,'
    'direct_running_mode=multi_processing"'
    if entry.beam
    else ""
  )
  return (
    f"pip install -e '.[prepare]' && tfds build {entry.tfds_name} --data_dir={data_dir} "
    f"--file_format=array_record{beam}"
  )


def prepared_version(name: str, data_dir: str) -> str:
  """The newest prepared version of ``name`` in ``data_dir``; ValueError if there is none."""
  root = os.path.join(data_dir, CATALOG[name].tfds_name)
  versions = []
  for version in os.listdir(root) if os.path.isdir(root) else []:
    if tfds.core.Version.is_valid(version) and os.path.isfile(
      os.path.join(root, version, "dataset_info.json")
    ):
      versions.append(tfds.core.Version(version))
  if not versions:
    raise ValueError(
      f"dataset {name} is not prepared in data_dir={data_dir}; prepare it on a machine with "
      f"network access: {prepare_command(name, data_dir)}"
    )
  version = str(max(versions))
  with open(os.path.join(root, version, "dataset_info.json")) as f:
    file_format = json.load(f).get("fileFormat", "tfrecord")
  if file_format != "array_record":
    raise ValueError(
      f"dataset {name} in data_dir={data_dir} is prepared as {file_format}, which has no "
      f"random access; prepare it again: {prepare_command(name, data_dir)}"
    )
  return version


def catalog_source(name: str, data_dir: str, split: str):
  """Random-access records of ``split`` ("train" or "validation") of catalog dataset ``name``."""
  entry = CATALOG[name]
  version = prepared_version(name, data_dir)
  return tfds.data_source(
    f"{entry.tfds_name}:{version}", split=entry.splits[split], data_dir=data_dir, download=False
  )
