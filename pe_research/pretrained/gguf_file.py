"""Read a llama-architecture GGUF file (llama.cpp's format) into HF-transformers form.

`read_gguf(path)` returns what a HF checkpoint folder holds for the same model: the `config.json`
dict of a `LlamaForCausalLM` (or `Qwen2ForCausalLM`), its state dict as float32 numpy arrays, and
the `tokenizer.json` text; `open_gguf(path)` the same with the tensors read one at a time
(`GGUFTensors`). Dense models with a byte-level BPE ("gpt2") vocabulary only; anything
else raises a one-line `ValueError` naming the field and what is allowed.
"""

import os

import gguf
import numpy as np

from pe_research.pretrained import layout
from pe_research.pretrained.gguf_tokenizer import tokenizer_json

_MODEL_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_T = gguf.GGMLQuantizationType
_DEQUANTIZABLE = (
  *(_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1),
  *(_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K),
)
# HF rope_scaling keys of the GGUF `{arch}.rope.scaling.*` keys; "finetuned" changes nothing.
_ROPE_SCALING_KEYS = {
  "factor": "factor",
  "original_context_length": "original_max_position_embeddings",
  "yarn_beta_fast": "beta_fast",
  "yarn_beta_slow": "beta_slow",
}
_ROPE_SCALING_TYPES = ("none", "linear", "yarn")
_MISSING = object()


def open_gguf(path: str) -> tuple[dict, "GGUFTensors", str]:
  """(hf_config, tensors, tokenizer_json) of a llama-architecture GGUF file, its tensors
  dequantized one at a time as they are read (:class:`GGUFTensors`)."""
  reader = _open(path)
  metadata = {key: field.contents() for key, field in reader.fields.items()}
  config = _hf_config(metadata, {t.name: t for t in reader.tensors})
  return config, GGUFTensors(reader.tensors, config), tokenizer_json(metadata)


def read_gguf(path: str) -> tuple[dict, dict[str, np.ndarray], str]:
  """(hf_config, tensors, tokenizer_json) of a llama-architecture GGUF file.

  `tensors` maps HF parameter names to float32 arrays in HF shapes (Linear weights [out, in]):
  dequantized, and for llama files with llama.cpp's Q/K row interleave undone.
  """
  config, tensors, tokenizer = open_gguf(path)
  return config, {name: tensors[name] for name in tensors.names()}, tokenizer


def _open(path: str) -> gguf.GGUFReader:
  if not os.path.isfile(path):
    raise ValueError(f"GGUF path {path!r}: no such file")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader fails in many ways on a damaged file; all mean "unreadable"
    reason = (str(e).splitlines() or [""])[0]
    raise ValueError(
      f"GGUF path {path!r}: not a complete GGUF file ({type(e).__name__}: {reason})"
    ) from e


def _field(metadata: dict, key: str, default=_MISSING):
  """metadata[key], or `default`; a required key that is absent is a ValueError naming it."""
  if key in metadata:
    return metadata[key]
  if default is _MISSING:
    raise ValueError(f"GGUF field {key} is missing")
  return default


def _float32(value: float) -> float:
  """Shortest decimal of a float32 field: 1e-05, not 9.999999747378752e-06."""
  return float(str(np.float32(value)))


