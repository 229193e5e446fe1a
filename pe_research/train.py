"""Training: AdamW with warmup + cosine, a pure jitted train step, and the loop.

The model is split once with ``nnx.split`` into a static graph and a :class:`TrainState`
pytree; ``train_step(state, batch) -> (state, metrics)`` is a pure function, compiled with
``jax.jit``, donated state and explicit ``NamedSharding``s over a ``("data", "fsdp")`` mesh of
all devices. The batch is split over both axes; a parameter (and its optimizer moments) is
split over ``fsdp`` along its first dimension divisible by the ``fsdp`` size, so
``mesh.fsdp=1`` (default) replicates parameters.

Loss: ``sum(weights * NLL) / sum(weights)``. Learning rate at update ``t`` (0-based):
linear ``lr * t / warmup`` then cosine from ``lr`` to ``lr * min_lr_ratio`` at ``train.steps``.
"""

from __future__ import annotations

import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pe_research import checkpoint
from pe_research.data import make_train_iterator
from pe_research.metrics import MetricsLogger
from pe_research.model import Transformer

BATCH_AXES = ("data", "fsdp")


class DivergenceError(RuntimeError):
  """Raised with ``train.nan_policy="stop"`` when a step's loss or gradients are not finite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates done so far.
  params: dict[str, Any]  # nnx.Param leaves as a pure dict.
  opt_state: optax.OptState
  model_state: dict[str, Any]  # Every other NNX variable (RNG keys and counters), pure dict.


def make_optimizer(train_cfg: ml_collections.ConfigDict):
  """``(tx, schedule)``: AdamW (decay on ndim >= 2 only) after global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=train_cfg.lr,
    warmup_steps=train_cfg.warmup_steps,
    decay_steps=train_cfg.steps,
    end_value=train_cfg.lr * train_cfg.min_lr_ratio,
  )
  adamw = optax.adamw(
    schedule,
    b1=train_cfg.b1,
    b2=train_cfg.b2,
    weight_decay=train_cfg.weight_decay,
    mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
  )
  if train_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), adamw), schedule
  return adamw, schedule


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """``devices`` (default: all) as a ``(data, fsdp)`` mesh; ``mesh.data=-1`` takes what fsdp
  leaves. Axes are ``Auto``: XLA propagates shardings from the explicit in/out shardings."""
  devices = jax.devices() if devices is None else devices
  data = len(devices) // mesh_cfg.fsdp if mesh_cfg.data == -1 else mesh_cfg.data
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, mesh_cfg.fsdp), ("data", "fsdp"), auto, devices=devices)


def array_sharding(x: Any, mesh: jax.sharding.Mesh) -> NamedSharding:
  """Shards the first dimension divisible by the fsdp size over ``fsdp``; else replicates."""
  fsdp = mesh.shape["fsdp"]
  shape = getattr(x, "shape", ())
  dims = [i for i, size in enumerate(shape) if fsdp > 1 and size % fsdp == 0]
  spec = [None] * len(shape)
  if dims:
    spec[dims[0]] = "fsdp"
  return NamedSharding(mesh, P(*spec))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def create_train_state(config: ml_collections.ConfigDict, mesh, tx) -> tuple[Any, TrainState]:
  """``(graphdef, state)``: a freshly initialised model and optimizer, placed on ``mesh``."""
  model = Transformer(config, rngs=nnx.Rngs(config.seed))
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    model_state=nnx.to_pure_dict(model_state),
  )
  return graphdef, jax.device_put(state, jax.tree.map(lambda x: array_sharding(x, mesh), state))


def weighted_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL) -> jax.Array:
  """``sum(weights * NLL) / sum(weights)`` in float32 (0 if every weight is 0)."""
  nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  return jnp.sum(weights_BxL * nll_BxL) / jnp.maximum(jnp.sum(weights_BxL), 1.0)


