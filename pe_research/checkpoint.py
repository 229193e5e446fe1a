"""Checkpoints of a run's workdir (Orbax ``CheckpointManager``, ``args`` API).

Layout of ``DIR``::

  config.json                 the run's resolved config (written before training starts)
  checkpoints/<step>/params   model parameters (nnx.Param leaves, a pure dict)
  checkpoints/<step>/state    {"step", "opt_state", "model_state"}; model_state holds the
                              model's other NNX state, e.g. RNG keys and counters
  checkpoints/<step>/data     the data iterator's state (JSON)
  checkpoints/<step>/config   the config (JSON)

Restoring into a placed train state gives every array that state's sharding. The data state
saved is process 0's; the grain pipeline's state (a count of elements read) is the same on
every process, so every process restores from it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from pe_research import config_lib

CONFIG_FILE = "config.json"


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _state_item(state) -> dict[str, Any]:
  return {"step": state.step, "opt_state": state.opt_state, "model_state": state.model_state}


class Checkpointer:
  """Saves and restores a train state (``step, params, opt_state, model_state`` fields)."""

  def __init__(self, workdir: str, *, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict) -> None:
    """Starts an asynchronous save of ``state`` at ``step`` (the arrays are copied first)."""
    self._manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        state=ocp.args.StandardSave(_state_item(state)),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_lib.config_to_dict(config)),
      ),
    )

  def restore(self, step: int, like) -> tuple[Any, dict]:
    """``(state, data_state)`` saved at ``step``; shapes, dtypes and shardings from ``like``."""
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(like.params)),
        state=ocp.args.StandardRestore(_abstract(_state_item(like))),
        data=ocp.args.JsonRestore(),
      ),
    )
    state = like.replace(params=restored.params, **restored.state)
    return state, restored.data

  def close(self) -> None:
    """Waits for a save in flight, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def load_params(workdir: str, like: Any) -> Any:
  """Parameters of the latest checkpoint of the run in ``workdir`` (for ``init_from``)."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f"init_from={workdir!r} has no checkpoint; allowed: a run's workdir")
    restored = manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(like)))
    )
  return restored.params


def record_config(workdir: str, config: ml_collections.ConfigDict, *, write: bool) -> None:
  """Checks ``config`` against ``DIR/config.json`` (see ``check_resumable``), then writes it.

  Raises:
    ValueError: the workdir holds a run with another config (only train.steps may change).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      config_lib.check_resumable(json.load(f), config, workdir)
  if write:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      f.write(config.to_json(indent=2) + "\n")
