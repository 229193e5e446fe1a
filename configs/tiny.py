r"""A seconds-long run for tests and smoke checks: d=32, 2 layers, 2 heads, L=32, batch 8.

Variants: ``pe=<encoding>``. Run:

  python -m pe_research.main --config=configs/tiny.py:pe=alibi --workdir=/tmp/tiny

Runtime here (2 shared CPU cores): ~10 s wall for the 60 steps, mostly start-up and
compilation. Expected (synthetic copy task, loss on answer tokens): the loss falls from
ln(260)=5.56 to ln(26)=3.26 (answers are letters) by step ~40; copying itself takes longer
(--config.train.steps=1000: loss ~2.2 in ~15 s).
"""

import ml_collections

from configs import base
from pe_research.config_lib import parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = parse_config_arg(arg, pe="rope")
  config = base.get_config()
  config.pe.name = variant.pe
  config.model.num_layers = 2
  config.model.model_dim = 32
  config.model.num_heads = 2
  config.model.attention_block = 16
  config.pe.max_len = 128
  config.pe.max_random_len = 128
  config.pe.fire_l_thr_init = 32.0
  config.train.seq_len = 32
  config.train.batch_size = 8
  config.train.steps = 60
  config.train.lr = 3e-3
  config.train.warmup_steps = 5
  config.train.log_every = 10
  config.train.checkpoint_every = 30
  config.data.name = "synthetic"
  config.data.eval_tokens = 1024
  config.data.train_max_len = 10
  config.data.test_min_len = 11
  config.data.test_max_len = 40
  return config
