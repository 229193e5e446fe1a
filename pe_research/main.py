r"""Trains one config in one workdir; re-running the same command resumes it.

  python -m pe_research.main --config=configs/lm.py:pe=alibi,train_len=128 \
      --workdir=runs/alibi --config.train.steps=2000

Writes ``DIR/config.json``, ``DIR/metrics.jsonl``, TensorBoard events under
``DIR/tensorboard`` and checkpoints under ``DIR/checkpoints``. An invalid config or flag exits
with code 2 and one line naming the field and what is allowed; a diverged run exits 1.
Multi-process (``JAX_COORDINATOR_ADDRESS`` set, with ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` where the platform does not provide them) calls
``jax.distributed.initialize()`` first.
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
  from pe_research import checkpoint, train

  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    config_lib.validate(config, device_count=jax.device_count())
    checkpoint.record_config(workdir, config, write=jax.process_index() == 0)
  except (ValueError, OSError) as e:  # OSError: unreadable --config file or workdir.
    _exit_with_error(_one_line(e), 2)
  try:
    train.train(config, workdir)
  except train.DivergenceError as e:
    _exit_with_error(_one_line(e), 1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
