"""Llama-family checkpoints <-> this codebase's config and parameters.

An HF ``config.json`` (Llama, Mistral, Qwen2; ``rope_parameters`` of transformers 5 or
``rope_theta`` + ``rope_scaling`` of 4) becomes a ``configs/base.py`` config: RMSNorm with
``norm_eps``, SwiGLU with ``mlp_dim = intermediate_size``, ``num_kv_heads`` KV heads, RoPE
(half layout) with the checkpoint's base, partial rotary and ``rope_scaling``, ``qkv_bias`` for
Qwen2, tied or untied output; ``train.seq_len`` is the trained context L
(``original_max_position_embeddings`` if the checkpoint is already extended, else
``max_position_embeddings``). Parameters map by the table in layout.py.

What the model cannot represent (MoE, sliding-window attention, another activation, biases
beyond q/k/v) is a one-line ``ValueError`` naming the config field.
"""

from __future__ import annotations

import json
import math

import ml_collections
import numpy as np

from pe_research.encodings import rope_extension
from pe_research.pretrained import layout

SUPPORTED = ("llama", "mistral", "qwen2")
_HF_ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_L = "original_max_position_embeddings"


def _reject(field: str, value, allowed: str) -> None:
  raise ValueError(f"config.json {field}={value!r} is not supported; allowed: {allowed}")


def _check_architecture(hf: dict) -> str:
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    _reject("model_type", model_type, ", ".join(SUPPORTED))
  for field in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size"):
    if hf.get(field):
      _reject(field, hf[field], "dense models (no mixture of experts)")
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    _reject("hidden_act", hf.get("hidden_act"), "silu (SwiGLU MLP)")
  if hf.get("mlp_bias"):
    _reject("mlp_bias", hf["mlp_bias"], "false")
  if model_type != "qwen2" and hf.get("attention_bias"):
    _reject("attention_bias", hf["attention_bias"], "false (q/k/v biases: Qwen2)")
  sliding = hf.get("use_sliding_window", model_type == "mistral") and hf.get("sliding_window")
  if sliding:
    _reject("sliding_window", hf["sliding_window"], "null (full attention in every layer)")
  layer_types = set(hf.get("layer_types") or ["full_attention"])
  if layer_types != {"full_attention"}:
    _reject("layer_types", sorted(layer_types), "full_attention only")
  for field in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
    if not isinstance(hf.get(field), int) or hf[field] < 1:
      _reject(field, hf.get(field), "a positive integer")
  return model_type


