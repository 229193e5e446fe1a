"""HF model folders: ``config.json``, safetensors weights (one file or a sharded index) and
``tokenizer.json``, read into and written from plain numpy (no torch).

  open_hf_folder(path)  -> (hf_config, tensors read one at a time, tokenizer_json)
  read_hf_folder(path)  -> (hf_config, tensors, tokenizer_json)
  write_hf_folder(out, hf_config, tensors, tokenizer_json, tokenizer_config, ...)  sharded, bf16

``tensors`` maps HF parameter names (``model.layers.0.self_attn.q_proj.weight``) to float32
arrays in HF's layouts (linear weights ``[out, in]``). Every bad input is a ``ValueError`` of
one line naming the file and what is allowed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

from pe_research.pretrained import shards

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
WEIGHTS, WEIGHTS_INDEX = shards.WEIGHTS, shards.WEIGHTS_INDEX


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is unreadable ({' '.join(str(e).split())}); allowed: JSON") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path} holds {type(value).__name__}; allowed: a JSON object")
  return value


def _unreadable(path: str, error: Exception) -> ValueError:
  msg = " ".join(str(error).split())
  return ValueError(f"{path} is not a readable safetensors file ({msg}); allowed: an intact file")


class SafetensorsFolder:
  """The tensors of an HF folder (``model.safetensors`` or the shards of its index), read one
  at a time in their stored dtype (``folder[name]``; numpy reads bf16 through ml_dtypes; the
  layout widens them to float32 exactly as it places them). Each read opens its file with
  ``safe_open`` and closes it, so no file stays mapped: host memory holds the tensor being
  read, not the checkpoint."""

  def __init__(self, path: str):
    index = os.path.join(path, WEIGHTS_INDEX)
    single = os.path.join(path, WEIGHTS)
    if os.path.isfile(index):
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no weight_map; allowed: an HF sharded-checkpoint index")
      self.files = {name: os.path.join(path, file) for name, file in weight_map.items()}
      for file in sorted(set(self.files.values())):
        if not os.path.isfile(file):
          raise ValueError(f"{file} is missing (listed in {WEIGHTS_INDEX}); allowed: every shard")
    elif os.path.isfile(single):
      self.files = dict.fromkeys(self._read(single, lambda f: list(f.keys())), single)
    else:
      raise ValueError(
        f"--source={path!r} has neither {WEIGHTS} nor {WEIGHTS_INDEX}; allowed: an HF model "
        "folder saved with safetensors (save_pretrained(..., safe_serialization=True))"
      )

  @staticmethod
  def _read(file: str, fn):
    from safetensors import SafetensorError, safe_open

    try:
      with safe_open(file, framework="numpy") as f:
        return fn(f)
    except (SafetensorError, OSError, ValueError) as e:
      raise _unreadable(file, e) from None

  def names(self) -> list[str]:
    return list(self.files)

  def __getitem__(self, name: str) -> np.ndarray:
    """Tensor ``name`` as stored; KeyError when the folder has none."""
    return self._read(self.files[name], lambda f: f.get_tensor(name))


def open_hf_folder(path: str) -> tuple[dict, SafetensorsFolder, str | None]:
  """``(hf_config, tensors read on demand, tokenizer_json)`` of an HF model folder
  (tokenizer_json is None when the folder has no ``tokenizer.json``)."""
  if not os.path.isdir(path):
    raise ValueError(f"--source={path!r} is not a folder or a .gguf file; allowed: either")
  config_path = os.path.join(path, CONFIG)
  if not os.path.isfile(config_path):
    raise ValueError(f"--source={path!r} has no {CONFIG}; allowed: an HF model folder")
  hf_config = _read_json(config_path)
  tensors = SafetensorsFolder(path)
  tokenizer_path = os.path.join(path, TOKENIZER)
  tokenizer_json = None
  if os.path.isfile(tokenizer_path):
    with open(tokenizer_path) as f:
      tokenizer_json = f.read()
  return hf_config, tensors, tokenizer_json


def read_hf_folder(path: str) -> tuple[dict, dict[str, np.ndarray], str | None]:
  """``(hf_config, tensors, tokenizer_json)`` of an HF model folder, every tensor read as
  float32 (bf16/f16 widened exactly)."""
  hf_config, folder, tokenizer_json = open_hf_folder(path)
  tensors = {name: np.asarray(folder[name], np.float32) for name in folder.names()}
  return hf_config, tensors, tokenizer_json


def write_hf_folder(
  out: str,
  hf_config: dict,
  tensors: dict[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
  tokenizer_json: str | None,
  tokenizer_config: dict | None = None,
  *,
  shapes: dict[str, tuple[int, ...]] | None = None,
  dtype: str = "float32",
  max_shard_size: str | int = "5GB",
) -> list[str]:
  """Writes ``config.json``, the weights as ``dtype`` (``model.safetensors``, or shards of at
  most ``max_shard_size`` and their index: shards.py) and the tokenizer files to ``out``
  (created; earlier weights and files of these names are replaced). ``tensors`` is a dict, or
  ``(name, array)`` pairs in the order of ``shapes``, written one at a time. Returns the weight
  files."""
  if shapes is None:
    shapes = {name: np.shape(x) for name, x in tensors.items()}
    tensors = tensors.items()
  os.makedirs(out, exist_ok=True)
  files = shards.write_shards(out, shapes, tensors, dtype, max_shard_size)
  with open(os.path.join(out, CONFIG), "w") as f:
    json.dump(hf_config | {"torch_dtype": dtype}, f, indent=2, sort_keys=True)
  if tokenizer_json is not None:
    with open(os.path.join(out, TOKENIZER), "w") as f:
      f.write(tokenizer_json)
  if tokenizer_config is not None:
    with open(os.path.join(out, TOKENIZER_CONFIG), "w") as f:
      json.dump(tokenizer_config, f, indent=2, sort_keys=True)
  return files
