"""Pretrained Llama-family checkpoints: import from HF folders, logits equal to transformers',
context-extension rope types, export back, and one-line errors for what cannot be imported.

Tiny random models built by transformers 5.24 (torch, float32) and saved with
``save_pretrained``: GQA with 4 query / 2 KV heads, tied and untied, Qwen2 with q/k/v biases.
"""

import json
import os
import shutil
import subprocess
import sys

import fake_devices
import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="parity tests need requirements-dev")
torch = pytest.importorskip("torch", reason="parity tests need requirements-dev")
tokenizers = pytest.importorskip("tokenizers")

from flax import nnx  # noqa: E402
from tiny_llama import L_ORIG, LENGTH, VOCAB, byte_level_tokenizer, hf_model, save  # noqa: E402

from pe_research.model import Transformer  # noqa: E402
from pe_research.pretrained import convert, hf_folder, importer, shards  # noqa: E402
from pe_research.runs import load_model  # noqa: E402

_LONGROPE = dict(
  rope_type="longrope",
  factor=4.0,
  original_max_position_embeddings=L_ORIG,
  short_factor=[1.0 + 0.05 * i for i in range(8)],
  long_factor=[1.0 + 1.5 * i for i in range(8)],
)
ROPE_TYPES = {
  "linear": {"rope_type": "linear", "factor": 2.0},
  "dynamic": {"rope_type": "dynamic", "factor": 2.0},
  "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": L_ORIG},
  "llama3": {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": L_ORIG,
  },
  "longrope": _LONGROPE,
}


def hf_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def our_logits(folder: str, ids) -> np.ndarray:
  """Logits of the model imported in memory (the same conversion the CLI writes to disk)."""
  hf_config, tensors, _ = hf_folder.read_hf_folder(folder)
  config = convert.config_from_hf(hf_config, tokenizer="bytes")
  model = Transformer(config, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, convert.params_from_hf(tensors, config))
  nnx.update(model, params)
  return np.asarray(model(jnp.asarray(ids, jnp.int32)))


def assert_close(ours, reference, rtol=1e-4):
  np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol * np.abs(reference).max())


def ids(length: int = LENGTH) -> np.ndarray:
  return np.random.default_rng(1).integers(0, VOCAB, (2, length))


@pytest.mark.parametrize(
  "kind, tied", [("llama", False), ("llama", True), ("qwen2", False)], ids=str
)
def test_logits_equal_transformers(tmp_path, kind, tied):
  model = hf_model(kind, tied=tied)
  assert_close(our_logits(save(model, tmp_path / "hf"), ids()), hf_logits(model, ids()))


@pytest.mark.parametrize("rope_type", sorted(ROPE_TYPES))
def test_rope_types_equal_transformers_beyond_original_length(tmp_path, rope_type):
  model = hf_model(rope=ROPE_TYPES[rope_type])
  folder = save(model, tmp_path / "hf")
  config = convert.config_from_hf(hf_folder.read_hf_folder(folder)[0], tokenizer="bytes")
  assert json.loads(config.pe.rope_scaling)["rope_type"] == rope_type
  assert config.train.seq_len == L_ORIG < LENGTH
  assert_close(our_logits(folder, ids()), hf_logits(model, ids()))


def test_import_writes_a_run_that_evaluates_and_exports_back(tmp_path):
  model = hf_model("qwen2")
  workdir = tmp_path / "run"
  importer.import_checkpoint(save(model, tmp_path / "hf", max_shard_size="40KB"), str(workdir))
  assert sorted(os.listdir(workdir)) == [
    "checkpoints",
    "config.json",
    "imported.json",
    "tokenizer.json",
  ]
  ours, config, step = load_model(str(workdir))
  assert step == 0 and config.model.qkv_bias and config.model.num_kv_heads == 2
  assert config.data.tokenizer == str(workdir / "tokenizer.json")
  assert_close(np.asarray(ours(jnp.asarray(ids(), jnp.int32))), hf_logits(model, ids()))

  out = tmp_path / "exported"
  importer.export_run(str(workdir), str(out))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert type(reloaded).__name__ == "Qwen2ForCausalLM"
  assert_close(hf_logits(reloaded, ids()), hf_logits(model, ids()), rtol=1e-6)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  assert (
    tokenizer.decode(tokenizer("def f(x):\n  return x")["input_ids"]) == "def f(x):\n  return x"
  )

  # Sharded and bf16, over the first export: the same weights (rounded) in shards + index.
  importer.export_run(str(workdir), str(out), dtype="bfloat16", max_shard_size="40KB")
  assert len(_shard_files(str(out))) >= 3 and not (out / "model.safetensors").exists()
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  halved = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
  expected = {k: v.to(torch.bfloat16).float() for k, v in reloaded.state_dict().items()}
  assert sorted(halved.state_dict()) == sorted(expected)
  for name, w in halved.state_dict().items():
    assert torch.equal(w, expected[name]), name
  assert not torch.equal(halved.lm_head.weight, reloaded.lm_head.weight)  # really rounded


