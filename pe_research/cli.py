"""Command-line plumbing shared by the absl entry points: errors are one line and exit code 2."""

from __future__ import annotations

import sys

from absl import flags


def exit_with_error(error: Exception) -> None:
  """Prints ``error: <one line>`` to stderr and exits with code 2."""
  print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one line and exit code 2 (absl's own exit 1)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError, TypeError) as e:
    exit_with_error(e)