def rope_settings(hf: dict) -> tuple[float, float, dict | None, int]:
  """``(base, rotary_pct, rope_scaling or None, trained context L)`` of an HF config."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  base = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  pct = float(params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
  if "type" in params:  # transformers 4's name
    params.setdefault("rope_type", params.pop("type"))
  max_positions = int(hf.get("max_position_embeddings", 2048))
  rope_type = params.get("rope_type", "default")
  if rope_type == "default":
    return base, pct, None, max_positions
  trained_len = int(params.get(_L, max_positions))
  if rope_type == "linear":  # transformers 5 writes L into every type; linear takes none.
    params.pop(_L, None)
  else:  # HF falls back to max_position_embeddings for L; say it explicitly in our config.
    params[_L] = trained_len
  return base, pct, params, trained_len


def config_from_hf(hf: dict, *, tokenizer: str) -> ml_collections.ConfigDict:
  """The run config of an HF model config (see the module docstring)."""
  from configs import base as base_config

  model_type = _check_architecture(hf)
  base, pct, scaling, trained_len = rope_settings(hf)
  config = base_config.get_config()
  m = config.model
  m.vocab_size = int(hf["vocab_size"])
  m.num_layers = int(hf["num_hidden_layers"])
  m.model_dim = int(hf["hidden_size"])
  m.num_heads = int(hf["num_attention_heads"])
  m.num_kv_heads = int(hf.get("num_key_value_heads") or m.num_heads)
  m.head_dim = int(hf.get("head_dim") or m.model_dim // m.num_heads)
  m.mlp_dim = int(hf["intermediate_size"])
  m.mlp, m.norm = "swiglu", "rmsnorm"
  m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
  m.qkv_bias = model_type == "qwen2"
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", model_type != "qwen2"))
  m.attention = "blockwise"  # Long evaluations in linear memory; same values as dense.
  # SmolLM2-135M's forward attention at 8k, batch 1 (Zen 4, 2 cores): 512-blocks 1.3x 256's.
  m.attention_block = 512
  m.init_std = float(hf.get("initializer_range", 0.02))
  config.pe.name = "rope"
  config.pe.rope_base = base
  config.pe.rotary_pct = pct
  config.pe.rope_layout = "half"
  config.pe.rope_scaling = json.dumps(scaling, sort_keys=True) if scaling else ""
  config.train.seq_len = trained_len
  config.data.tokenizer = tokenizer
  return config


def params_from_hf(tensors, config, place=None) -> dict:
  """Our parameter pure dict (``nnx.to_pure_dict`` of ``nnx.Param`` state) from HF tensors
  (a dict, or ``hf_folder.SafetensorsFolder`` to read them one at a time); each of our tensors
  is stored as ``place(path, x)`` as soon as it is built (default: the numpy array ``x``)."""
  return layout.params_from(tensors.__getitem__, config.model, place)


def _check_exportable(config) -> None:
  m, pe = config.model, config.pe
  needed = {
    "model.norm": (m.norm, "rmsnorm"),
    "model.mlp": (m.mlp, "swiglu"),
    "pe.name": (pe.name, "rope"),
    "pe.rope_layout": (pe.rope_layout, "half"),
    "pe.randomized": (pe.randomized, False),
    "model.scale_embeddings": (m.scale_embeddings, False),
  }
  for field, (value, allowed) in needed.items():
    if value != allowed:
      raise ValueError(f"{field}={value!r} has no HF Llama equivalent; allowed: {allowed!r}")
  for field, value in rope_extension.switched_on(pe).items():
    raise ValueError(
      f"{field}={value!r} has no HF Llama equivalent (transformers cannot represent Self-Extend, "
      "ReRoPE or log-n scaling); allowed: 0 (export the run without it)"
    )


def _hf_rope(config) -> tuple[dict, int]:
  """``(rope_parameters, max_position_embeddings)`` of the run's RoPE for transformers 5.

  Our ``ntk`` (static NTK-aware) is HF's ``default`` with the enlarged base
  ``b · s^(d/(d-2))``. HF's ``dynamic`` reads L from ``max_position_embeddings``; for the
  other types ``max_position_embeddings`` is the extended length ``s · L``."""
  from pe_research.encodings.rope import rotary_dim_for
  from pe_research.model_size import resolved_dims

  pe = config.pe
  scaling = json.loads(pe.rope_scaling) if pe.rope_scaling else {}
  params = {"rope_theta": float(pe.rope_base), "rope_type": "default"}
  if pe.rotary_pct != 1.0:
    params["partial_rotary_factor"] = float(pe.rotary_pct)
  trained_len = int(scaling.get(_L, config.train.seq_len))
  rope_type = scaling.get("rope_type", "default")
  if rope_type == "default":
    return params, trained_len
  if rope_type == "ntk":
    dim = rotary_dim_for(resolved_dims(config.model)[0], pe.rotary_pct)
    params["rope_theta"] = float(pe.rope_base * scaling["factor"] ** (dim / (dim - 2)))
    return params, trained_len
  params |= scaling | {_L: trained_len}
  if rope_type == "dynamic":
    return params, trained_len
  return params, int(math.ceil(trained_len * float(scaling.get("factor", 1.0))))


def hf_config_from(config, source: dict | None = None) -> dict:
  """An HF ``config.json`` (transformers 5) for the run's model. Token ids and other fields the
  run does not define come from ``source`` (the imported checkpoint's config) when given."""
  from pe_research.model_size import resolved_dims

  _check_exportable(config)
  m = config.model
  model_type = "qwen2" if m.qkv_bias else "llama"
  hf = {key: value for key, value in (source or {}).items() if key not in ("rope_scaling",)}
  if hf.get("model_type") not in (None, model_type):
    hf = {key: hf[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in hf}
  rope, max_positions = _hf_rope(config)
  hf |= {
    "architectures": [_HF_ARCHITECTURE[model_type]],
    "model_type": model_type,
    "vocab_size": m.vocab_size,
    "hidden_size": m.model_dim,
    "intermediate_size": resolved_dims(m)[1],
    "num_hidden_layers": m.num_layers,
    "num_attention_heads": m.num_heads,
    "num_key_value_heads": m.num_kv_heads or m.num_heads,
    "head_dim": resolved_dims(m)[0],
    "hidden_act": "silu",
    "rms_norm_eps": m.norm_eps,
    "tie_word_embeddings": m.tie_embeddings,
    "max_position_embeddings": max_positions,
    "rope_parameters": rope,
    "initializer_range": m.init_std,
  }
  hf.pop("rope_theta", None)
  if model_type == "llama":
    hf |= {"attention_bias": False, "mlp_bias": False}
  else:
    hf |= {"use_sliding_window": False, "sliding_window": None}
    hf.pop("layer_types", None)
  return hf


def hf_tensors_from(params: dict, config) -> dict[str, np.ndarray]:
  """HF float32 tensors from our parameter pure dict: the inverse of :func:`params_from_hf`."""
  return dict(layout.hf_tensors(params, config.model))
