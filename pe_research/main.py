r"""Trains one config in one workdir; re-running the same command resumes it.

  python -m pe_research.main --config=configs/lm.py:pe=alibi,train_len=128 \
      --workdir=runs/alibi --config.train.steps=2000

Writes ``DIR/config.json``, ``DIR/metrics.jsonl``, TensorBoard events under
``DIR/tensorboard`` and checkpoints under ``DIR/checkpoints``. An invalid config or flag, a
workdir holding a run with another config, an unwritable workdir or too little disk space for
the checkpoints exits with code 2 and one line naming the problem and what is allowed, before
training starts; a diverged run exits 1. ``--overwrite`` first renames an existing ``DIR`` to
``DIR.old-<time>`` (nothing is deleted) and starts afresh. A killed run resumes from its newest
intact checkpoint (damaged ones are moved to ``DIR/checkpoints_damaged``); SIGTERM or SIGINT
saves a checkpoint at the current step and exits 0. ``--dry_run`` prints the mesh, the batch
per device, memory estimates and the steps without training (``--dry_run_devices=256`` plans
for a pod; see ``pe_research.dry_run``). Multi-process (``JAX_COORDINATOR_ADDRESS`` set, with
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` where the platform does not provide them) calls
``jax.distributed.initialize()`` first; see docs/scaling.md.
"""

from __future__ import annotations

import os
import sys

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from pe_research import config_lib
from pe_research.metrics import quiet_library_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:pe=t5")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Rename an existing --workdir to DIR.old-<time>, then start afresh."
)
_DRY_RUN = flags.DEFINE_bool(
  "dry_run", False, "Print the mesh, batch split, memory per device and steps; do not train."
)
_DRY_RUN_DEVICES = flags.DEFINE_integer(
  "dry_run_devices", 0, "With --dry_run: plan for this many devices (0 = the devices present)."
)
flags.mark_flags_as_required(["config", "workdir"])


def _one_line(error: Exception) -> str:
  text = str(error).strip()
  if "Traceback (most recent call last)" in text:  # ml_collections embeds a config's traceback.
    text = text.split("Traceback")[0] + text.splitlines()[-1]
  return " ".join(text.split())


def _exit_with_error(message: str, code: int) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _override_error(argv: list[str], message: str) -> str:
  """Names a bad ``--config.a.b=v`` override with its allowed fields or type."""
  files = [arg.partition("=")[2] for arg in argv if arg.startswith("--config=")]
  if not files or message.startswith("flag --config="):  # The config file itself failed.
    return message
  try:
    config = flags.FLAGS["config"].parser.parse(files[-1])
  except Exception:  # The config file fails to load: its own error is the clearer message.
    config = None
  if not isinstance(config, ml_collections.ConfigDict):
    return message
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path, node = arg[len("--") :].partition("=")[0], config
    keys = path.split(".")[1:]
    for depth, key in enumerate(keys):
      if not isinstance(node, ml_collections.ConfigDict):
        parent = ".".join(["config", *keys[:depth]])
        return f"flag --{path}: {parent} is a value, not a section; allowed: --{parent}=VALUE"
      if key not in node:
        return f"flag --{path}: unknown config field {key!r}; allowed: {', '.join(node)}"
      node = node[key]
    if message.startswith(f"flag --{path}="):
      return f"{message}; allowed: a value of type {type(node).__name__}"
  return message


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one line and exit code 2 (absl's own exit 1)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # Parsing runs the config file: any failure is a bad flag.
    message = _override_error(argv, _one_line(e))
    if "allowed" not in message:
      message += "; allowed: --config=FILE[:VARIANT], --config.<field>=VALUE, --workdir=DIR"
    _exit_with_error(message, 2)


def _initialize_distributed() -> None:
  num_processes = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # Only used on CPU.
    jax.distributed.initialize(
      num_processes=num_processes if num_processes > 1 else None,
      process_id=int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
    )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _exit_with_error(f"unexpected arguments {argv[1:]}; allowed: flags only", 2)
  quiet_library_logging()
  _initialize_distributed()
  # Imported after flag parsing, so that a bad flag is reported in about a second.
  from pe_research import dry_run, integrity, train, workdirs

  config, workdir = _CONFIG.value, _WORKDIR.value
  if _DRY_RUN_DEVICES.value < 0 or (_DRY_RUN_DEVICES.value and not _DRY_RUN.value):
    _exit_with_error("--dry_run_devices is invalid; allowed: 0, or a count > 0 with --dry_run", 2)
  device_count = _DRY_RUN_DEVICES.value or jax.device_count()
  try:
    config_lib.validate(config, device_count=device_count)
    if _DRY_RUN.value:  # Nothing is written to the workdir.
      if jax.process_index() == 0:
        processes = None if _DRY_RUN_DEVICES.value else jax.process_count()
        print(dry_run.plan_text(config, device_count=device_count, process_count=processes))
      return
    moved = workdirs.prepare_workdir(workdir, config, overwrite=_OVERWRITE.value)
  except (ValueError, OSError) as e:  # OSError: unreadable --config file or workdir.
    _exit_with_error(_one_line(e), 2)
  if moved:
    print(f"--overwrite: moved the old run to {moved}", file=sys.stderr)
  try:
    train.train(config, workdir)
  except train.DivergenceError as e:
    _exit_with_error(_one_line(e), 1)
  except integrity.WorkdirError as e:  # No intact checkpoint, or too little disk space.
    _exit_with_error(_one_line(e), 2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
