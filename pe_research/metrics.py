"""Training metrics: ``metrics.jsonl``, TensorBoard events and a progress bar.

Each logged step appends one JSON object to ``DIR/metrics.jsonl`` (at least ``step``,
``loss``, ``learning_rate``, ``grad_norm``, ``tokens_per_second``) and the same scalars to
TensorBoard event files under ``DIR/tensorboard``. On resume from step ``s`` the lines of
steps ``> s`` (written after that checkpoint by a killed run), and a last line cut short by the
kill, are dropped first, so the file never holds duplicate or broken records; TensorBoard is
told to drop its events after ``s`` too (``purge_step``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import tqdm
from absl import logging as absl_logging

METRICS_FILE = "metrics.jsonl"


def quiet_library_logging() -> None:
  """Keeps absl/Orbax INFO lines out of the terminal (warnings and errors still show)."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  absl_logging.set_stderrthreshold(absl_logging.WARNING)
  for name in ("orbax", "jax", "absl"):
    logging.getLogger(name).setLevel(logging.WARNING)


def _records(path: str) -> list[tuple[str, dict[str, Any]]]:
  """``(line, record)`` of every complete line of ``path`` (none if it does not exist)."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append((line.rstrip("\n") + "\n", json.loads(line)))
      except json.JSONDecodeError:  # Empty, or cut short by a kill.
        continue
  return records


def _import_tensorboardx():
  """tensorboardX without the torch import it does when torch is installed (3 s of start-up;
  only its torch-tensor conversions, which we do not use, need it)."""
  if "torch" in sys.modules:
    import tensorboardX

    return tensorboardX
  sys.modules["torch"] = None  # Makes ``import torch`` raise ImportError.
  try:
    import tensorboardX
  finally:
    del sys.modules["torch"]
  return tensorboardX


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All complete records of ``DIR/metrics.jsonl`` in file order (empty if there is none)."""
  return [record for _, record in _records(os.path.join(workdir, METRICS_FILE))]


def _truncate_after(path: str, step: int) -> None:
  """Keeps only complete records with ``record["step"] <= step``; atomic, so a kill while
  this runs leaves the old file."""
  if not os.path.exists(path):
    return
  with open(f"{path}.tmp", "w") as f:
    f.writelines(line for line, record in _records(path) if record["step"] <= step)
  os.replace(f"{path}.tmp", path)


class MetricsLogger:
  """Writes metrics of steps ``start_step + 1 .. total_steps``; only the primary process writes.

  Use as a context manager; ``advance()`` once per step moves the progress bar and
  ``write(step, scalars)`` records a logged step.
  """

  def __init__(self, workdir: str, *, start_step: int, total_steps: int, is_primary: bool):
    self._is_primary = is_primary
    if not is_primary:
      return
    path = os.path.join(workdir, METRICS_FILE)
    _truncate_after(path, start_step)
    self._file = open(path, "a")  # noqa: SIM115  (closed in close())
    tensorboardX = _import_tensorboardx()
    self._tb = tensorboardX.SummaryWriter(
      os.path.join(workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None
    )
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def advance(self) -> None:
    if self._is_primary:
      self._bar.update(1)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._is_primary:
      return
    record = {"step": step, **scalars}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(f"train/{name}", value, step)
    self._bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)

  def close(self) -> None:
    if self._is_primary:
      self._bar.close()
      self._tb.close()
      self._file.close()

  def __enter__(self) -> MetricsLogger:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