def make_train_step(graphdef, tx, schedule):
  """The pure step ``(state, batch) -> (state, metrics)``; a non-finite step keeps the old
  parameters and optimizer state (``metrics["finite"]`` is False)."""

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.model_state)
      logits_BxLxV = model(batch["inputs"], train=True)
      loss = weighted_cross_entropy(logits_BxLxV, batch["targets"], batch["weights"])
      return loss, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))

    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
      step=state.step + 1,
      params=keep_if_finite(params, state.params),
      opt_state=keep_if_finite(opt_state, state.opt_state),
      model_state=model_state,
    )
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "learning_rate": schedule(state.step),
      "finite": finite,
    }
    return new_state, metrics

  return train_step


def jit_train_step(graphdef, tx, schedule, state: TrainState, mesh):
  """``make_train_step`` compiled with the state's shardings and donated state."""
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  return jax.jit(
    make_train_step(graphdef, tx, schedule),
    in_shardings=(state_shardings, batch_sharding(mesh)),
    out_shardings=(state_shardings, NamedSharding(mesh, P())),
    donate_argnums=0,
  )


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's rows of the batch -> global arrays split over ``BATCH_AXES``."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _fetch(pending: list[dict], first_step: int, policy: str, last_checkpoint: int | None):
  """Device metrics of steps ``first_step, ...`` to host; applies ``train.nan_policy``."""
  records = jax.device_get(pending)
  for offset, record in enumerate(records):
    if not record["finite"] and policy == "stop":
      good = "none" if last_checkpoint is None else f"step {last_checkpoint}"
      raise DivergenceError(
        f"step {first_step + offset}: loss or gradients are not finite; last good checkpoint: "
        f"{good} (train.nan_policy='skip' skips such steps instead)"
      )
  return records


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains ``config`` in ``workdir`` until ``train.steps``, resuming from its latest checkpoint."""
  mesh = make_mesh(config.mesh)
  tx, schedule = make_optimizer(config.train)
  graphdef, state = create_train_state(config, mesh, tx)
  data_iter = make_train_iterator(
    config, process_index=jax.process_index(), process_count=jax.process_count()
  )
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  start = checkpointer.latest_step()
  if start is not None:
    state, data_state = checkpointer.restore(start, state)
    data_iter.set_state(data_state)
  elif config.init_from:
    state = state.replace(params=checkpoint.load_params(config.init_from, state.params))
  step_fn = jit_train_step(graphdef, tx, schedule, state, mesh)
  logger = MetricsLogger(
    workdir,
    start_step=start or 0,
    total_steps=config.train.steps,
    is_primary=jax.process_index() == 0,
  )
  try:
    with logger:
      return _loop(config, state, step_fn, data_iter, mesh, checkpointer, logger)
  finally:
    checkpointer.close()


def _loop(config, state, step_fn, data_iter, mesh, checkpointer, logger) -> TrainState:
  """Steps ``state.step + 1 .. train.steps``: log every ``log_every``, save every
  ``checkpoint_every`` and at the end."""
  train_cfg = config.train
  start = int(state.step)
  tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
  pending, timer, timed_from = [], time.perf_counter(), start
  for step in range(start + 1, train_cfg.steps + 1):
    state, metrics = step_fn(state, global_batch(next(data_iter), mesh))
    pending.append(metrics)
    logger.advance()
    is_log = step % train_cfg.log_every == 0 or step == train_cfg.steps
    is_save = step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps
    if is_log or is_save:
      first = step - len(pending) + 1
      records = _fetch(pending, first, train_cfg.nan_policy, checkpointer.latest_step())
      pending = []
    if is_log:
      now = time.perf_counter()
      scalars = {k: float(v) for k, v in records[-1].items() if k != "finite"}
      scalars["tokens_per_second"] = tokens_per_step * (step - timed_from) / (now - timer)
      logger.write(step, scalars)
      timer, timed_from = now, step
    if is_save:
      checkpointer.save(step, state, data_iter.get_state(), config)
    if step == start + 1 and not is_log:  # Keep compilation out of the throughput.
      jax.block_until_ready(state)
      timer, timed_from = time.perf_counter(), step
  return state
