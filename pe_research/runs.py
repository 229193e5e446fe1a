"""A run's workdir as a model: its config and the newest intact checkpoint's parameters.

  model, config, step = load_model("runs/rope")
  model, config, step = load_model("runs/rope", rope_scaling='{"rope_type": "yarn", "factor": 4}')

Used by evaluation, export and the figure scripts. Runs written before a config field existed
load with that field's default (``config_lib.config_from_saved``).
"""

from __future__ import annotations

import json
import os

from flax import nnx

from pe_research import checkpoint, config_lib, workdirs
from pe_research.model import Transformer


def load_model(workdir: str, *, rope_scaling: str | None = None, overrides=None):
  """``(model, config, step)``: the newest intact checkpoint's parameters in the run's model.

  ``rope_scaling`` (JSON text, "" = none) replaces ``pe.rope_scaling`` and ``overrides``
  (``{"pe.<field>" or "data.<field>": value}``, e.g. ``{"pe.self_extend_window": 1024}``) other
  encoding or data options before the model is built; only ``nnx.Param`` values are restored,
  so the new positions take effect (zero-shot context extension). The restored parameters are
  projected as after a training step (``PositionalEncoding.project``), so a checkpoint written
  when KERPLE clamped inside its forward pass evaluates with the values that forward used.
  """
  path = os.path.join(workdir, workdirs.CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"--workdir={workdir!r} has no {workdirs.CONFIG_FILE}; allowed: a run's dir")
  with open(path) as f:
    config = config_lib.config_from_saved(json.load(f))
  if rope_scaling is not None:
    config.pe.rope_scaling = rope_scaling
    config_lib.check_rope_scaling(config.pe, field="--rope_scaling")
  if overrides:
    config_lib.override_for_eval(config, overrides, "--overrides")
  step = checkpoint.latest_intact_step(workdir)
  if step is None:
    raise ValueError(f"--workdir={workdir!r} has no checkpoint; allowed: a trained run's workdir")
  model = Transformer(config, rngs=nnx.Rngs(config.seed))
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, checkpoint.load_params(workdir, nnx.to_pure_dict(params), step))
  nnx.update(model, params)
  model.project()  # Identity for runs trained with it (KERPLE's bounds).
  return model, config, step