def _hf_config(metadata: dict, tensors: dict) -> dict:
  """The `config.json` of the HF model equivalent to the file's metadata and tensor list."""
  arch = _field(metadata, "general.architecture")
  if arch not in _MODEL_CLASSES:
    raise ValueError(f"general.architecture={arch!r} is not supported; allowed: llama, qwen2")
  _check_dense(metadata, arch)
  if "token_embd.weight" not in tensors:
    raise ValueError("tensor token_embd.weight is missing")
  hidden = _field(metadata, f"{arch}.embedding_length")
  heads = _field(metadata, f"{arch}.attention.head_count")
  head_dim = _field(metadata, f"{arch}.attention.key_length", hidden // heads)
  for key in (f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
    if _field(metadata, key, head_dim) != head_dim:
      raise ValueError(
        f"{key}={_field(metadata, key)} is not supported; allowed: head_dim={head_dim}"
      )
  config = {
    "model_type": arch,
    "architectures": [_MODEL_CLASSES[arch]],
    "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # GGML order: [D, V]
    "hidden_size": hidden,
    "intermediate_size": _field(metadata, f"{arch}.feed_forward_length"),
    "num_hidden_layers": _field(metadata, f"{arch}.block_count"),
    "num_attention_heads": heads,
    "num_key_value_heads": _field(metadata, f"{arch}.attention.head_count_kv", heads),
    "head_dim": head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": _float32(_field(metadata, f"{arch}.attention.layer_norm_rms_epsilon")),
    "rope_theta": _float32(_field(metadata, f"{arch}.rope.freq_base", 10000.0)),
    "max_position_embeddings": _field(metadata, f"{arch}.context_length"),
    "tie_word_embeddings": "output.weight" not in tensors,
    "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
  }
  for name in ("bos", "eos"):
    token_id = _field(metadata, f"tokenizer.ggml.{name}_token_id", None)
    if token_id is not None:
      config[f"{name}_token_id"] = token_id
  rope_scaling = _rope_scaling(metadata, arch)
  if rope_scaling is not None:
    config["rope_scaling"] = rope_scaling
  return config


def _check_dense(metadata: dict, arch: str) -> None:
  """Reject mixture-of-experts and sliding-window files, which a dense HF Llama cannot hold."""
  experts = _field(metadata, f"{arch}.expert_count", 0)
  if experts > 0:
    raise ValueError(f"{arch}.expert_count={experts}: mixture of experts; allowed: 0 or absent")
  for key in metadata:
    if key.startswith(f"{arch}.attention.sliding_window"):
      raise ValueError(f"{key} is set: sliding-window attention is not supported; allowed: absent")


def _rope_scaling(metadata: dict, arch: str) -> dict | None:
  """HF `rope_scaling` ({"rope_type": "linear" | "yarn", "factor": ...}) or None when unscaled."""
  prefix = f"{arch}.rope.scaling."
  rope_type = _field(metadata, prefix + "type", "none")
  if rope_type not in _ROPE_SCALING_TYPES:
    allowed = ", ".join(_ROPE_SCALING_TYPES)
    raise ValueError(f"{prefix}type={rope_type!r} is not supported; allowed: {allowed}")
  if rope_type == "none":
    return None
  scaling = {"rope_type": rope_type}
  for key in metadata:
    suffix = key.removeprefix(prefix)
    if not key.startswith(prefix) or suffix in ("type", "finetuned"):
      continue
    if suffix not in _ROPE_SCALING_KEYS:
      allowed = ", ".join(prefix + k for k in _ROPE_SCALING_KEYS)
      raise ValueError(f"{key} is not supported; allowed: {allowed}")
    value = _field(metadata, key)
    scaling[_ROPE_SCALING_KEYS[suffix]] = value if isinstance(value, int) else _float32(value)
  if "factor" not in scaling:
    raise ValueError(f"GGUF field {prefix}factor is missing (needed by {prefix}type={rope_type})")
  return scaling


def _model_cfg(config: dict):
  from pe_research.pretrained import convert

  return convert.config_from_hf(config, tokenizer="bytes").model


def tensor_names(config: dict) -> dict[str, str]:
  """GGUF name -> HF name of every tensor of the model (layout.py's table), by the ``gguf``
  package's own HF -> GGUF name map (the one llama.cpp's converter writes with)."""
  arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[config["model_type"]]
  names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
  return {
    names.get_name(name, try_suffixes=(".weight", ".bias")): name
    for name in layout.hf_specs(_model_cfg(config))
  }


class GGUFTensors:
  """The file's tensors by HF name (``tensors[name]``): each dequantized to float32, shape-checked
  and (llama) un-permuted when read. Names and types are checked on opening; the file stays
  memory-mapped by the reader, so host memory holds the tensor being converted."""

  def __init__(self, reader_tensors: list, config: dict):
    self._specs = layout.hf_specs(_model_cfg(config))
    self._permuted = config["model_type"] == "llama"
    hf_names = tensor_names(config)
    self._tensors = {}
    for tensor in reader_tensors:
      if tensor.name not in hf_names:
        raise ValueError(
          f"tensor {tensor.name} is not part of this {config['model_type']} model; allowed: "
          f"its {len(hf_names)} tensors ({', '.join(list(hf_names)[:3])}, ...)"
        )
      if tensor.tensor_type not in _DEQUANTIZABLE:
        allowed = ", ".join(t.name for t in _DEQUANTIZABLE)
        raise ValueError(
          f"tensor {tensor.name} has type {tensor.tensor_type.name}; allowed: {allowed}"
        )
      self._tensors[hf_names[tensor.name]] = tensor
    for name, hf_name in hf_names.items():
      if hf_name not in self._tensors:
        raise ValueError(f"tensor {name} is missing")

  def names(self) -> list[str]:
    return list(self._tensors)

  def __getitem__(self, hf_name: str) -> np.ndarray:
    tensor = self._tensors[hf_name]
    shape, rope_heads = self._specs[hf_name]
    w = layout.check_shape(tensor.name, _dequantize(tensor), shape)
    return _unpermute_rows(w, rope_heads) if self._permuted and rope_heads else w


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
  """float32 copy of a tensor in HF order (the reader reverses GGML's [in, out] to [out, in])."""
  return np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row interleave (`permute` in its convert_hf_to_gguf.py).

  HF rotates the halves of each head (x_i, x_{i+E/2}); llama.cpp rotates adjacent pairs
  (x_{2i}, x_{2i+1}). The converter stores HF row h·E + j·E/2 + i at row h·E + 2i + j
  (h < heads, i < E/2, j ∈ {0, 1}); viewing rows as [heads, E/2, 2] and swapping the last two
  axes restores HF order. For weights [heads·E, D] and biases [heads·E].
  """
  return w.reshape(heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
