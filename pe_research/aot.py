r"""The proof without the hardware: the real training step compiled ahead of time for a mesh of
devices that need not be present, and XLA's own count of the memory it needs per device.

  python -m pe_research.dry_run --config=configs/recipes/yarn_llama2_7b_64k.py \
      --topology=v5e:16x16 --out=runs/aot.json         # needs libtpu: make tpu-aot-deps and
                                                        # PYTHONPATH=.tpu-site
  python -m pe_research.dry_run --config=... --devices=8 --chip=h100   # fake CPU devices

``train.jit_train_step(...).lower(state, batch).compile()`` runs on abstract inputs only
(``train.abstract_train_state``: the state's shapes from ``jax.eval_shape`` of its
initialisation, each a ``jax.ShapeDtypeStruct`` carrying the ``NamedSharding`` the real run
gives it), so nothing is allocated. Per device, ``compiled.memory_analysis()`` gives

  argument   the inputs resident for the step (state shards, batch shard)
  output     the outputs (new state, metrics)
  alias      the outputs written in place of donated inputs (the state)
  temp       everything else live at the peak (gathered weights, activations, gradients)
  total      argument + temp + output - alias, compared with the chip's usable memory.

``--topology=NAME`` compiles with XLA:TPU for that pod slice through
``jax.experimental.topologies`` (libtpu must be importable; TPU compilers report a step that
does not fit as RESOURCE_EXHAUSTED, shown here as DOES NOT FIT with XLA's message).
``--devices=N`` compiles with XLA:CPU for N fake CPU devices, tracing the model with the
``--platform_policy`` backend policy (``backend.Policy.for_platform``): an APPROXIMATION of a
GPU's memory (XLA:GPU schedules and fuses differently, and XLA:CPU may widen bf16 temporaries).

The step's FLOPs are ``model_size.flops_per_token × batch_size × seq_len``; the expected step time
divides them by the devices' bf16 peak at ``MFU`` utilisation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import ml_collections

from pe_research import backend, config_lib, runtime, sharding, train
from pe_research.model_size import flops_per_token

GIB = 1024**3
MFU = 0.4  # Model FLOPs utilisation assumed for the expected step time.


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  memory_bytes: int  # Usable by XLA per device.
  peak_flops: float  # Dense bf16 FLOP/s per device.


# Usable HBM per device and dense bf16 peak (vendor data sheets; TPU usable memory as XLA:TPU
# reports it, e.g. 15.75 GiB of a v5e's 16 GiB).
CHIPS = {
  "v4": Chip("TPU v4", int(30.75 * GIB), 275e12),
  "v5e": Chip("TPU v5e", int(15.75 * GIB), 197e12),
  "v5p": Chip("TPU v5p", int(95.74 * GIB), 459e12),
  "v6e": Chip("TPU v6e", int(31.25 * GIB), 918e12),
  "a100": Chip("NVIDIA A100 80GB", 80 * GIB, 312e12),
  "h100": Chip("NVIDIA H100 80GB", 80 * GIB, 989e12),
  "h200": Chip("NVIDIA H200", 141 * GIB, 989e12),
}


def chip_of_topology(topology: str) -> str:
  """``"v5e"`` for ``"v5e:16x16"``; one-line ValueError for an unknown chip."""
  chip = topology.partition(":")[0].lower().replace("litepod", "e")
  tpus = [name for name in CHIPS if name.startswith("v")]
  if chip not in tpus:
    raise ValueError(f"--topology={topology!r} is invalid; allowed: {', '.join(tpus)}:AxB[xC]")
  return chip


def topology_devices(topology: str) -> list:
  """The devices of a TPU pod slice (no hardware needed; libtpu must be importable)."""
  from jax.experimental import topologies

  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # libtpu missing, or a name libtpu does not know.
    reason = " ".join(str(e).split())[:300]
    raise ValueError(
      f"--topology={topology!r} could not be built ({reason}); allowed: a TPU topology such as "
      "v5e:16x16, in a process whose PYTHONPATH holds libtpu (make tpu-aot-deps; "
      "PYTHONPATH=.tpu-site)"
    ) from None


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """One step's batch as shape structs with the sharding of a real run (rows over data × fsdp,
  the sequence over context)."""
  shape, layout = (config.train.batch_size, config.train.seq_len), sharding.batch_sharding(mesh)
  dtypes = {"inputs": "int32", "targets": "int32", "weights": "float32"}
  return {k: jax.ShapeDtypeStruct(shape, dt, sharding=layout) for k, dt in dtypes.items()}


def _one_line(error: Exception) -> str:
  """XLA's message without its stack: the RESOURCE_EXHAUSTED line where there is one."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  exhausted = [line for line in lines if "RESOURCE_EXHAUSTED" in line]
  return (exhausted or lines or [type(error).__name__])[0][:500]


def compile_step(config: ml_collections.ConfigDict, mesh) -> dict:
  """Compiles the training step for ``mesh``; per-device bytes, or the error of a step that
  exceeds the compiler's memory (RESOURCE_EXHAUSTED)."""
  tx, schedule = train.make_optimizer(config.train)
  graphdef, state = train.abstract_train_state(config, mesh, tx)
  batch = abstract_batch(config, mesh)
  accum = config.train.grad_accum_steps
  step = train.jit_train_step(graphdef, tx, schedule, state, mesh, grad_accum_steps=accum)
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  lowered_at = time.perf_counter()
  timing = {"lower_seconds": lowered_at - start}
  try:
    compiled = lowered.compile()
  except Exception as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"error": _one_line(e), **timing, "compile_seconds": time.perf_counter() - lowered_at}
  memory = compiled.memory_analysis()
  result = {
    "argument_bytes": memory.argument_size_in_bytes,
    "output_bytes": memory.output_size_in_bytes,
    "temp_bytes": memory.temp_size_in_bytes,
    "alias_bytes": memory.alias_size_in_bytes,
    "generated_code_bytes": memory.generated_code_size_in_bytes,
    **timing,
    "compile_seconds": time.perf_counter() - lowered_at,
  }
  result["total_bytes"] = (
    result["argument_bytes"] + result["temp_bytes"] + result["output_bytes"] - result["alias_bytes"]
  )
  return result


