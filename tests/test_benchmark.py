"""`make bench` runs end to end (smoke shapes, no timing assertions); the PyTorch reference is
the same model as the JAX one."""

import json

import numpy as np
import pytest
import torch
from flax import nnx

import pe_research.encodings  # noqa: F401  (registers every family)
from benchmarks import bench_lib, bench_variants, benchmark, gpu_benchmark
from benchmarks.torch_reference import TorchTransformer
from pe_research.model import Transformer


@pytest.mark.parametrize("pe", ["nope", "rope", "alibi", "t5"])
def test_torch_reference_computes_the_jax_models_logits(pe):
  config = bench_lib.model_config(64, 2, 32, 2, pe)
  model = Transformer(config, rngs=nnx.Rngs(0))
  reference = TorchTransformer(vocab_size=260, model_dim=64, num_layers=2, num_heads=1, pe=pe)
  reference.load_jax_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  inputs_BxL = np.random.default_rng(0).integers(0, 260, (2, 40)).astype(np.int32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(inputs_BxL).long()).numpy()
  np.testing.assert_allclose(np.asarray(model(inputs_BxL)), expected, atol=2e-5, rtol=1e-5)


def test_smoke_benchmark_writes_every_required_key(tmp_path, no_compilation_cache):
  benchmark.main(["--smoke", "--out", str(tmp_path)])
  results = json.loads((tmp_path / "results.json").read_text())
  (size,) = benchmark.SIZES["smoke"]
  for key in ("train_ratio_vs_torch", "mfu", "bf16_speedup", "blockwise_speedup_vs_dense"):
    assert results[key][size] > 0
  assert results["steps_per_call"][size] == benchmark.SIZES["smoke"][size][5] > 1
  assert results["attention_block"][size] == benchmark.SIZES["smoke"][size][6]
  assert results["steps_per_call_speedup"][size] > 0
  assert set(results["pe_overhead_vs_nope"]) == {"rope"}
  rows = results["train"][size]
  assert set(rows) == {
    "jax/nope",
    "jax/rope",
    "jax/rope/bf16",
    "jax/rope/dense",
    "jax/rope/1_step_per_call",
    "torch/nope",
    "torch/rope",
  }
  assert all(row["peak_rss_gib"] > 0 for row in rows.values())  # Each variant's own process.
  assert len({row["peak_rss_gib"] for row in rows.values()}) > 1
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


def test_time_rounds_rotates_which_variant_goes_first():
  """Round r starts at variant r, every variant steps once per round, results keep their
  variant."""
  order = []

  def step(name):
    def run():
      order.append(name)
      return 0.1, 0.2, float(len(order))

    return run

  times = bench_variants.time_rounds({n: step(n) for n in "abc"}, rounds=4)
  assert "".join(order) == "abc" + "bca" + "cab" + "abc"
  assert times["b"]["loss"] == [2.0, 4.0, 9.0, 11.0] and times["a"]["wall"] == [0.1] * 4


def test_gpu_benchmark_smoke_runs_on_cpu_and_records_a_failing_variant(tmp_path, monkeypatch):
  """Every variant gets a row; one that raises (a kernel the backend lacks) is recorded with
  its one-line error and the next still runs."""
  real_time_variant = gpu_benchmark.time_variant

  def time_variant(config, steps, reps):
    if config.pe.name == "alibi":
      raise RuntimeError("cuDNN does not support this bias\nlong traceback")
    return real_time_variant(config, steps, reps)

  monkeypatch.setattr(gpu_benchmark, "time_variant", time_variant)
  variants = "rope/bfloat16/xla,alibi/bfloat16/xla,t5/float32/blockwise"
  args = ["--smoke", f"--variants={variants}", "--steps=2", "--reps=1", f"--out={tmp_path}"]
  gpu_benchmark.main(args)
  results = json.loads((tmp_path / "results.json").read_text())
  rows = results["train"]
  assert rows["alibi/bfloat16/xla"] == {"error": "RuntimeError: cuDNN does not support this bias"}
  for variant in ("rope/bfloat16/xla", "t5/float32/blockwise"):
    assert rows[variant]["tokens_per_s"] > 0 and rows[variant]["mfu_vs_matmul"] > 0
    assert rows[variant]["mfu_vs_datasheet"] is None  # no datasheet peak for a CPU
    assert np.isfinite(rows[variant]["loss"]).all()
    assert rows[variant]["tflops_palm"] > rows[variant]["tflops"]  # counts the masked half
  assert results["params"] > 0
  assert "cuDNN does not support this bias" in (tmp_path / "results.md").read_text()


def test_gpu_benchmark_budget_skips_later_variants(tmp_path):
  args = ["--smoke", "--variants=nope/float32/dense,rope/float32/dense", "--budget_s=0"]
  gpu_benchmark.main([*args, "--steps=1", "--reps=1", f"--out={tmp_path}"])
  rows = json.loads((tmp_path / "results.json").read_text())["train"]
  assert "tokens_per_s" in rows["nope/float32/dense"]  # the first always runs
  assert rows["rope/float32/dense"]["error"].startswith("skipped")


def test_gpu_benchmark_peaks_and_one_line_errors(tmp_path, capsys):
  assert gpu_benchmark.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert gpu_benchmark.datasheet_peak_tflops("NVIDIA H200") == 989.4
  assert gpu_benchmark.datasheet_peak_tflops("NVIDIA H100 PCIe") is None
  for argv, message in [
    (["--smoke", "--variants=rope/fp16/xla"], "--variants: 'rope/fp16/xla' is not"),
    (["--smoke", "--variants=ropex/bfloat16/xla"], "encoding in alibi"),
    ([], "the 125m size needs a GPU"),
  ]:
    with pytest.raises(SystemExit) as exit_info:
      gpu_benchmark.main([*argv, f"--out={tmp_path}"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_variant_that_fails_to_build_is_named_in_one_line():
  config = bench_lib.model_config(64, 2, 32, 2, "no_such_encoding")
  with pytest.raises(RuntimeError, match="variant jax/bad failed to build: .*no_such_encoding"):
    bench_variants.VariantProcess("jax/bad", "jax", config)
