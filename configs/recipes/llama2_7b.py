"""Llama-2 7B and the meshes its long-context fine-tuning recipes run on (shared by the recipes
in this folder; not a config file itself).

Llama-2 7B (Touvron et al. 2023): 32 layers, d = 4096, 32 heads of 128 (no GQA), SwiGLU 11,008,
vocabulary 32,000, RMSNorm eps 1e-5, untied embeddings, RoPE base 10,000, trained at 4,096
tokens: 6.74e9 parameters (/work/shared/reference/results_to_reproduce.md).
"""

import os

import ml_collections

from configs import base

TRAIN_LEN = 4096  # Llama-2's pre-training length (rope_scaling's original_max_position_embeddings).

# Where a recipe runs: the number of devices its mesh needs.
TARGETS = {"v5e-256": 256, "h100x8": 8}


def llama2_7b_config(target: str, init_from: str) -> ml_collections.ConfigDict:
  """Llama-2 7B over ``configs/base.py``, fine-tuned from ``init_from`` (an imported HF
  checkpoint's workdir: its parameters and tokenizer.json; "" = random init, for dry runs),
  with ``target``'s mesh."""
  if target not in TARGETS:
    raise ValueError(f"recipe variant target={target!r} is invalid; allowed: {', '.join(TARGETS)}")
  config = base.get_config()
  m = config.model
  m.vocab_size, m.num_layers, m.model_dim, m.num_heads = 32000, 32, 4096, 32
  m.mlp_dim, m.mlp, m.norm, m.norm_eps = 11008, "swiglu", "rmsnorm", 1e-5
  m.tie_embeddings = False
  m.attention, m.attention_block = "blockwise", 512
  m.compute_dtype = "bfloat16"
  config.pe.name, config.pe.rope_base, config.pe.rope_layout = "rope", 10000.0, "half"
  config.init_from = init_from
  if init_from:
    config.data.tokenizer = os.path.join(init_from, "tokenizer.json")
  config.data.name = "pg19"
  # Fine-tuning as in PI and YaRN: AdamW (0.9, 0.95), no weight decay, linear warmup, then constant.
  t = config.train
  t.b1, t.b2, t.weight_decay, t.min_lr_ratio, t.grad_clip = 0.9, 0.95, 0.0, 1.0, 1.0
  t.log_every, t.steps_per_call = 10, 1
  # The memory levers (docs/scaling.md has each one's measured effect at 64k): layers scanned
  # with each layer's weights gathered (in bf16) inside the scan body, every block
  # rematerialised, and on the v5e-256 the sequence split over 4 chips (context parallelism;
  # the YaRN 64k recipe changes the mesh and strategy);
  # the batch is split over data × fsdp.
  m.scan_layers, m.remat, m.gather_dtype = True, "full", "bfloat16"
  config.mesh.data = -1
  config.mesh.fsdp, config.mesh.context = (64, 4) if target == "v5e-256" else (8, 1)
  return config
