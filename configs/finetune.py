r"""Fine-tune an earlier run (an imported pretrained model or one trained here) from its own config.

Variants: ``init_from=<workdir>`` (required: its config.json gives the model, encoding and data;
its newest checkpoint the starting parameters), ``seq_len`` (0 = the run's), ``steps``, ``lr``,
``batch_size``. Everything else is the run's, and ``--config.a.b=v`` overrides as usual, e.g.
YaRN fine-tuning of SmolLM2 at 16k from its 8k (the YaRN recipe: s = 2, lr 2e-5, 400 steps):

  python -m pe_research.main --workdir=runs/smollm2_yarn16k \
      --config=configs/finetune.py:init_from=runs/pretrained/smollm2-135m,seq_len=16384 \
      --config.pe.rope_scaling='{"rope_type":"yarn","factor":2,"original_max_position_embeddings":8192}'

Runtime here: a SmolLM2-135M step on 2,048 tokens is about 2 TFLOP (~30 s on 2 cores).
"""

import json
import os

import ml_collections

from pe_research.config_lib import config_from_saved, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = parse_config_arg(arg, init_from="", seq_len=0, steps=200, lr=2e-5, batch_size=1)
  if not variant.init_from:
    raise ValueError("configs/finetune.py needs init_from=<workdir of an earlier run>")
  path = os.path.join(variant.init_from, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"configs/finetune.py init_from={variant.init_from!r} has no config.json")
  with open(path) as f:
    config = config_from_saved(json.load(f))
  config.init_from = variant.init_from
  config.train.seq_len = variant.seq_len or config.train.seq_len
  config.train.steps = variant.steps
  config.train.lr = variant.lr
  config.train.warmup_steps = min(20, variant.steps - 1)
  config.train.min_lr_ratio = 1.0  # Constant after warmup, as in PI/YaRN fine-tuning.
  config.train.batch_size = variant.batch_size
  config.train.weight_decay = 0.0
  config.train.log_every = 10
  config.train.checkpoint_every = variant.steps
  config.train.steps_per_call = 1
  return config
