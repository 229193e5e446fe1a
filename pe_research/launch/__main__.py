"""``python -m pe_research.launch --config=FILE --sweep=... --root=DIR``: see ``grid.py``."""

from pe_research import cli
from pe_research.launch import grid

if __name__ == "__main__":
  cli.exit_on_value_error(grid.main)
