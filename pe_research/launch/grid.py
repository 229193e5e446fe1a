r"""Expands a sweep into training runs; runs them here in sequence or prints one command each.

  python -m pe_research.launch --config=configs/lm.py --sweep='pe=rope,alibi;train_len=128,256' \
      --seeds=0,1 --root=runs/sweep                      # trains the 8 runs here, one by one
  python -m pe_research.launch ... --print_commands      # one `pe_research.main` line per run

A sweep is ``key=v1,v2;key2=w1,...`` over the config file's variant keys (``file.py:k=v``);
its cartesian product (× ``--seeds``, set as ``--config.seed``) gives the runs, each in
``ROOT/<k=v>_..._seed=<s>``. ``--set=field=value`` overrides any config field in every run.
Finished runs (latest checkpoint at ``train.steps``) are skipped, so a rerun resumes the sweep
and a cluster can run the printed commands in any order or in parallel.

Experiment scripts build their runs with :class:`Run` and call :func:`launch` too
(``experiments/figure_cli.py``), so each of them accepts ``--print_commands`` (train on a
cluster, then rerun the script to evaluate).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import shlex
from typing import Any

import ml_collections

from pe_research.launch import sweep


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: ``config_file:variant`` plus field ``overrides``, trained in ``workdir``."""

  config_file: str  # e.g. "configs/demo.py"
  variant: str  # e.g. "pe=alibi,steps=600"
  workdir: str
  overrides: tuple[tuple[str, Any], ...] = ()  # (("train.steps", 100), ("init_from", "runs/x"))

  def config(self) -> ml_collections.ConfigDict:
    config = load_config(self.config_file, self.variant)
    for field, value in self.overrides:
      section, _, name = field.rpartition(".")
      (config[section] if section else config)[name] = value
    return config

  def command(self) -> str:
    """The ``pe_research.main`` command line that trains this run."""
    parts = [
      "python -m pe_research.main",
      f"--config={self.config_file}" + (f":{self.variant}" if self.variant else ""),
      *(f"--config.{field}={_flag_value(value)}" for field, value in self.overrides),
      f"--workdir={self.workdir}",
    ]
    return " ".join(shlex.quote(p) if i else p for i, p in enumerate(parts))


def _flag_value(value: Any) -> str:
  return json.dumps(value) if isinstance(value, list | dict) else str(value)


def load_config(config_file: str, variant: str = "") -> ml_collections.ConfigDict:
  """``get_config(variant)`` of a config file given by path (as ``--config=`` takes it)."""
  spec = importlib.util.spec_from_file_location("_experiment_config", config_file)
  if spec is None or not config_file.endswith(".py"):
    raise ValueError(f"--config={config_file!r} is not a Python config file; allowed: configs/*.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)


def parse_overrides(items: list[str]) -> tuple[tuple[str, Any], ...]:
  """``["data.name=pg19", "train.steps=10"]`` -> typed pairs (JSON values, else strings)."""
  pairs = []
  for item in items:
    field, sep, text = item.partition("=")
    if not sep or not field:
      raise ValueError(f"--set={item!r} is invalid; allowed: FIELD=VALUE, e.g. data.name=pg19")
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      value = text
    pairs.append((field, value))
  return tuple(pairs)


def expand(sweep_text: str) -> list[str]:
  """``"pe=a,b;n=1,2"`` -> ``["pe=a,n=1", "pe=a,n=2", "pe=b,n=1", "pe=b,n=2"]``."""
  axes = []
  for axis in filter(None, sweep_text.split(";")):
    key, sep, values = axis.partition("=")
    if not sep or not key or not values:
      raise ValueError(f"--sweep axis {axis!r} is invalid; allowed: key=v1,v2;key2=w1,w2")
    axes.append([f"{key}={v}" for v in values.split(",")])
  return [",".join(combo) for combo in itertools.product(*axes)]


def launch(runs: list[Run], *, print_commands: bool) -> list[Run]:
  """Prints each unfinished run's command, or trains the unfinished runs here in order.

  Returns the runs that were unfinished. Printed commands keep the order of ``runs``, so a
  run that starts from another (``init_from``) comes after it.
  """
  todo = [run for run in runs if not sweep.is_finished(run.config(), run.workdir)]
  for i, run in enumerate(todo):
    if print_commands:
      print(run.command())
      continue
    print(f"== [{i + 1}/{len(todo)}] train {run.workdir}", flush=True)
    sweep.train_run(run.config(), run.workdir)
  return todo


def add_launch_flags(parser: argparse.ArgumentParser) -> None:
  """``--set`` and ``--print_commands``, shared by every experiment script."""
  parser.add_argument(
    "--set", action="append", default=[], metavar="FIELD=VALUE", help="Config override (repeat)."
  )
  parser.add_argument(
    "--print_commands",
    action="store_true",
    help="Print one training command per unfinished run and stop (train them on a cluster).",
  )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    "python -m pe_research.launch", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--config", required=True, help="Config file, e.g. configs/lm.py.")
  parser.add_argument("--sweep", default="", help="key=v1,v2;key2=w1,w2 over variant keys.")
  parser.add_argument("--seeds", default="0", help="Comma-separated seeds (config.seed).")
  parser.add_argument("--root", required=True, help="Folder holding one workdir per run.")
  add_launch_flags(parser)
  args = parser.parse_args(argv)
  if not all(s.strip().isdigit() for s in args.seeds.split(",")):
    raise ValueError(f"--seeds={args.seeds!r} is invalid; allowed: integers >= 0, e.g. 0,1,2")
  seeds = [int(s) for s in args.seeds.split(",")]
  overrides = parse_overrides(args.set)
  runs = [
    Run(
      args.config,
      variant,
      f"{args.root}/{variant.replace(',', '_') or 'base'}_seed={seed}",
      (*overrides, ("seed", seed)),
    )
    for variant in expand(args.sweep) or [""]
    for seed in seeds
  ]
  todo = launch(runs, print_commands=args.print_commands)
  if not args.print_commands:
    print(f"{len(runs)} runs finished under {args.root} ({len(todo)} trained now)")
