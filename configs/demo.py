r"""The `make demo` model: a small byte-level LM on Python stdlib source, trained at L=128.

d=128, 4 layers, 4 heads (~0.8M parameters), batch 16×128 bytes. Variants: ``pe=<encoding>``.

  python -m pe_research.main --config=configs/demo.py:pe=alibi --workdir=runs/demo/alibi

Runtime here (2 CPU cores, unloaded): 55–66 s per encoding for 500 steps (7.6–9.1 steps/s,
16–19k tokens/s, five steps per compiled call; 80–90 s with one). Measured (500 steps):
training loss 1.55 (RoPE) to 2.08 (NoPE) nats/byte; validation ppl at L=128 from 12.7 (RoPE)
to 19.2 (NoPE); at 32× L, ALiBi and KERPLE stay flat (14.0 → 13.6, 13.8 → 14.0), RoPE degrades
12.7 → 33.0, sinusoidal grows steadily 17.3 → 34.8.
``experiments.demo`` drives all seven encodings.
"""

import ml_collections

from configs import base
from pe_research.config_lib import parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = parse_config_arg(arg, pe="rope", steps=500)
  config = base.get_config()
  config.pe.name = variant.pe
  config.model.num_layers = 4
  config.model.model_dim = 128
  config.model.num_heads = 4
  config.model.attention_block = 128
  # Unit-variance token embeddings (fairseq/Vaswani): an added PE does not drown them
  # (sinusoidal at 200 steps here: loss 2.09 vs 3.20 with 0.02-std unscaled embeddings).
  config.model.scale_embeddings = True
  config.model.init_std = config.model.model_dim**-0.5
  config.pe.fire_l_thr_init = 128.0  # FIRE's threshold starts at the training length.
  config.train.seq_len = 128
  config.train.batch_size = 16
  config.train.steps = variant.steps
  config.train.lr = 2e-3
  config.train.warmup_steps = min(50, variant.steps // 10)
  config.train.log_every = 25
  config.train.checkpoint_every = 300
  config.train.steps_per_call = 5  # Divides log_every and checkpoint_every.
  config.train.keep_checkpoints = 1
  config.data.name = "pystdlib"
  config.data.eval_tokens = 16384
  return config
