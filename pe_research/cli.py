"""Command-line plumbing shared by the entry points: errors are one line and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags


def exit_with_error(error: Exception) -> None:
  """Prints ``error: <one line>`` to stderr and exits with code 2."""
  print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
  sys.exit(2)


def exit_on_value_error(main: Callable[[], object]) -> None:
  """Runs ``main()``; bad input (ValueError) exits with code 2 and one line (the argparse entry
  points: ``python -m pe_research.launch`` and the experiment scripts)."""
  try:
    main()
  except ValueError as e:
    exit_with_error(e)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one line and exit code 2 (absl's own exit 1)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError, TypeError) as e:
    exit_with_error(e)