def test_scan_layers_run_reads_the_import_and_exports_the_same_weights(tmp_path):
  """The per-layer tree is the canonical form: a ``model.scan_layers=True`` run loads the
  imported checkpoint stacked and exports it unstacked, every HF weight unchanged."""
  from pe_research.stacking import layers_stacked

  model = hf_model()
  workdir = tmp_path / "run"
  importer.import_checkpoint(save(model, tmp_path / "hf"), str(workdir))
  path = workdir / "config.json"
  saved = json.loads(path.read_text())
  saved["model"]["scan_layers"] = True
  path.write_text(json.dumps(saved))
  ours, config, _ = load_model(str(workdir))
  assert config.model.scan_layers and layers_stacked(nnx.to_pure_dict(nnx.state(ours, nnx.Param)))
  importer.export_run(str(workdir), str(tmp_path / "out"))
  exported = hf_folder.read_hf_folder(str(tmp_path / "out"))[1]
  expected = {name: w.numpy() for name, w in model.state_dict().items()}
  assert sorted(exported) == sorted(expected)
  for name, w in exported.items():
    np.testing.assert_array_equal(w, expected[name], err_msg=name)


@pytest.mark.parametrize("rope_type", ["yarn", "ntk"])
def test_export_carries_the_runs_rope_scaling(tmp_path, rope_type):
  """A run evaluated or fine-tuned with rope_scaling leaves with it: HF's logits beyond L equal
  ours (our static ``ntk`` is exported as HF ``default`` with the enlarged base)."""
  folder = save(hf_model(), tmp_path / "hf")
  hf_config, tensors, _ = hf_folder.read_hf_folder(folder)
  config = convert.config_from_hf(hf_config, tokenizer="bytes")
  config.train.seq_len = L_ORIG
  scaling = {"rope_type": rope_type, "factor": 2.0}
  if rope_type == "yarn":
    scaling["original_max_position_embeddings"] = L_ORIG
  config.pe.rope_scaling = json.dumps(scaling)
  model = Transformer(config, rngs=nnx.Rngs(0))
  params = convert.params_from_hf(tensors, config)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  out = tmp_path / "exported"
  hf_folder.write_hf_folder(
    str(out),
    convert.hf_config_from(config, hf_config),
    convert.hf_tensors_from(params, config),
    None,
  )
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert_close(np.asarray(model(jnp.asarray(ids(), jnp.int32))), hf_logits(reloaded, ids()))


@pytest.mark.parametrize(
  "changes, refused",
  [
    ({}, None),
    ({"self_extend_group": 4}, None),  # The group alone switches nothing on.
    ({"pose_target_len": 256}, None),  # PoSE changes training positions only.
    ({"rope_scaling": json.dumps(ROPE_TYPES["yarn"])}, None),
    ({"self_extend_window": 16, "self_extend_group": 4}, "pe.self_extend_window=16"),
    ({"rerope_window": 16}, "pe.rerope_window=16"),
    ({"logn_len": 32}, "pe.logn_len=32"),
  ],
  ids=lambda x: x if isinstance(x, str) else None,
)
def test_export_refuses_what_hf_llama_cannot_represent(changes, refused):
  """Self-Extend, ReRoPE and log-n change attention beyond HF's RoPE: export must refuse, not
  write a plain-RoPE model that evaluates differently."""
  config = convert.config_from_hf(_config(), tokenizer="bytes")
  config.pe.update(changes)
  if refused is None:
    assert convert.hf_config_from(config)["model_type"] == "llama"
    return
  with pytest.raises(ValueError, match=rf"^{refused} has no HF Llama equivalent") as error:
    convert.hf_config_from(config)
  assert "\n" not in str(error.value)


