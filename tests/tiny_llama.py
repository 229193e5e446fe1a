"""Tiny random HF Llama/Qwen2 models saved as HF folders, for the pretrained-model tests."""

import os

import pytest

transformers = pytest.importorskip("transformers", reason="tiny HF models need requirements-dev")
torch = pytest.importorskip("torch", reason="tiny HF models need requirements-dev")

VOCAB, L_ORIG, LENGTH = 320, 32, 64


def byte_level_tokenizer(vocab_size: int = 257) -> str:
  """tokenizer.json text: the 256 byte-level symbols and ``<|endoftext|>`` (no merges)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>"] + [f"<|x{i}|>" for i in range(vocab_size - 257)])
  return tok.to_str()


def hf_model(kind: str = "llama", *, tied: bool = False, rope: dict | None = None):
  """A tiny random HF model with non-trivial norms (and biases for qwen2)."""
  torch.manual_seed(0)
  common = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    tie_word_embeddings=tied,
    max_position_embeddings=L_ORIG if rope else LENGTH,
  )
  if rope:
    common["rope_parameters"] = {"rope_theta": 10000.0, **rope}
  if kind == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
  else:
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.2 if p.ndim == 2 else 0.5)
  return model.eval()


def save(model, path, **kwargs) -> str:
  """``model`` as an HF folder with a byte-level tokenizer; kwargs go to ``save_pretrained``
  (``max_shard_size="40KB"``: several shards and an index)."""
  model.save_pretrained(path, **kwargs)
  with open(os.path.join(path, "tokenizer.json"), "w") as f:
    f.write(byte_level_tokenizer())
  return str(path)
