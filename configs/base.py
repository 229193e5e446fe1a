"""Every config field, with its default. Other configs start from ``get_config()`` and edit it.

Not a runnable experiment by itself (it trains the default model on the default data):

  python -m pe_research.main --config=configs/base.py --workdir=runs/base

Fields are validated once at start-up by ``pe_research.config_lib.validate``; an invalid value
exits with code 2 and one line naming the field and what is allowed.
"""

import ml_collections

from pe_research.encodings import registry


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config; ``arg`` is unused (variants live in other config files)."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, the model's RNG streams and the data order.
  config.init_from = ""  # Workdir of another run: start from its latest params ("" = random).

  config.model = ml_collections.ConfigDict()
  config.model.vocab_size = 260  # 256 bytes + special tokens (see pe_research.data).
  config.model.num_layers = 4  # Transformer blocks.
  config.model.model_dim = 256  # Residual width D.
  config.model.num_heads = 4  # Attention heads H.
  config.model.num_kv_heads = 0  # Key/value heads G (grouped-query attention); 0 = num_heads.
  config.model.head_dim = 0  # Per-head width K; 0 = model_dim // num_heads.
  config.model.mlp_dim = 0  # MLP hidden width; 0 = 4*model_dim (gelu), ~8/3*model_dim (swiglu).
  config.model.mlp = "gelu"  # "gelu" or "swiglu".
  config.model.norm = "layernorm"  # Pre-norm type: "layernorm" or "rmsnorm".
  config.model.norm_eps = 1e-5  # Epsilon of every norm (LayerNorm/RMSNorm denominator).
  config.model.qkv_bias = False  # Biases on the q/k/v projections (Qwen2); others have none.
  config.model.tie_embeddings = True  # Output projection = transposed input embedding.
  # "dense" (einsum), "blockwise" (online softmax), "xla", "pallas" (Pallas kernel, TPU), "splash"
  # (TPU, no bias), "fast" (the backend policy's choice per encoding: splash/pallas on TPU).
  config.model.attention = "dense"
  # Query/key block size of blockwise attention. Training on the CPU at L <= 1024, 128 is faster
  # (it skips more of the masked half: 1.02-1.05x a step, docs/cpu_performance.md).
  config.model.attention_block = 256
  # Attention with the sequence split over the mesh axis "context" (dense/blockwise only):
  # "all_gather" (k, v gathered: the whole sequence's K/V per device) or "ring" (k, v passed
  # round the ring: one shard's K/V per device). docs/scaling.md, "Context parallelism".
  config.model.context_parallel = "all_gather"
  # Matmul operands: "float32" or "bfloat16" (fp32 accumulation, fp32 params). bf16 activations
  # on accelerators; on the CPU activations stay fp32 (model.activation_dtype).
  config.model.compute_dtype = "float32"
  config.model.init_std = 0.02  # Std of the normal init of embeddings and projections.
  config.model.scale_embeddings = False  # Multiply token embeddings by sqrt(model_dim).
  # Blocks' parameters stacked on a leading layer axis and run with lax.scan: one compiled block
  # (compile time flat in depth) and, with mesh.fsdp > 1, each layer's weights gathered inside
  # the scan body instead of the whole model at the start of the step (docs/scaling.md).
  config.model.scan_layers = False
  # What a block keeps for the backward pass: "none" (everything), "full" (only its input; the
  # rest recomputed), "save_projections" (the outputs of the q/k/v, attention, output and MLP
  # projections; model.PROJECTIONS).
  config.model.remat = "none"
  # With scan_layers: each layer's weights are cast to this before their FSDP gather
  # ("bfloat16" halves the gathered bytes; fp32 master weights stay in the optimizer).
  config.model.gather_dtype = "float32"

  config.train = ml_collections.ConfigDict()
  config.train.seq_len = 128  # Training sequence length L (tokens per example).
  # Global batch (all processes); batch_size / grad_accum_steps divisible by data * fsdp.
  config.train.batch_size = 16
  # Micro-batches per step (a lax.scan): their weighted losses and gradients are summed, then
  # divided by the total weight, so k micro-batches equal one batch k times their size.
  config.train.grad_accum_steps = 1
  config.train.steps = 1000  # Optimizer steps; raising it later extends a finished run.
  config.train.lr = 1e-3  # Peak learning rate of AdamW.
  config.train.warmup_steps = 100  # Linear warmup from 0 to lr, then cosine decay.
  config.train.min_lr_ratio = 0.1  # Final lr = lr * min_lr_ratio at the last step.
  config.train.weight_decay = 0.1  # Decoupled weight decay on matrices (ndim >= 2) only.
  config.train.b1 = 0.9  # AdamW first-moment decay.
  config.train.b2 = 0.95  # AdamW second-moment decay.
  config.train.grad_clip = 1.0  # Clip the global gradient norm to this; 0 = no clipping.
  config.train.log_every = 10  # Steps between metrics.jsonl / TensorBoard records.
  config.train.checkpoint_every = 200  # Steps between checkpoints (one is also saved at the end).
  config.train.keep_checkpoints = 3  # Checkpoints kept in the workdir (oldest deleted).
  config.train.nan_policy = "stop"  # Non-finite loss/grads: "stop" the run or "skip" the step.
  # Steps per compiled call (a lax.scan over that many batches) where no log or checkpoint step
  # falls inside; best a divisor of log_every and checkpoint_every. On the CPU 4-8 is 15-20%
  # faster per step than 1: temporaries are allocated (page-faulted) once per call.
  config.train.steps_per_call = 1

  config.pe = ml_collections.ConfigDict()
  config.pe.name = "rope"  # Registry name: one of pe_research.encodings.registry.FAMILIES.
  # The fields each encoding (and positions wrapper) owns, with their defaults; each field's
  # comment and rule is in its encoding's SPEC (e.g. pe.rope_base in encodings/rope.py).
  for field in registry.pe_fields():
    config.pe[field.name] = field.default
  config.pe.share_across_layers = True  # One encoding module shared by every layer.
  # The training length, for encodings that use it; follows train.seq_len.
  config.pe.train_len = config.train.get_ref("seq_len")

  config.data = ml_collections.ConfigDict()
  config.data.name = "pystdlib"  # Dataset name (see pe_research.data).
  config.data.data_dir = "data/tfds"  # TFDS data_dir for prepared datasets.
  config.data.local_dir = ""  # Folder of text files for the local_text dataset.
  config.data.tokenizer = "bytes"  # "bytes" or the path of a HF tokenizers tokenizer.json.
  config.data.eval_tokens = 65536  # Tokens per evaluation length.
  # Split evaluated: "validation", or "train" (zero-shot on a model not trained on this corpus).
  config.data.eval_split = "validation"
  config.data.task = "copy"  # Algorithmic task for the synthetic dataset.
  config.data.train_min_len = 1  # Synthetic task: shortest training instance.
  config.data.train_max_len = 20  # Synthetic task: longest training instance.
  config.data.test_min_len = 21  # Synthetic task: shortest test instance.
  config.data.test_max_len = 80  # Synthetic task: longest test instance.
  config.data.auto_prepare = True  # Prepare a missing TFDS dataset from local sources.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data-parallel axis size; -1 = all devices left after fsdp.
  config.mesh.fsdp = 1  # Parameter-sharding axis size (1 = parameters replicated).
  config.mesh.context = 1  # Sequence-sharding axis size (context parallelism; 1 = none).
  return config