def _shard_files(folder: str) -> list[str]:
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    return sorted(set(json.load(f)["weight_map"].values()))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_sharded_folder_equals_the_whole_dict_import(tmp_path, dtype):
  """A folder of several shards + index, read a tensor at a time (each of ours placed as a jax
  array when built), gives bit for bit the parameters of every tensor loaded at once."""
  from safetensors.numpy import load_file

  model = hf_model("qwen2").to(getattr(torch, dtype))
  folder = save(model, tmp_path / "hf", max_shard_size="40KB")
  assert len(_shard_files(folder)) >= 3
  hf_config, tensors, _, fmt = importer.read_source(folder)
  assert fmt == "hf" and isinstance(tensors, hf_folder.SafetensorsFolder)
  config = convert.config_from_hf(hf_config, tokenizer="bytes")
  streamed = convert.params_from_hf(tensors, config, importer.placer(config))
  whole = {}
  for file in _shard_files(folder):
    whole |= load_file(os.path.join(folder, file))
  expected = convert.params_from_hf({k: v.astype(np.float32) for k, v in whole.items()}, config)
  assert jax.tree.structure(streamed) == jax.tree.structure(expected)
  for ours, reference in zip(jax.tree.leaves(streamed), jax.tree.leaves(expected), strict=True):
    assert isinstance(ours, jax.Array) and ours.dtype == reference.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(ours), reference)


_SHARDED_IMPORT = """
import json, sys
import jax, numpy as np
import optax
from pe_research import sharding, train
from pe_research.pretrained import convert, hf_folder, importer
folder = sys.argv[1]
hf_config, tensors, _, _ = importer.read_source(folder)
config = convert.config_from_hf(hf_config, tokenizer="bytes")
config.mesh.fsdp = 4
mesh = sharding.make_mesh(config.mesh)
placed = convert.params_from_hf(tensors, config, importer.placer(config, mesh))
expected = convert.params_from_hf(hf_folder.read_hf_folder(folder)[1], config)
_, abstract = train.abstract_train_state(config, mesh, optax.sgd(0.1))
stored = jax.tree.leaves(abstract.params)
split = 0
leaves = jax.tree.leaves(placed), jax.tree.leaves(expected), stored
for ours, reference, like in zip(*leaves, strict=True):
  assert ours.sharding.is_equivalent_to(like.sharding, ours.ndim), (ours.sharding, like.sharding)
  np.testing.assert_array_equal(np.asarray(ours), reference)
  split += ours.addressable_shards[0].data.shape != ours.shape
print(json.dumps({"leaves": len(stored), "split": split}))
"""


def test_streamed_import_places_each_tensor_sharded_on_a_mesh(tmp_path):
  """On 8 fake CPU devices (data 2 x fsdp 4) each tensor lands in the sharding training stores
  it in (``train.abstract_train_state``)."""
  folder = save(hf_model(), tmp_path / "hf", max_shard_size="40KB")
  counts = fake_devices.run_json(_SHARDED_IMPORT, str(folder))
  assert counts["leaves"] == 15 and counts["split"] >= 10, counts


@pytest.mark.parametrize(
  "text, size",
  [
    ("5GB", 5 * 10**9),
    ("500MB", 5 * 10**8),
    ("2GiB", 2 * 2**30),
    ("40kb", 40_000),
    ("1 TB", 10**12),
    (123, 123),
  ]
  + [(bad, None) for bad in ("", "0", "5XB", "-1GB", "1.5GB", "GB")],
)
def test_max_shard_size_parses_hf_units_and_refuses_others(text, size):
  if size is not None:
    assert shards.parse_size(text) == size
    return
  with pytest.raises(ValueError, match=r"^--max_shard_size=.* is invalid; allowed: a size"):
    shards.parse_size(text)


def test_export_refuses_a_bad_dtype_before_reading_the_run(tmp_path):
  with pytest.raises(ValueError, match=r"^--dtype='float16' is invalid; allowed: float32 or bf"):
    importer.export_run(str(tmp_path / "nowhere"), str(tmp_path / "out"), dtype="float16")
  assert not (tmp_path / "out").exists()


def test_shards_close_before_the_limit_and_a_large_tensor_gets_its_own():
  shapes = {"a": (10,), "b": (10,), "c": (100,), "d": (5,), "e": (5,)}
  assert shards.plan(shapes, 4, 80) == [["a", "b"], ["c"], ["d", "e"]]
  assert shards.plan(shapes, 4, 10**6) == [list(shapes)]


def _config(**changes) -> dict:
  hf = transformers.LlamaConfig(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2
  ).to_dict()
  return hf | changes


