"""Training metrics: ``metrics.jsonl``, TensorBoard events and a progress bar.

Each logged step appends one JSON object to ``DIR/metrics.jsonl`` (at least ``step``,
``loss``, ``learning_rate``, ``grad_norm``, ``tokens_per_second``) and the same scalars to
TensorBoard event files under ``DIR/tensorboard``. On resume from step ``s`` the lines of
steps ``> s`` (written after that checkpoint by a killed run) are dropped first, so the file
never holds duplicate steps.
"""

from __future__ import annotations

import json
import logging
import os
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


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of ``DIR/metrics.jsonl`` in file order (empty if there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int) -> None:
  """Keeps only complete records with ``record["step"] <= step``."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # A line cut short by a kill.
        continue
      if record["step"] <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
  with open(path, "w") as f:
    f.writelines(kept)


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
    import tensorboardX  # Imports torch when installed (2 s): only the writing process pays.

    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
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
