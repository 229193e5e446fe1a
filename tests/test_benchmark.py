"""`make bench` runs end to end (smoke shapes, no timing assertions); the PyTorch reference is
the same model as the JAX one."""

import json

import numpy as np
import pytest
import torch
from flax import nnx

import pe_research.encodings  # noqa: F401  (registers every family)
from experiments import benchmark
from experiments.torch_reference import TorchTransformer
from pe_research.model import Transformer


@pytest.mark.parametrize("pe", ["nope", "rope", "alibi", "t5"])
def test_torch_reference_computes_the_jax_models_logits(pe):
  config = benchmark.model_config(64, 2, 32, 2, pe)
  model = Transformer(config, rngs=nnx.Rngs(0))
  reference = TorchTransformer(vocab_size=260, model_dim=64, num_layers=2, num_heads=1, pe=pe)
  reference.load_jax_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  inputs_BxL = np.random.default_rng(0).integers(0, 260, (2, 40)).astype(np.int32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(inputs_BxL).long()).numpy()
  np.testing.assert_allclose(np.asarray(model(inputs_BxL)), expected, atol=2e-5, rtol=1e-5)


def test_smoke_benchmark_writes_every_required_key(tmp_path):
  benchmark.main(["--smoke", "--out", str(tmp_path)])
  results = json.loads((tmp_path / "results.json").read_text())
  (size,) = benchmark.SIZES["smoke"]
  for key in ("train_ratio_vs_torch", "mfu", "bf16_speedup", "blockwise_speedup_vs_dense"):
    assert results[key][size] > 0
  assert set(results["pe_overhead_vs_nope"]) == {"rope"}
  assert set(results["train"][size]) == {
    "jax/nope",
    "jax/rope",
    "jax/rope/bf16",
    "jax/rope/dense",
    "torch/nope",
    "torch/rope",
  }
  for attention in ("dense", "blockwise"):
    assert results["eval_peak_rss_gib"][attention]["256"] > 0
  assert results["compiles_per_eval_length"] <= 1  # each length compiles once, rescoring never
  assert "## Targets" in (tmp_path / "results.md").read_text()


def test_sections_select_what_runs(tmp_path):
  benchmark.main(["--smoke", "--sections=eval", "--out", str(tmp_path)])
  results = json.loads((tmp_path / "results.json").read_text())
  assert "train" not in results and "mfu" not in results
  assert results["eval_peak_rss_gib"]["blockwise"]["256"] > 0
  assert "## Evaluation" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
  "flag,message",
  [("--sections=train,speed", "--sections: unknown speed"), ("--sizes=huge", "--sizes: unknown")],
)
def test_unknown_section_or_size_is_one_line(tmp_path, capsys, flag, message):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.main(["--smoke", flag, "--out", str(tmp_path)])
  assert exit_info.value.code == 2 and message in capsys.readouterr().err
