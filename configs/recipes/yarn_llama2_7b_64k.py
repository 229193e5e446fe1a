r"""YaRN (Peng et al. 2023, ICLR 2024): Llama-2 7B extended to 64k tokens, the paper's recipe.

The paper's numbers followed: scale s = 16 over the original 4,096 positions (rope_scaling
``{"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 4096}``), 65,536-token
sequences (PG19 chunks), global batch 64, 400 steps, lr 2e-5, no weight decay, linear warmup of
20 steps, AdamW beta = (0.9, 0.95) (results_to_reproduce.md, "Recipes at paper scale"). Tokens
seen: 64 × 65,536 × 400 = 1.68e9.

Variants: ``target=v5e-256`` (default: 256 TPU v5e chips) or ``h100x8`` (8 H100s), the mesh;
``init_from=<workdir>`` the imported Llama-2 7B (its parameters and tokenizer.json; "" = random
init, for dry runs). Prove it fits without the hardware (TPU: libtpu from ``make tpu-aot-deps``):

  PYTHONPATH=.tpu-site python -m pe_research.dry_run \
      --config=configs/recipes/yarn_llama2_7b_64k.py --topology=v5e:16x16
  python -m pe_research.dry_run --config=configs/recipes/yarn_llama2_7b_64k.py:target=h100x8 \
      --devices=8 --chip=h100

Fine-tune (import the HF checkpoint once, then run on the pod; re-running resumes):

  python -m pe_research.pretrained import --source=PATH/Llama-2-7b-hf \
      --workdir=runs/pretrained/llama2-7b
  python -m pe_research.main --workdir=runs/yarn_llama2_7b_64k \
      --config=configs/recipes/yarn_llama2_7b_64k.py:init_from=runs/pretrained/llama2-7b

The measured memory per device and step time: docs/scaling.md.
"""

import json

import ml_collections

from configs.recipes.llama2_7b import TRAIN_LEN, llama2_7b_config
from pe_research.config_lib import parse_config_arg

SCALE = 16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = parse_config_arg(arg, target="v5e-256", init_from="")
  config = llama2_7b_config(variant.target, variant.init_from)
  config.pe.rope_scaling = json.dumps(
    {"rope_type": "yarn", "factor": SCALE, "original_max_position_embeddings": TRAIN_LEN}
  )
  t = config.train
  t.seq_len = SCALE * TRAIN_LEN  # 65,536.
  t.batch_size, t.steps, t.lr, t.warmup_steps = 64, 400, 2e-5, 20
  t.checkpoint_every = 100
  # The memory levers at 65,536 tokens (docs/scaling.md measures each): the sequence split over
  # 8 chips of the v5e-256 (8,192 tokens per chip, fsdp 32, 2 micro-batches of one sequence
  # per group) and over 2 of the 8 H100s (32,768 per GPU, fsdp 4, 16 micro-batches), with the
  # ring strategy, whose keys and values per chip are one shard's, not the whole sequence's.
  config.model.context_parallel = "ring"
  if variant.target == "h100x8":
    config.mesh.fsdp, config.mesh.context, t.grad_accum_steps = 4, 2, 16
  else:
    config.mesh.fsdp, config.mesh.context, t.grad_accum_steps = 32, 8, 2
  return config
