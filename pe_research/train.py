"""Training: AdamW with warmup + cosine, a pure jitted train step, and the loop.

The model is split once with ``nnx.split`` into a static graph and a :class:`TrainState`
pytree; ``train_step(state, batch) -> (state, metrics)`` is a pure function, compiled with
``jax.jit``, donated state and explicit ``NamedSharding``s over a ``("data", "fsdp",
"context")`` mesh of all devices. The batch rows are split over data and fsdp, the sequence
over context; a parameter (and its optimizer moments) is stored split over ``fsdp`` along the
dimensions its logical axis names map there (:mod:`pe_research.sharding`) and gathered for the
step's computation: the whole model at once, or with ``model.scan_layers`` a layer at a time
inside the scan. ``mesh.fsdp=1`` (default) replicates parameters. ``train.grad_accum_steps``
runs the batch as micro-batches in a ``lax.scan``.
Checkpoints count the data read globally, so a run resumes on another number of processes.

After each optimizer update every encoding's ``project`` hook puts constrained parameters back
into their allowed set (KERPLE: r1, r2 >= 1e-2), a projected gradient step as in the reference.

Loss: ``sum(weights * NLL) / sum(weights)``. Learning rate at update ``t`` (0-based):
linear ``lr * t / warmup`` then cosine from ``lr`` to ``lr * min_lr_ratio`` at ``train.steps``.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pe_research import checkpoint, losses, runtime, sharding, signals
from pe_research.metrics import MetricsLogger
from pe_research.model import Transformer
from pe_research.stacking import layers_stacked


class DivergenceError(RuntimeError):
  """Raised with ``train.nan_policy="stop"`` when a step's loss or gradients are not finite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates done so far.
  params: dict[str, Any]  # nnx.Param leaves as a pure dict.
  opt_state: optax.OptState
  model_state: dict[str, Any]  # Every other NNX variable (RNG keys and counters), pure dict.


def decay_mask(params: dict[str, Any]) -> dict[str, Any]:
  """Weight decay on matrices only: leaves with ndim >= 2, not counting the layer axis of
  stacked blocks (``model.scan_layers``), so both layouts decay the same parameters."""
  stacked = layers_stacked(params)
  matrix = lambda key: lambda x: x.ndim - (stacked and key == "blocks") >= 2
  return {key: jax.tree.map(matrix(key), tree) for key, tree in params.items()}


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
    mask=decay_mask,
  )
  if train_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), adamw), schedule
  return adamw, schedule


def state_specs(config: ml_collections.ConfigDict, tx, state: TrainState, mesh) -> TrainState:
  """The stored ``PartitionSpec`` of every leaf of ``state`` (arrays or shape structs) on
  ``mesh`` (a ``Mesh`` or ``AbstractMesh``): parameters by their logical axis names
  (:func:`pe_research.sharding.param_specs`), AdamW moments like their parameters, the rest
  replicated."""
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(config.seed)))
  params = sharding.param_specs(nnx.state(model, nnx.Param), mesh)
  replicated = lambda tree: jax.tree.map(lambda _: P(), tree)
  opt_state = optax.tree_map_params(
    tx, lambda _, spec: spec, state.opt_state, params, transform_non_params=lambda _: P()
  )
  return TrainState(
    step=P(), params=params, opt_state=opt_state, model_state=replicated(state.model_state)
  )


def init_train_state(config: ml_collections.ConfigDict, tx) -> tuple[Any, TrainState]:
  """``(graphdef, state)``: a freshly initialised model and optimizer (traceable: it also runs
  under ``jax.eval_shape`` and ``jax.jit``)."""
  model = Transformer(config, rngs=nnx.Rngs(config.seed))
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    model_state=nnx.to_pure_dict(model_state),
  )
  return graphdef, state


