r"""ALiBi paper scale (Press et al. 2022, §4): 16 layers, d=1024, 8 heads, FFN 4096, L=512.

The paper trains on WikiText-103, which is not in TFDS; this config uses PG-19 books
(``data=pg19``, the PI/YaRN evaluation corpus) or English Wiki-40B (``data=wiki40b``), read as
bytes, so perplexities are per byte and not comparable in value with the paper's word-level
ones, only in shape. Prepare the corpus on a networked machine first (see pe_research.data).
Variants: ``pe=``, ``train_len=`` (512 or 1024 in the paper), ``data=``, ``steps=``.

  python -m pe_research.main --config=configs/alibi_paper.py:pe=alibi,train_len=512 \
      --workdir=runs/alibi_paper/alibi

~200M parameters (the paper's 247M include its word-level adaptive input embeddings);
65,536 bytes per step (128 × 512), 100k steps (6.6B bytes), bfloat16 compute. Runtime
(estimated from 6·N·tokens ≈ 8e18 FLOPs, not measured): a few hours on 8 H100s; it does not
fit the 2-CPU development machine.
Expected: the ALiBi paper's Fig. 1 shape — at 2L sinusoidal is far worse than at L, RoPE
degrades steadily, T5 improves slightly then degrades, ALiBi stays flat to 30× L
(``python -m experiments.alibi_train_short_test_long --preset=paper``).
"""

import ml_collections

from configs import base
from pe_research.config_lib import parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = parse_config_arg(arg, pe="alibi", train_len=512, data="pg19", steps=100_000)
  config = base.get_config()
  config.pe.name = variant.pe
  config.pe.fire_l_thr_init = float(variant.train_len)
  config.pe.max_len = 32 * variant.train_len  # Learned table covers the evaluation lengths.
  config.model.num_layers = 16
  config.model.model_dim = 1024
  config.model.num_heads = 8
  config.model.mlp_dim = 4096
  config.model.compute_dtype = "bfloat16"
  config.model.attention_block = 512  # Evaluation switches to blockwise past the dense budget.
  config.train.seq_len = variant.train_len
  config.train.batch_size = 65_536 // variant.train_len
  config.train.steps = variant.steps
  config.train.lr = 6e-4
  config.train.warmup_steps = 2_000
  config.train.log_every = 100
  config.train.checkpoint_every = 5_000
  config.train.keep_checkpoints = 2
  config.data.name = variant.data
  config.data.eval_tokens = 262_144
  return config
