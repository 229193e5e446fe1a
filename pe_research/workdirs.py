"""A run's workdir before anything is trained: its path, its recorded config, and the start-up
checks that it can hold the run.

``DIR/config.json`` is the run's resolved config, written before training starts; a workdir
holding another config is refused (``config_lib.check_resumable``). Decisions about the workdir
are made on process 0 and shared (``on_primary``), so that no process waits for others that
have failed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from pe_research import backend, config_lib, integrity
from pe_research.integrity import WorkdirError

CONFIG_FILE = "config.json"


def absolute(path: str) -> str:
  """A local ``path`` made absolute (Orbax rejects relative ones); URLs (``gs://...``) as is."""
  return path if "://" in path else os.path.abspath(path)


def on_primary(check: Callable[[], None]) -> None:
  """Runs ``check`` on process 0; when it raises WorkdirError every process raises, so that
  none waits for the others."""
  error = None
  if jax.process_index() == 0:
    try:
      check()
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(error is not None)):
    error = error or WorkdirError("process 0 refused the workdir; see its error")
  if error is not None:
    raise error


def record_config(workdir: str, config: ml_collections.ConfigDict, *, write: bool) -> None:
  """Checks ``config`` against ``DIR/config.json`` (see ``check_resumable``), then writes it.

  Raises:
    ValueError: the workdir holds a run with another config (only train.steps and
      train.steps_per_call may change).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      try:
        saved = json.load(f)
      except ValueError as e:
        raise WorkdirError(f"{path} is unreadable ({e}); allowed: --overwrite") from None
    config_lib.check_resumable(saved, config, workdir)
  if write:
    os.makedirs(workdir, exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
      record = config_lib.config_to_dict(config)
      record[config_lib.RECORDED_BACKEND] = backend.policy().to_dict()
      f.write(json.dumps(record, indent=2) + "\n")
    os.replace(f"{path}.tmp", path)  # Atomic: other processes, or a kill, see old or new.


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, *, overwrite: bool):
  """Start-up checks of ``workdir`` before anything is trained; returns where an old run was
  moved (None if it was not).

  With ``overwrite``, an existing non-empty ``DIR`` is renamed to ``DIR.old-<time>`` (nothing
  is deleted). Then ``config`` is checked against the run in ``DIR`` (``record_config``) and
  written, and ``DIR`` and ``DIR/checkpoints`` must accept new files.

  Raises:
    ValueError: the workdir holds a run with another config.
    WorkdirError: the workdir cannot be written.
  """
  moved = []

  def move_aside_and_probe() -> None:
    try:
      if overwrite and os.path.isdir(workdir) and os.listdir(workdir):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved.append(integrity.unused_path(f"{os.path.normpath(workdir)}.old-{stamp}"))
        os.rename(workdir, moved[0])
      for directory in (workdir, os.path.join(workdir, "checkpoints")):
        os.makedirs(directory, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
      raise WorkdirError(
        f"--workdir={workdir!r} is not writable ({e}); allowed: a writable directory"
      ) from None

  on_primary(move_aside_and_probe)
  record_config(workdir, config, write=jax.process_index() == 0)
  return moved[0] if moved else None
