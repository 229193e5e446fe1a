"""Checkpoints of a run's workdir (Orbax ``CheckpointManager``, ``args`` API) and their integrity.

Layout of ``DIR``::

  config.json                 the run's resolved config (``pe_research.workdirs``)
  checkpoints/<step>/params   model parameters (nnx.Param leaves, a pure dict)
  checkpoints/<step>/state    {"step", "opt_state", "model_state"}; model_state holds the
                              model's other NNX state, e.g. RNG keys and counters
  checkpoints/<step>/data     the data iterator's state (JSON)
  checkpoints/<step>/config   the config (JSON)
  checkpoints/<step>/integrity.json   {file: [bytes, CRC32]} of every file of the four above
  checkpoints_damaged/<step>  damaged checkpoints moved aside on resume (never deleted)

Every checkpoint carries ``integrity.json`` (``pe_research.integrity``). Resuming uses the
newest intact checkpoint and moves newer damaged ones to ``checkpoints_damaged/`` (with a
warning naming both steps), so Orbax's ``max_to_keep`` pruning, which deletes the oldest only
after a new checkpoint is committed, never counts them nor deletes the only intact one.

Restoring into a placed train state gives every array that state's sharding. The data state
saved is process 0's; the grain pipeline's state (a count of elements read) is the same on
every process, so every process restores from it. Decisions about the workdir are made on
process 0 and shared (``workdirs.on_primary``).
"""

from __future__ import annotations

import collections
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pe_research import config_lib, integrity, workdirs
from pe_research.integrity import WorkdirError
from pe_research.stacking import layers_stacked, stack_layers, unstack_layers

# Written by ``python -m pe_research.pretrained import``: its checkpoint has no optimizer state.
IMPORTED_FILE = "imported.json"


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _state_item(state) -> dict[str, Any]:
  return {"step": state.step, "opt_state": state.opt_state, "model_state": state.model_state}


def latest_intact_step(workdir: str) -> int | None:
  """The step of ``workdir``'s newest intact checkpoint (None: no checkpoint); warns about
  newer damaged ones and raises WorkdirError if every checkpoint is damaged."""
  step, damaged = integrity.newest_intact(workdir)
  if damaged:
    logging.warning("%s: damaged checkpoint %s; using step %d", workdir, "; ".join(damaged), step)
  return step


def _gib(size: float) -> str:
  return f"{size / 2**30:.3g} GiB"


class Checkpointer:
  """Saves and restores a train state (``step, params, opt_state, model_state`` fields).

  On creation, damaged checkpoints newer than the newest intact one are moved aside, so
  ``latest_step()`` is the step to resume from.
  """

  def __init__(self, workdir: str, *, keep: int):
    workdir = workdirs.absolute(workdir)
    self._workdir, self._keep = workdir, keep
    self._dir = os.path.join(workdir, "checkpoints")
    workdirs.on_primary(lambda: integrity.quarantine(workdir))
    self._sealing = collections.deque()  # Steps being saved, oldest first (process 0 only).
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      cleanup_tmp_directories=True,  # Saves cut short by a kill.
      async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_oldest),
    )
    self._manager = ocp.CheckpointManager(self._dir, options=options)

  def _seal_oldest(self) -> None:
    """Orbax calls this on process 0 once every file of a save is written, before renaming
    its temporary directory (``<step>.orbax-checkpoint-tmp``) to ``<step>``."""
    step_dir = os.path.join(self._dir, str(self._sealing.popleft()))
    tmp_dir = step_dir + ocp.path.atomicity_types.TMP_DIR_SUFFIX
    integrity.seal(tmp_dir if os.path.isdir(tmp_dir) else step_dir)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def check_disk_space(self, state) -> None:
    """Raises WorkdirError unless the disk has room for the checkpoints still to be written:
    ``keep + 1`` copies of ``state`` (a new one is committed before the oldest is deleted),
    less those on disk already, plus 10%."""
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    count = max(1, self._keep + 1 - len(self._manager.all_steps()))

    def check() -> None:
      needed, free = 1.1 * size * count, shutil.disk_usage(self._dir).free
      if free < needed:
        raise WorkdirError(
          f"--workdir={self._workdir!r}: its disk has {_gib(free)} free, {count} more "
          f"checkpoints of {_gib(size)} need {_gib(needed)}; allowed: free space, a smaller "
          "train.keep_checkpoints, or a --workdir on another disk"
        )

    workdirs.on_primary(check)

  def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict) -> None:
    """Starts an asynchronous save of ``state`` at ``step`` (the arrays are copied first)."""
    if jax.process_index() == 0:
      self._sealing.append(step)
    saved = self._manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        state=ocp.args.StandardSave(_state_item(state)),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_lib.config_to_dict(config)),
      ),
    )
    if not saved and jax.process_index() == 0:
      self._sealing.pop()

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


def _layer_struct(x: jax.ShapeDtypeStruct, i: int) -> jax.ShapeDtypeStruct:
  """One layer of a stacked leaf's shape struct (``i`` unused: every layer has the same)."""
  del i
  sharding = x.sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def _stacked_struct(xs: list[jax.ShapeDtypeStruct]) -> jax.ShapeDtypeStruct:
  sharding = xs[0].sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
  return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype, sharding=sharding)


def load_params(workdir: str, like: Any, step: int | None = None) -> Any:
  """Parameters of the checkpoint at ``step`` (default: the newest intact one) of ``workdir``,
  in ``like``'s layout: a checkpoint with per-layer blocks loads into stacked ``like``
  (``model.scan_layers``) and vice versa (:func:`pe_research.model.stack_layers`)."""
  step = latest_intact_step(workdir) if step is None else step
  if step is None:
    raise ValueError(f"init_from={workdir!r} has no checkpoint; allowed: a run's workdir")
  target = _abstract(like)
  directory = os.path.join(workdirs.absolute(workdir), "checkpoints")
  handlers = {"params": ocp.StandardCheckpointHandler()}  # For the saved tree's metadata.
  with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
    saved = manager.item_metadata(step)["params"]
    stacked, saved_stacked = layers_stacked(like), layers_stacked(saved)
    if stacked and not saved_stacked:
      target = unstack_layers(target, take=_layer_struct)
    elif saved_stacked and not stacked:
      target = stack_layers(target, stack=_stacked_struct)
    restored = manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
    )["params"]
  if stacked == saved_stacked:
    return restored
  restored = stack_layers(restored) if stacked else unstack_layers(restored)
  return jax.device_put(restored, jax.tree.map(lambda x: x.sharding, _abstract(like)))


def global_data_state(local_state: dict, process_count: int) -> dict:
  """Process ``p`` of ``P`` reads global elements ``p, p+P, ...``, so its grain ``next_index``
  ``n`` means ``n * P`` global elements read; checkpoints keep that global count so a run
  resumes on any number of processes."""
  return {**local_state, "next_index": local_state["next_index"] * process_count}


def local_data_state(saved_state: dict, process_count: int) -> dict:
  """Inverse of ``global_data_state`` (``train.batch_size`` divides by ``process_count``)."""
  return {**saved_state, "next_index": saved_state["next_index"] // process_count}
