r"""Length generalisation on an algorithmic task: train on short instances, test on longer ones.

Variants: ``task=`` (copy reverse sort addition parity associative_recall passkey), ``pe=``
(any encoding), ``randomized=`` (Ruoss et al. 2023 positions around ``pe``), ``seed=`` and
``size=`` (smoke, cpu, paper). Run:

  python -m pe_research.main --config=configs/synthetic.py:task=copy,pe=nope,size=cpu \
      --workdir=runs/synthetic/copy_nope

Sizes (decoder-only, loss on the answer tokens; ``train.seq_len`` fits the longest training
instance):

  smoke  d=32, 1 layer, train lengths 1..4, tested to 12, 40 steps     (seconds)
  cpu    d=64, 2 layers, 4 heads, lengths 1..8, tested to 24, 2000 steps (~25 s here,
         unloaded, compilation included)
  paper  d=768, 12 layers, 12 heads, lengths 1..20, tested to 40, 40k steps
         (Kazemnejad et al. 2023's scale; Ruoss et al. 2023 use 5 layers of width 64,
         lengths 1..40 and random positions from [0, 2048))

Measured (cpu, pe=rope, seed 0, unloaded): after 2000 steps the training loss (answer tokens)
is 1e-4 on copy, 2e-4 on reverse, 0.04 on sort, but 1.58 on addition, which this size does not
learn; at 600 steps sort and copy were not learned either.
"""

import ml_collections

from configs import base
from pe_research.config_lib import parse_config_arg
from pe_research.data.synthetic import sequence_length

# size -> (model_dim, num_layers, num_heads, train_max_len, test_max_len, steps, batch, lr)
SIZES = {
  "smoke": (32, 1, 2, 4, 12, 40, 16, 3e-3),
  "cpu": (64, 2, 4, 8, 24, 2000, 32, 2e-3),
  "paper": (768, 12, 12, 20, 40, 40_000, 64, 1e-4),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = parse_config_arg(arg, task="copy", pe="nope", randomized=False, seed=0, size="cpu")
  if variant.size not in SIZES:
    raise ValueError(
      f"config variant size={variant.size!r} is invalid; allowed: {', '.join(SIZES)}"
    )
  dim, layers, heads, train_max, test_max, steps, batch, lr = SIZES[variant.size]
  config = base.get_config()
  config.seed = variant.seed
  config.pe.name = variant.pe
  config.pe.randomized = variant.randomized
  longest = sequence_length(variant.task, test_max)  # Positions of the longest test instance.
  config.pe.max_random_len = max(2048, longest) if variant.size == "paper" else 4 * longest
  config.pe.max_len = (
    config.pe.max_random_len
  )  # Learned rows past the training length stay untrained.
  config.pe.fire_l_thr_init = float(sequence_length(variant.task, train_max))
  config.model.model_dim = dim
  config.model.num_layers = layers
  config.model.num_heads = heads
  config.model.attention_block = 64
  config.data.name = "synthetic"
  config.data.task = variant.task
  config.data.train_min_len = 1
  config.data.train_max_len = train_max
  config.data.test_min_len = train_max + 1
  config.data.test_max_len = test_max
  config.data.eval_tokens = 200 * longest  # About 200 test instances per length.
  config.train.seq_len = sequence_length(variant.task, train_max)
  config.train.batch_size = batch
  config.train.steps = steps
  config.train.lr = lr
  config.train.warmup_steps = steps // 10
  config.train.log_every = max(10, steps // 20)
  config.train.checkpoint_every = steps
  config.train.keep_checkpoints = 1
  return config
