"""The language models that the LM experiments train, per preset, shared between experiments.

  smoke  configs/tiny.py on pystdlib bytes: d=32, 2 layers, L=32, 30 steps (seconds)
  cpu    configs/demo.py (the `make demo` model): d=128, 4 layers, L=128, 500 steps; its
         workdirs default to runs/demo/<pe>, so runs trained by `make demo` are reused
  paper  configs/alibi_paper.py: 16 layers, d=1024, 8 heads, L=512 on pg19 (ALiBi paper scale)

A run of encoding ``pe`` lives in ``<runs>/<pe>``; experiments that need the same model (the
ALiBi figure and the RoPE-extension base run) therefore share one training run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pe_research.launch.grid import Run


@dataclasses.dataclass(frozen=True)
class LMPreset:
  config_file: str
  variant: str  # Formatted with pe=<encoding>.
  runs: str  # Default folder of the workdirs.
  overrides: tuple[tuple[str, Any], ...] = ()


_SMOKE = (("data.name", "pystdlib"), ("train.steps", 30), ("train.checkpoint_every", 30))
PRESETS = {
  "smoke": LMPreset("configs/tiny.py", "pe={pe}", "runs/experiments_smoke", _SMOKE),
  "cpu": LMPreset("configs/demo.py", "pe={pe},steps=500", "runs/demo"),
  "paper": LMPreset("configs/alibi_paper.py", "pe={pe},train_len=512", "runs/alibi_paper"),
}


def lm_run(preset: str, pe: str, runs: str, extra: tuple[tuple[str, Any], ...] = ()) -> Run:
  """The base run of encoding ``pe``; ``extra`` overrides (e.g. ``--set``) apply to it."""
  p = PRESETS[preset]
  return Run(p.config_file, p.variant.format(pe=pe), f"{runs}/{pe}", (*p.overrides, *extra))