def fits(per_device: dict, memory_bytes: int) -> bool:
  """Whether a compiled step's per-device total fits ``memory_bytes`` (a failed compile: no)."""
  return "error" not in per_device and per_device["total_bytes"] <= memory_bytes


def report(config, mesh, chip: Chip, *, target: str, approximation: str | None) -> dict:
  """The dry run's figures (the JSON of ``--out``)."""
  devices = mesh.devices.size
  t = config.train
  tokens = t.batch_size * t.seq_len
  step_flops = flops_per_token(config, t.seq_len) * tokens
  compiled = compile_step(config, mesh)
  fit = fits(compiled, chip.memory_bytes)
  return {
    "target": target,
    "approximation": approximation,
    "devices": devices,
    "mesh": dict(mesh.shape),
    "chip": chip.name,
    "chip_memory_bytes": chip.memory_bytes,
    "per_device": compiled,
    "fits": fit,
    "verdict": "FIT" if fit else "DOES NOT FIT",
    "tokens_per_step": tokens,
    "flops_per_token": flops_per_token(config, t.seq_len),
    "step_flops": step_flops,
    "peak_flops_per_device": chip.peak_flops,
    "mfu": MFU,
    "step_seconds_at_mfu": step_flops / (devices * chip.peak_flops * MFU),
    "model": {k: config.model[k] for k in config.model},
    "train": {k: t[k] for k in ("seq_len", "batch_size", "grad_accum_steps", "steps")},
    "mesh_config": {k: config.mesh[k] for k in config.mesh},
    "backend_policy": backend.policy().to_dict(),
  }


def _gib(n: int) -> str:
  return f"{n / GIB:8.2f} GiB" if n >= GIB / 100 else f"{n / 1024:8.1f} KiB"


def report_text(r: dict) -> str:
  """The printed form of :func:`report`."""
  mesh = " × ".join(f"{axis}={size}" for axis, size in r["mesh"].items())
  lines = [f"target        {r['target']}: {r['devices']} devices, mesh {mesh}"]
  if r["approximation"]:
    lines.append(f"APPROXIMATION {r['approximation']}")
  d = r["per_device"]
  if "error" in d:
    lines.append(f"per device    compile failed: {d['error']}")
  else:
    lines += [
      f"per device    argument {_gib(d['argument_bytes'])}",
      f"              output   {_gib(d['output_bytes'])}",
      f"              temp     {_gib(d['temp_bytes'])}",
      f"              alias    {_gib(d['alias_bytes'])}",
      f"              total    {_gib(d['total_bytes'])}  (argument + temp + output - alias)",
    ]
  lines += [
    f"chip          {r['chip']}: {_gib(r['chip_memory_bytes']).strip()} usable -> {r['verdict']}",
    f"step          {r['tokens_per_step']:,} tokens, {r['step_flops']:.3e} FLOPs "
    f"({r['flops_per_token']:.3e} per token); at {r['mfu']:.0%} MFU of "
    f"{r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device: {r['step_seconds_at_mfu']:.2f} s",
    f"compile       {d['lower_seconds']:.1f} s tracing and lowering, "
    f"{d['compile_seconds']:.1f} s compiling",
  ]
  return "\n".join(lines)


def main(argv: list[str], flag_values) -> None:
  """``python -m pe_research.dry_run`` with ``--topology`` or ``--devices`` (``dry_run.py``)."""
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  topology, count = flag_values.topology, flag_values.devices
  if bool(topology) == bool(count):
    raise ValueError("--topology and --devices are invalid; allowed: exactly one of them")
  jax.config.update("jax_platforms", "cpu")  # Compiling for a TPU needs no TPU backend here.
  if topology:
    chip_name, approximation = chip_of_topology(topology), None
    devices, platform = topology_devices(topology), "tpu"
  else:
    if count < 1:
      raise ValueError(f"--devices={count} is invalid; allowed: a count >= 1")
    # Read by XLA when the CPU backend starts, which nothing before this line has done.
    xla_flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={count}"
    runtime.use_low_memory_schedule()
    chip_name, platform = flag_values.chip, flag_values.platform_policy
    devices = jax.devices()
    approximation = (
      f"XLA:CPU on {count} fake devices with the {platform} backend policy, not XLA:{platform}"
    )
  if count and len(devices) != count:
    raise ValueError(f"--devices={count}: XLA started {len(devices)} CPU devices (set too late)")
  chip = CHIPS[chip_name]
  if flag_values.chip_memory_gib:
    chip = dataclasses.replace(chip, memory_bytes=int(flag_values.chip_memory_gib * GIB))
  config = flag_values.config
  config.train.steps_per_call = 1
  config_lib.validate(config, device_count=len(devices))
  backend.set_policy(backend.Policy.for_platform(platform, 1, len(devices)))
  mesh = sharding.make_mesh(config.mesh, devices)
  target = topology or f"{len(devices)} × {chip.name}"
  result = report(config, mesh, chip, target=target, approximation=approximation)
  print(report_text(result))
  if flag_values.out:
    os.makedirs(os.path.dirname(os.path.abspath(flag_values.out)), exist_ok=True)
    with open(flag_values.out, "w") as f:
      json.dump(result, f, indent=2)
  sys.stdout.flush()
