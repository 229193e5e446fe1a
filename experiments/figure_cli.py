"""How a figure script is run: its flags, its training runs, its output folder.

  --preset  smoke | cpu | paper: the scale (seconds / minutes here / the paper's, on a GPU/TPU)
  --out     output folder; default ``runs/<name>/<preset>``
  --runs    folder of the training workdirs (scripts that train)
  --set FIELD=VALUE, --print_commands   as ``python -m pe_research.launch``

Training goes through ``pe_research.launch``; what the script writes, through
``figure_report.py``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from pe_research.launch import grid
from pe_research.metrics import quiet_library_logging

PRESETS = ("smoke", "cpu", "paper")


def add_common_flags(
  parser: argparse.ArgumentParser, name: str, presets: tuple[str, ...] = PRESETS
) -> None:
  """``--preset`` (one of ``presets``) and ``--out`` (default ``runs/<name>/<preset>``)."""
  parser.add_argument("--preset", choices=presets, default="cpu", help="Scale of the experiment.")
  parser.add_argument("--out", default="", help=f"Output folder; default runs/{name}/<preset>.")


def out_dir(args: argparse.Namespace, name: str) -> str:
  out = args.out or os.path.join("runs", name, args.preset)
  os.makedirs(out, exist_ok=True)
  return out


def parse_experiment_args(
  doc: str, name: str, argv: list[str] | None, default_runs: Callable[[str], str]
) -> argparse.Namespace:
  """The flags of an experiment script: ``--preset``, ``--out``, ``--runs`` (default
  ``default_runs(preset)``), ``--set`` and ``--print_commands``."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  add_common_flags(parser, name)
  parser.add_argument("--runs", default="", help="Folder of the training workdirs.")
  grid.add_launch_flags(parser)
  args = parser.parse_args(argv)
  args.runs = args.runs or default_runs(args.preset)
  return args


def run_or_print(runs: list[grid.Run], args: argparse.Namespace, name: str) -> str | None:
  """Trains the unfinished runs (or prints their commands with ``--print_commands``); returns
  the experiment's output folder, or None when the commands were only printed."""
  quiet_library_logging()
  grid.launch(runs, print_commands=args.print_commands)
  return None if args.print_commands else out_dir(args, name)
