r"""``--dry_run``: the mesh, batch split, memory per device and length of a run, without training.

Run as ``python -m pe_research.dry_run --config=... --topology=v5e:16x16`` (or
``--devices=8 --chip=h100``) it instead compiles the real training step for that mesh and prints
XLA's memory per device next to the chip's: ``pe_research.aot``. The estimate below is
``python -m pe_research.main --dry_run``.

Nothing is allocated: the train state's shapes come from ``jax.eval_shape`` of its
initialisation, and ``device_count`` may be any number (``--dry_run_devices=256`` shows a pod's
plan on a laptop). Per device, with ``b`` the per-device micro-batch (``train.batch_size /
grad_accum_steps / (data · fsdp)``), ``L = train.seq_len / mesh.context``, model width ``D``,
``H`` heads of ``E``, MLP width ``F`` (``F_up = 2F`` for swiglu), vocabulary ``V``, ``s`` bytes
per compute-dtype element and float32 everywhere else:

  parameters   Σ over leaves of one shard's bytes, each leaf split as ``train.state_specs``
               stores it (the model width over ``mesh.fsdp``, pe_research/sharding.py)
  optimizer    the same over the AdamW state (two moments per parameter)
  gradients    the same as parameters (float32, sharded like them)
  gathered     with fsdp > 1, the whole parameters, gathered for the forward and backward pass;
               with ``model.scan_layers`` one layer's (in ``model.gather_dtype``) and the rest
  activations  what the backward pass keeps, per layer (``model.remat="none"``)
                 b·L·(D·(16 + 2s) + 6·H·E·s + (F_up + 2F)·s)   2 norms (input, normalised,
                                                  output), q/k/v before and after the encoding,
                                                  attention output, MLP up/activation/inner
                 + 2·b·H·L²·4                     dense/xla logits and probabilities
               (blockwise, pallas, splash and fast attention recompute their blocks: no L² term),
               plus the head's b·L·(D·(8 + s) + 2·V·4) for the final norm, logits and their
               softmax. With remat
               a layer keeps its input b·L·D·4 (``full``), plus its projections'
               outputs b·L·(2D + 2·H·E + (H + 2G)·E + F_up)·s (``save_projections``), and one
               layer's activations are rebuilt at a time in the backward pass.
               An estimate: within ~25% of XLA's own count on CPU in float32 (where bfloat16 is
               computed in float32, so bfloat16 there needs up to twice this).
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np

from pe_research import sharding, train
from pe_research.model_size import flops_per_token, kv_heads, resolved_dims
from pe_research.sharding import MESH_AXES


def _bytes(x: jax.ShapeDtypeStruct, spec, mesh) -> tuple[int, int]:
  """``(total, per_device)`` bytes of one train-state leaf stored as ``spec`` on ``mesh``."""
  split = lambda axes: math.prod(
    mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))
  )
  shard = [size // split(axes) if axes else size for size, axes in zip(x.shape, spec, strict=False)]
  itemsize = np.dtype(x.dtype).itemsize if np.issubdtype(x.dtype, np.number) else 8
  return math.prod(x.shape) * itemsize, math.prod(shard) * itemsize


def _tree_bytes(tree, specs, mesh) -> tuple[int, int]:
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  sizes = [
    _bytes(x, spec, mesh)
    for x, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=is_spec), strict=True)
  ]
  return sum(t for t, _ in sizes), sum(d for _, d in sizes)


def activation_bytes(config: ml_collections.ConfigDict, per_device_batch: int) -> int:
  """Estimated activation bytes one device keeps for the backward pass (module docstring)."""
  m = config.model
  length = config.train.seq_len // config.mesh.get("context", 1)
  head_dim, mlp_dim = resolved_dims(m)
  s = 2 if m.compute_dtype == "bfloat16" else 4
  hk, d = m.num_heads * head_dim, m.model_dim
  mlp_up = 2 * mlp_dim if m.mlp == "swiglu" else mlp_dim
  per_token = d * (16 + 2 * s) + 6 * hk * s + (mlp_up + 2 * mlp_dim) * s
  linear = m.attention in ("blockwise", "pallas", "splash", "fast")  # Recompute their blocks.
  attention = 0 if linear else 2 * m.num_heads * length * length * 4
  per_layer = per_device_batch * (length * per_token + attention)
  head = per_device_batch * length * (d * (8 + s) + 2 * m.vocab_size * 4)
  remat = m.get("remat", "none")
  if remat == "none":
    return m.num_layers * per_layer + head
  kept = d * 4  # The block's input.
  if remat == "save_projections":
    kept += (2 * d + 2 * hk + (m.num_heads + 2 * kv_heads(m)) * head_dim + mlp_up) * s
  return m.num_layers * per_device_batch * length * kept + per_layer + head


def _size(n: float) -> str:
  """``n`` bytes in the largest binary unit that keeps the number >= 1."""
  unit = max(i for i in range(4) if n >= 1024**i or i == 0)
  return f"{n / 1024**unit:,.1f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


def plan_text(
  config: ml_collections.ConfigDict, *, device_count: int, process_count: int | None = None
) -> str:
  """The dry-run text for ``config`` on ``device_count`` devices in ``process_count``
  processes (None: a planned device count, processes unknown); ``config`` is already
  validated for that device count."""
  t, m = config.train, config.model
  data, fsdp, context = sharding.mesh_shape(config.mesh, device_count)
  mesh = jax.sharding.AbstractMesh((data, fsdp, context), MESH_AXES)
  tx, _ = train.make_optimizer(t)
  state = jax.eval_shape(lambda: train.init_train_state(config, tx)[1])
  specs = train.state_specs(config, tx, state, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  params, params_dev = _tree_bytes(state.params, specs.params, mesh)
  opt, opt_dev = _tree_bytes(state.opt_state, specs.opt_state, mesh)
  accum = t.get("grad_accum_steps", 1)
  per_device = t.batch_size // accum // (data * fsdp)
  acts = activation_bytes(config, per_device)
  head_dim, mlp_dim = resolved_dims(m)
  tokens = t.steps * t.batch_size * t.seq_len
  gathered = params if fsdp > 1 else 0
  if fsdp > 1 and m.get("scan_layers", False):  # One layer in gather_dtype, the rest whole.
    blocks = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params["blocks"]))
    gather_size = 2 if m.get("gather_dtype", "float32") == "bfloat16" else 4
    gathered = params - blocks + blocks // m.num_layers * gather_size // 4
  split = "replicated" if fsdp == 1 else f"split over fsdp={fsdp} where a dimension divides"
  processes = f" in {process_count} process(es)" if process_count else " (planned, not present)"
  batch = f"global {t.batch_size} × {t.seq_len} tokens; per device {per_device}"
  if accum > 1:
    batch += f" × {accum} micro-batches"
  if context > 1:
    batch += f" × {t.seq_len // context} tokens (sequence split over context={context})"
  if process_count and process_count > 1:
    batch += f"; per process {t.batch_size // process_count}"
  lines = [
    f"devices       {device_count}{processes}",
    f"mesh          data={data} × fsdp={fsdp} × context={context} (batch split over data and "
    "fsdp, sequence over context)",
    f"batch         {batch}",
    f"model         {m.num_layers} layers, d={m.model_dim}, {m.num_heads} heads × {head_dim}, "
    f"{m.mlp} {mlp_dim}, vocab {m.vocab_size}, pe={config.pe.name}, {m.attention} attention, "
    f"{m.compute_dtype}, remat {m.get('remat', 'none')}"
    + (", scanned layers" if m.get("scan_layers", False) else ""),
    f"parameters    {num_params:,} = {_size(params)}; per device {_size(params_dev)} ({split})",
    f"optimizer     AdamW {_size(opt)}; per device {_size(opt_dev)}",
    f"gradients     per device {_size(params_dev)}",
    f"activations   per device ~{_size(acts)} (estimate, batch {per_device} × "
    f"{t.seq_len // context})",
    f"total         per device ~{_size(2 * params_dev + opt_dev + gathered + acts)}",
    f"steps         {t.steps:,} (warmup {t.warmup_steps:,}), {tokens:,} tokens, "
    f"~{flops_per_token(config, t.seq_len) * tokens:.2e} training FLOPs",
  ]
  if gathered:  # Before the activations line.
    what = "one layer at a time" if gathered < params else "all parameters"
    lines.insert(7, f"gathered      per device {_size(gathered)} ({what}, during the step)")
  return "\n".join(lines)


def _main() -> None:
  from absl import app, flags
  from ml_collections import config_flags

  from pe_research import aot, cli

  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:pe=t5")
  flags.DEFINE_string("topology", "", "TPU pod slice to compile for, e.g. v5e:16x16 (libtpu).")
  flags.DEFINE_integer("devices", 0, "Compile for this many fake CPU devices instead.")
  flags.DEFINE_enum("platform_policy", "gpu", ["gpu", "tpu", "cpu"], "With --devices: policy.")
  flags.DEFINE_enum("chip", "h100", list(aot.CHIPS), "With --devices: the chip compared against.")
  flags.DEFINE_float("chip_memory_gib", 0.0, "Usable memory per device (0 = the chip's).")
  flags.DEFINE_string("out", "", "Also write the figures as JSON to this file.")
  flags.mark_flags_as_required(["config"])

  def run(argv: list[str]) -> None:
    try:
      aot.main(argv, flags.FLAGS)
    except ValueError as e:
      cli.exit_with_error(e)

  app.run(run, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  _main()