@pytest.mark.parametrize(
  "changes, field",
  [
    (dict(model_type="gpt2"), "model_type"),
    (dict(num_local_experts=8), "num_local_experts"),
    (dict(model_type="mistral", sliding_window=4096), "sliding_window"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
  ],
  ids=lambda x: x if isinstance(x, str) else None,
)
def test_unrepresentable_configs_name_the_field(changes, field):
  with pytest.raises(ValueError, match=rf"^config.json {field}=") as error:
    convert.config_from_hf(_config(**changes), tokenizer="bytes")
  assert "\n" not in str(error.value) and "allowed" in str(error.value)


def test_missing_tensor_and_wrong_shape_are_named(tmp_path):
  hf_config, tensors, _ = hf_folder.read_hf_folder(save(hf_model(), tmp_path / "hf"))
  config = convert.config_from_hf(hf_config, tokenizer="bytes")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight is missing"):
    convert.params_from_hf(tensors, config)
  config.model.mlp_dim = 128
  with pytest.raises(ValueError, match=r"gate_proj.weight has shape \[96, 64\]"):
    convert.params_from_hf(tensors, config)


def _cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "pe_research.pretrained", *args],
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path):
  folder = save(hf_model(), tmp_path / "hf")
  truncated = tmp_path / "truncated"
  shutil.copytree(folder, truncated)
  weights = truncated / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:5000])
  small_vocab = tmp_path / "small_vocab"
  shutil.copytree(folder, small_vocab)
  (small_vocab / "tokenizer.json").write_text(byte_level_tokenizer(VOCAB + 5))
  cases = {
    str(tmp_path / "nowhere"): "is not a folder or a .gguf file",
    str(truncated): "is not a readable safetensors file",
    str(small_vocab): f"the tokenizer has {VOCAB + 5} tokens but config vocab_size={VOCAB}",
  }
  for source, message in cases.items():
    workdir = tmp_path / "run"
    result = _cli("import", f"--source={source}", f"--workdir={workdir}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not workdir.exists() and not any(p.name.startswith("run.") for p in tmp_path.iterdir())
  result = _cli("export", f"--workdir={tmp_path / 'nowhere'}", f"--out={tmp_path / 'out'}")
  assert result.returncode == 2 and "has no config.json" in result.stderr


def test_import_refuses_a_non_empty_workdir(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "keep.txt").write_text("x")
  with pytest.raises(ValueError, match="exists and is not empty"):
    importer.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"))
  assert os.listdir(tmp_path / "run") == ["keep.txt"]


def _point_at_local_text(workdir, tmp_path) -> None:
  """Switches the imported run's data to a small local_text corpus (our own sources)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for split, source in (("train", "model.py"), ("validation", "attention.py")):
    os.makedirs(tmp_path / "text" / split)
    shutil.copy(os.path.join(repo, "pe_research", source), tmp_path / "text" / split / "a.txt")
  path = workdir / "config.json"
  config = json.loads(path.read_text())
  config["data"] |= {
    "name": "local_text",
    "local_dir": str(tmp_path / "text"),
    "data_dir": str(tmp_path / "tfds"),
  }
  path.write_text(json.dumps(config))


def test_imported_run_evaluates_and_fine_tunes_unchanged(tmp_path):
  """evaluate (both modes, rope_scaling, passkey) and init_from work on an imported workdir."""
  from configs import finetune
  from pe_research import config_lib, eval_report, evaluate, train

  workdir = tmp_path / "run"
  importer.import_checkpoint(save(hf_model(), tmp_path / "hf"), str(workdir))
  _point_at_local_text(workdir, tmp_path)
  common = dict(lengths=[32, 256], max_tokens=512)
  plain = evaluate.evaluate(str(workdir), **common)
  sliding = evaluate.evaluate(str(workdir), mode="sliding", stride=16, **common)
  yarn = json.dumps({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64})
  scaled = evaluate.evaluate(str(workdir), rope_scaling=yarn, passkey_trials=1, **common)
  for result in (plain, sliding, scaled):
    assert [r["tokens"] for r in result.rows] == [512, 512]
    assert all(0 < r["bits_per_byte"] < 20 and r["bytes"] > 0 for r in result.rows)
  assert plain.rows[0]["loss"] != sliding.rows[0]["loss"]
  eval_report.write_results(scaled, str(workdir / "eval"))
  assert os.path.isfile(workdir / "eval" / f"{scaled.name}_passkey.csv")

  imported = load_model(str(workdir))[0]
  config = finetune.get_config(f"init_from={workdir},seq_len=32,steps=2,lr=1e-9,batch_size=2")
  config_lib.validate(config, device_count=1)
  assert config.model.num_kv_heads == 2 and config.pe.train_len == 32
  state = train.train(config, str(tmp_path / "finetuned"))
  before = nnx.to_pure_dict(nnx.state(imported, nnx.Param))
  np.testing.assert_allclose(
    np.asarray(state.params["blocks"][1]["attn"]["qkv"]["kernel"]),
    np.asarray(before["blocks"][1]["attn"]["qkv"]["kernel"]),
    atol=1e-6,
  )
  with pytest.raises(ValueError, match="holds an imported model"):
    train.train(config, str(workdir))
