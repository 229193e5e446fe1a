r"""PoSE (Zhu et al., ICLR 2024): a 7B Llama fine-tuned on 2k windows whose positions cover 128k.

The paper's numbers followed: training window L_c = 2,048 tokens, target L_t = 131,072
(positions skipped up to it: ``pe.pose_target_len``), N = 2 chunks with the first chunk's
length and the skip drawn uniformly per example (``pe.pose_chunks``), 1,000 steps, global batch
64, lr 2e-5, combined with YaRN frequencies for the target length (results_to_reproduce.md,
"Recipes at paper scale"). The paper fine-tunes LLaMA-1 7B (trained at 2,048); here Llama-2 7B
(the same architecture, trained at 4,096), so YaRN's scale is s = 131,072 / 4,096 = 32. Tokens
seen: 64 × 2,048 × 1,000 = 1.31e8, 1/64 of full-length fine-tuning at 128k.

Variants: ``target=v5e-256`` (default: 256 TPU v5e chips) or ``h100x8`` (8 H100s), the mesh;
``init_from=<workdir>`` the imported Llama-2 7B (its parameters and tokenizer.json; "" = random
init, for dry runs). Prove it fits without the hardware (TPU: libtpu from ``make tpu-aot-deps``):

  PYTHONPATH=.tpu-site python -m pe_research.dry_run \
      --config=configs/recipes/pose_llama2_7b_128k.py --topology=v5e:16x16
  python -m pe_research.dry_run --config=configs/recipes/pose_llama2_7b_128k.py:target=h100x8 \
      --devices=8 --chip=h100

Fine-tune (import the HF checkpoint once; re-running resumes):

  python -m pe_research.pretrained import --source=PATH/Llama-2-7b-hf \
      --workdir=runs/pretrained/llama2-7b
  python -m pe_research.main --workdir=runs/pose_llama2_7b_128k \
      --config=configs/recipes/pose_llama2_7b_128k.py:init_from=runs/pretrained/llama2-7b
"""

import json

import ml_collections

from configs.recipes.llama2_7b import TRAIN_LEN, llama2_7b_config
from pe_research.config_lib import parse_config_arg

WINDOW = 2048  # L_c: tokens per training example.
TARGET_LEN = 131072  # L_t: the positions the windows' skips reach.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = parse_config_arg(arg, target="v5e-256", init_from="")
  config = llama2_7b_config(variant.target, variant.init_from)
  config.pe.pose_target_len, config.pe.pose_chunks = TARGET_LEN, 2
  config.pe.rope_scaling = json.dumps(
    {
      "rope_type": "yarn",
      "factor": TARGET_LEN // TRAIN_LEN,
      "original_max_position_embeddings": TRAIN_LEN,
    }
  )
  t = config.train
  t.seq_len = WINDOW
  t.batch_size, t.steps, t.lr, t.warmup_steps = 64, 1000, 2e-5, 20
  t.checkpoint_every = 250
  return config