def create_train_state(config: ml_collections.ConfigDict, mesh, tx) -> tuple[Any, TrainState]:
  """``(graphdef, state)`` placed on ``mesh``. With ``fsdp > 1`` it is initialised by a jitted
  function directly into its shards (``state_specs``; no device holds the whole state at
  start-up); with ``fsdp = 1`` every device holds all of it anyway, and eager initialisation
  saves a compile."""
  runtime.warn_slow_dtype(config.model.compute_dtype)
  if mesh.shape["fsdp"] == 1:
    graphdef, state = init_train_state(config, tx)
    return graphdef, jax.device_put(state, NamedSharding(mesh, P()))
  graphdef, abstract = abstract_train_state(config, mesh, tx)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  return graphdef, jax.jit(lambda: init_train_state(config, tx)[1], out_shardings=shardings)()


def abstract_train_state(config: ml_collections.ConfigDict, mesh, tx) -> tuple[Any, TrainState]:
  """``(graphdef, state)`` with ``jax.ShapeDtypeStruct`` leaves carrying their stored shardings
  on ``mesh`` (``state_specs``); nothing is allocated. For ``jit_train_step(...).lower(state,
  batch).compile()`` ahead of time (e.g. for a TPU topology's mesh)."""
  graphdef, abstract = nnx.eval_shape(lambda: init_train_state(config, tx))
  specs = state_specs(config, tx, abstract, mesh)
  place = lambda x, spec: x.update(sharding=NamedSharding(mesh, spec))
  return graphdef, jax.tree.map(place, abstract, specs)


def project_params(graphdef, params: dict[str, Any], model_state: dict[str, Any]):
  """``params`` after each encoding's ``project`` hook (in place on a merged copy), as a pure
  dict. Encodings without constrained parameters leave them unchanged."""
  model = nnx.merge(graphdef, params, model_state)
  model.project()
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _gather(mesh):
  """``params -> params`` in the layout the step computes with (FSDP, ``mesh.fsdp > 1``): the
  whole model gathered, or with stacked layers all but the blocks, whose weights the model
  gathers a layer at a time inside its scan (:func:`pe_research.sharding.gather_layer`).
  Gradients go back to the stored shards through the same constraints."""
  if mesh is None or mesh.shape["fsdp"] == 1:
    return lambda params: params
  gathered = NamedSharding(mesh, P())
  whole = lambda tree: jax.lax.with_sharding_constraint(tree, gathered)
  return lambda params: (
    {key: tree if key == "blocks" else whole(tree) for key, tree in params.items()}
    if layers_stacked(params)
    else whole(params)
  )


