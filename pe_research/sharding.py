"""Sharding, declared once: logical axis names mapped to mesh axes by one table.

Parameters carry logical axis names from where they are created (the ``out_sharding`` metadata
of their ``nnx.Param``, e.g. ``("embed", "mlp")`` for the MLP's first kernel; stacked layers
get ``"layers"`` in front); activations get names at a few places in the model (the embedding
output and the residual stream between blocks). ``LOGICAL_AXIS_RULES`` maps each name to axes of
the ``("data", "fsdp", "context")`` mesh (:func:`make_mesh`), as maxtext's
``logical_axis_rules``:

  batch   -> data, fsdp   activations' batch: data parallelism over both axes
  length  -> context      activations' sequence (context parallelism)
  embed   -> fsdp         every weight's model-width dimension: FSDP stores 1/fsdp per device
  layers, heads, mlp, vocab -> replicated

A dimension that its mesh axes do not divide is replicated, and so is a parameter without names
(the encodings' small tables). The same names give two layouts: *stored* (the table) and
*gathered* (the table without ``fsdp``), the layout a layer's weights are used in.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context")
BATCH_AXES = ("data", "fsdp")  # A batch's rows.
LOGICAL_AXIS_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", "context"),
  ("embed", "fsdp"),
  ("layers", None),
  ("heads", None),
  ("mlp", None),
  ("vocab", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def logical_spec(names, shape, mesh, *, gathered: bool = False) -> P:
  """The ``PartitionSpec`` of an array of ``shape`` whose dimensions are named ``names``
  (None: replicated) on ``mesh``; ``gathered`` leaves ``fsdp`` out."""
  spec = []
  for name, size in zip(names, shape, strict=True):
    rule = _RULES[name] if name is not None else None
    axes = rule if isinstance(rule, tuple) else (rule,)
    axes = tuple(a for a in axes if a in mesh.shape and not (gathered and a == "fsdp"))
    count = math.prod(mesh.shape[a] for a in axes)
    spec.append(None if count == 1 or size % count else axes if len(axes) > 1 else axes[0])
  return P(*spec)


def _names(variable: nnx.Variable) -> tuple | None:
  return variable.get_metadata().get("out_sharding")


def param_specs(params: nnx.State, mesh) -> dict:
  """The stored ``PartitionSpec`` of each parameter of ``params`` (an ``nnx.State`` of
  ``nnx.Param``s, abstract or not), as a pure dict like ``nnx.to_pure_dict(params)``."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  spec = lambda v: v.replace(logical_spec(_names(v) or (None,) * len(v.shape), v.shape, mesh))
  return nnx.to_pure_dict(jax.tree.map(spec, params, is_leaf=is_var))


def _active_mesh():
  """The mesh the model is traced under (``jax.sharding.use_abstract_mesh``), None if none or
  a single device."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def constrain(x: jax.Array, *names) -> jax.Array:
  """``x`` constrained to the layout of its dimensions' logical ``names`` (identity with no
  mesh)."""
  mesh = _active_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))


def gather_layer(layer: nnx.State, dtype) -> nnx.State:
  """One layer's named weights, sliced from the stacked layers inside the scan body, cast to
  ``dtype`` and gathered over ``fsdp``: constrained to their stored layout (so their gradient
  goes back to it), cast, then constrained to the gathered layout (cast before the gather: a
  bfloat16 gather moves half the bytes)."""
  mesh = _active_mesh()

  def gather(variable: nnx.Variable) -> nnx.Variable:
    x, names = variable[...], _names(variable)
    if not names:  # Small unnamed parameters (a per-layer encoding's) are replicated.
      return variable
    names = names[1:]  # Without the stacked "layers" axis.
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))
    if jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(dtype)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh, gathered=True))
    return variable.replace(x)

  return jax.tree.map(gather, layer, is_leaf=lambda x: isinstance(x, nnx.Variable))


def per_batch_shard(fn, *xs_BxX):
  """``fn(*xs)`` on each device's rows under ``jax.shard_map`` when a mesh of several devices is
  active (else ``fn(*xs)``): XLA cannot partition a Pallas (Mosaic) kernel itself. The batch is
  split over the ``batch`` rule's axes when they divide B; ``[1, ...]`` inputs (shared
  positions) and None are replicated. Arrays ``fn`` closes over (a bias's parameters) enter
  replicated; their gradients are summed over the shards by the transpose."""
  mesh = _active_mesh()
  if mesh is None:
    return fn(*xs_BxX)
  b = xs_BxX[0].shape[0]
  batch = logical_spec(("batch",), (b,), mesh)
  spec = lambda x: P(*batch) if x is not None and x.shape[0] == b else P()
  return jax.shard_map(
    fn, mesh=mesh, in_specs=tuple(map(spec, xs_BxX)), out_specs=P(*batch), check_vma=False
  )(*xs_BxX)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, device_count: int) -> tuple[int, int, int]:
  """``(data, fsdp, context)`` sizes for ``device_count`` devices; ``mesh.data=-1`` takes what
  fsdp and context leave, so a config runs unchanged on any device count they divide."""
  context = mesh_cfg.get("context", 1)
  data = device_count // (mesh_cfg.fsdp * context) if mesh_cfg.data == -1 else mesh_cfg.data
  return data, mesh_cfg.fsdp, context


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """``devices`` (default: all, every process's) as a ``("data", "fsdp", "context")`` mesh
  (``mesh_shape``). Axes are ``Auto``: XLA propagates shardings from the explicit in/out
  shardings and the constraints of this module."""
  devices = jax.devices() if devices is None else devices
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh, stacked: bool = False) -> NamedSharding:
  """Batch rows over ``BATCH_AXES``, the sequence over ``context`` (after a leading axis of
  steps when ``stacked``)."""
  spec = (BATCH_AXES, "context")
  return NamedSharding(mesh, P(None, *spec) if stacked else P(*spec))


def global_batch(local: dict[str, np.ndarray], mesh, stacked: bool = False) -> dict[str, jax.Array]:
  """This process's rows of the batch -> global arrays split over ``BATCH_AXES`` (the second
  axis when ``stacked``: batches of several steps on a leading axis)."""
  layout = batch_sharding(mesh, stacked)
  return {k: jax.make_array_from_process_local_data(layout, v) for k, v in local.items()}


def global_batches(local: list[dict[str, np.ndarray]], mesh) -> dict[str, jax.Array]:
  """This process's batches of consecutive steps -> the global input of one call: one batch as
  is, several stacked on a leading axis (``jit_train_step(..., steps_per_call=len(local))``)."""
  if len(local) == 1:
    return global_batch(local[0], mesh)
  stacked = {key: np.stack([batch[key] for batch in local]) for key in local[0]}
  return global_batch(stacked, mesh, stacked=True)