def _micro_batches(batch: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
  """``[B, ...]`` arrays -> ``[count, B / count, ...]``; micro-batch ``j`` holds rows ``j,
  j + count, ...``, so each keeps the batch's split over devices (``B / count`` divides by
  data * fsdp)."""
  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 1, 0)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, tx, schedule, mesh=None, grad_accum_steps: int = 1):
  """The pure step ``(state, batch) -> (state, metrics)``; a non-finite step keeps the old
  parameters and optimizer state (``metrics["finite"]`` is False). With ``mesh`` the model is
  traced under it (``jax.sharding.use_abstract_mesh``: its sharding constraints apply) and,
  with ``fsdp > 1``, parameters are gathered for the forward and backward pass (``_gather``),
  so activations stay split over the batch and gradients go back to the stored shards.

  ``grad_accum_steps = k > 1``: the batch is cut into k micro-batches run in a ``lax.scan``;
  the loss's numerator ``sum(w NLL)``, denominator ``sum(w)`` and the numerator's gradient are
  summed over them, then divided: k micro-batches give one batch's loss and gradients."""
  gather = _gather(mesh)

  def forward(params, model_state, batch):
    """``(sum(w NLL), (sum(w), model_state))`` of ``batch``."""
    model = nnx.merge(graphdef, gather(params), model_state)
    logits_BxLxV = model(batch["inputs"], train=True, logits_dtype=model.activation_dtype)
    total, weight = losses.weighted_nll_sums(logits_BxLxV, batch["targets"], batch["weights"])
    return total, (weight, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

  def loss_and_grads(params, model_state, batch):
    """``(loss, grads, model_state)`` of one step's batch."""
    if grad_accum_steps == 1:

      def loss_fn(params):
        total, (weight, new_model_state) = forward(params, model_state, batch)
        return total / jnp.maximum(weight, 1.0), new_model_state

      (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return loss, grads, model_state

    def accumulate(carry, micro_batch):
      total, weight, grads, model_state = carry
      (part, (part_weight, model_state)), part_grads = jax.value_and_grad(forward, has_aux=True)(
        params, model_state, micro_batch
      )
      grads = jax.tree.map(jnp.add, grads, part_grads)
      return (total + part, weight + part_weight, grads, model_state), None

    zero = jnp.zeros((), jnp.float32)
    carry = (zero, zero, jax.tree.map(jnp.zeros_like, params), model_state)
    micro_batches = _micro_batches(batch, grad_accum_steps)
    (total, weight, grads, model_state), _ = jax.lax.scan(accumulate, carry, micro_batches)
    weight = jnp.maximum(weight, 1.0)
    return total / weight, jax.tree.map(lambda g: g / weight, grads), model_state

  def update(state: TrainState, batch: dict[str, jax.Array]):
    loss, grads, model_state = loss_and_grads(state.params, state.model_state, batch)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = project_params(graphdef, params, state.model_state)
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

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    if mesh is None:
      return update(state, batch)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return update(state, batch)

  return train_step


def jit_train_step(
  graphdef,
  tx,
  schedule,
  state: TrainState,
  mesh,
  steps_per_call: int = 1,
  grad_accum_steps: int = 1,
):
  """``make_train_step`` compiled with the state's shardings and donated state (``state``:
  arrays, or shape structs with shardings to ``.lower(...).compile()`` ahead of time).

  With ``steps_per_call > 1`` the compiled call runs that many steps, a ``lax.scan`` over
  batches stacked on a leading axis of that size (``sharding.global_batch(..., stacked=True)``),
  and returns each metric with that leading axis. On the CPU this matters: XLA:CPU allocates a
  call's temporary buffers afresh and the kernel faults every page of them in again;
  ``steps_per_call`` steps per call pay that once (docs/cpu_performance.md, "third round").
  """
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  replicated = NamedSharding(mesh, P())
  step = make_train_step(graphdef, tx, schedule, mesh, grad_accum_steps)
  if steps_per_call > 1:
    step = functools.partial(jax.lax.scan, step, length=steps_per_call)
  return jax.jit(
    step,
    in_shardings=(state_shardings, sharding.batch_sharding(mesh, stacked=steps_per_call > 1)),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


def _fetch(pending: list[dict], first_step: int, policy: str, last_checkpoint: int | None):
  """Device metrics of steps ``first_step, ...`` to host, one record per step (a call of
  several steps has its metrics stacked on a leading axis); applies ``train.nan_policy``."""
  records = []
  for metrics in jax.device_get(pending):
    if np.ndim(metrics["loss"]) == 0:
      records.append(metrics)
    else:
      records += [{k: v[i] for k, v in metrics.items()} for i in range(len(metrics["loss"]))]
  for offset, record in enumerate(records):
    if not record["finite"] and policy == "stop":
      good = "none" if last_checkpoint is None else f"step {last_checkpoint}"
      raise DivergenceError(
        f"step {first_step + offset}: loss or gradients are not finite; last good checkpoint: "
        f"{good} (train.nan_policy='skip' skips such steps instead)"
      )
    if not record["finite"]:
      logging.warning("step %d: loss or gradients are not finite; skipped", first_step + offset)
  return records


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains ``config`` in ``workdir`` until ``train.steps``, resuming from its latest checkpoint."""
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = make_optimizer(config.train)
  graphdef, state = create_train_state(config, mesh, tx)
  # Imported here: the step and state above need no data stack (TFDS, grain), so benchmarks
  # run on machines that have only JAX (benchmarks/gpu_benchmark.py).
  from pe_research.data import make_train_iterator

  data_iter = make_train_iterator(
    config, process_index=jax.process_index(), process_count=jax.process_count()
  )
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  checkpointer.check_disk_space(state)
  start = checkpointer.latest_step()
  if start is not None and os.path.exists(os.path.join(workdir, checkpoint.IMPORTED_FILE)):
    raise checkpoint.WorkdirError(
      f"--workdir={workdir!r} holds an imported model (parameters only); allowed: fine-tune it "
      f"from a new --workdir with --config.init_from={workdir}"
    )
  if start is not None:
    state, data_state = checkpointer.restore(start, state)
    data_iter.set_state(checkpoint.local_data_state(data_state, jax.process_count()))
  elif config.init_from:
    state = state.replace(params=checkpoint.load_params(config.init_from, state.params))
  k = config.train.steps_per_call
  accum = config.train.grad_accum_steps
  step_fns = {1: jit_train_step(graphdef, tx, schedule, state, mesh, 1, accum)}  # Compiled on use.
  if k > 1:
    step_fns[k] = jit_train_step(graphdef, tx, schedule, state, mesh, k, accum)
  logger = MetricsLogger(
    workdir,
    start_step=start or 0,
    total_steps=config.train.steps,
    is_primary=jax.process_index() == 0,
  )
  try:
    with logger, signals.stop_requests() as should_stop:
      return _loop(config, state, step_fns, data_iter, mesh, checkpointer, logger, should_stop)
  finally:
    checkpointer.close()


def _loop(config, state, step_fns, data_iter, mesh, checkpointer, logger, should_stop):
  """Steps ``state.step + 1 .. train.steps``: log every ``log_every``, save every
  ``checkpoint_every``, at the end, and after the call in which ``should_stop(step)`` (SIGTERM,
  SIGINT) ends the run early. ``step_fns[n]`` runs ``n`` steps per call: the largest ``n``
  (``train.steps_per_call``) runs steps ``s + 1 .. s + n`` when none of them but the last logs,
  saves or ends the run; otherwise one step runs per call."""
  train_cfg = config.train
  start = step = int(state.step)
  k = max(step_fns)
  tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
  pending, timer, timed_from = [], time.perf_counter(), start
  while step < train_cfg.steps:
    boundary = min(
      (step // train_cfg.log_every + 1) * train_cfg.log_every,
      (step // train_cfg.checkpoint_every + 1) * train_cfg.checkpoint_every,
      train_cfg.steps,
    )
    n = k if step + k <= boundary else 1
    batches = sharding.global_batches([next(data_iter) for _ in range(n)], mesh)
    state, metrics = step_fns[n](state, batches)
    first_call = step == start
    step += n
    pending.append(metrics)
    for _ in range(n):
      logger.advance()
    is_log = step % train_cfg.log_every == 0 or step == train_cfg.steps
    stop = should_stop(step)
    is_save = step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps or stop
    if is_log or is_save:
      first = step - sum(np.size(m["loss"]) for m in pending) + 1
      records = _fetch(pending, first, train_cfg.nan_policy, checkpointer.latest_step())
      pending = []
    if is_log:
      now = time.perf_counter()
      scalars = {name: float(v) for name, v in records[-1].items() if name != "finite"}
      scalars["tokens_per_second"] = tokens_per_step * (step - timed_from) / (now - timer)
      logger.write(step, scalars)
      timer, timed_from = now, step
    if is_save:
      data_state = checkpoint.global_data_state(data_iter.get_state(), jax.process_count())
      checkpointer.save(step, state, data_state, config)
    if stop:
      logging.warning("step %d: stopped by a signal; checkpoint saved, rerun to resume", step)
      break
    if first_call and not is_log:  # Keep compilation out of the throughput.
      jax.block_until_ready(state)
      timer, timed_from = time.perf_counter(), step
  return state
