"""`make bench` runs end to end (smoke shapes, no timing assertions), and its verdicts call a
side only when the range does. The PyTorch reference's parity: tests/test_torch_reference.py."""

import json

import numpy as np
import pytest

import pe_research.encodings  # noqa: F401  (registers every family)
from benchmarks import (
  bench_lib,
  bench_report,
  bench_variants,
  benchmark,
  gpu_benchmark,
  kernel_check,
  pretrained_prefill,
)
from pe_research import runtime


def test_smoke_benchmark_writes_every_required_training_key(tmp_path, no_compilation_cache):
  benchmark.main(["--smoke", "--sections=train", "--out", str(tmp_path)])
  results = json.loads((tmp_path / "results.json").read_text())
  (size,) = benchmark.SIZES["smoke"]
  for pe in ("nope", "rope"):
    for k in ("1_step_per_call", "k_steps_per_call"):
      ratio = results["train_ratio_vs_torch"][size][pe][k]
      assert 0 < ratio["lo"] <= ratio["median"] <= ratio["hi"]
      assert ratio["verdict"] in ("faster", "slower", "within noise")
  for key in ("bf16_speedup", "blockwise_speedup_vs_dense", "train_ratio_vs_torch_cpu"):
    assert results[key][size]["median"] > 0
  for denominator in ("vs_matmul", "vs_cpu_peak"):
    assert results["mfu"][size][denominator]["median"] > 0
  assert len(results["matmul_gflops_per_round"][size]) == benchmark.SIZES["smoke"][size][4]
  assert results["steps_per_call"][size] == benchmark.SIZES["smoke"][size][5] > 1
  assert results["attention_block"][size] == benchmark.SIZES["smoke"][size][6]
  assert set(results["steps_per_call_speedup"][size]) == {"nope", "rope"}
  assert set(results["pe_overhead_vs_nope"][size]) == {"rope"}
  machine = results["machine_info"]
  assert machine["cores"] > 0 and machine["torch_threads"] == machine["cores"]
  assert machine["torch_optimizer"] in ("fused", "foreach") and machine["jax"] and machine["torch"]
  assert (
    results["cpu_peak"]["gflops"] > 0 and "FLOP/cycle/core" in results["cpu_peak"]["peak_source"]
  )
  rows = results["train"][size]
  assert set(rows) == {
    "jax/nope",
    "jax/rope",
    "jax/rope/bf16",
    "jax/rope/dense",
    "jax/nope/1_step_per_call",
    "jax/rope/1_step_per_call",
    "torch/nope",
    "torch/rope",
  }  # torch.compile rows are in the quick and full runs only (benchmark.COMPILED).
  assert all(row["peak_rss_gib"] > 0 for row in rows.values())  # Each variant's own process.
  assert len({row["peak_rss_gib"] for row in rows.values()}) > 1
  assert "eval_peak_rss_gib" not in results  # --sections=train
  report = (tmp_path / "results.md").read_text()
  assert "## Targets" in report and machine["cpu"] in report


@pytest.mark.parametrize(
  "per_round,expected",
  [
    ([1.2, 1.5, 1.1], "faster"),
    ([0.7, 0.9, 0.95], "slower"),
    ([0.9, 1.2, 1.05], "within noise"),
  ],
)
def test_ratio_verdict_calls_a_side_only_when_every_round_is_on_it(per_round, expected):
  ratio = bench_report.ratio_stats(per_round, [1.0] * 3)
  assert ratio["verdict"] == expected
  assert ratio["lo"] == min(per_round) and ratio["hi"] == max(per_round)
  assert ratio["median"] == sorted(per_round)[1]


@pytest.mark.parametrize(
  "lo,hi,target,expected",
  [
    (1.1, 1.3, ">= 1.0", "PASS"),
    (0.5, 0.8, ">= 1.0", "FAIL"),
    (0.9, 1.1, ">= 1.0", "within noise"),
    (0.01, 0.03, "<= 0.05", "PASS"),
    (0.06, 0.2, "<= 0.05", "FAIL"),
    (0.02, 0.08, "<= 0.05", "within noise"),
  ],
)
def test_target_verdict_uses_the_range_not_the_median(lo, hi, target, expected):
  value = {"median": (lo + hi) / 2, "lo": lo, "hi": hi}
  assert bench_report.target_verdict(value, target) == expected


def test_encoding_overhead_is_slower_when_every_round_is_slower():
  overhead = bench_report.ratio_stats([1.2, 1.3], [1.0, 1.0], 1.0, "slower", "faster")
  assert overhead["verdict"] == "slower" and overhead["median"] == pytest.approx(0.25)
  assert bench_report.target_verdict(overhead, "<= 0.05") == "FAIL"


def test_report_warns_about_bf16_only_without_bf16_instructions():
  info = {"cpu": "X", "vendor": "V", "family_model": "6/1", "cores": 2, "mhz": 2000.0}
  info |= {"mhz_source": "test", "jax": "0", "isa": ["avx2"]}
  results = {"machine": "", "machine_info": info, "matmul_peak_gflops": {}}
  results["cpu_peak"] = bench_lib.cpu_peak_gflops(info)
  assert results["cpu_peak"]["gflops"] == 2 * 2.0 * 32
  assert any("bf16 is expected to be slower" in line for line in bench_report.report_lines(results))
  info["isa"] = ["avx2", "avx512f", "avx512_bf16"]
  assert not any("bf16 is expected" in line for line in bench_report.report_lines(results))


def test_smoke_evaluation_section_alone(tmp_path, no_compilation_cache):
  benchmark.main(["--smoke", "--sections=eval", "--out", str(tmp_path)])
  results = json.loads((tmp_path / "results.json").read_text())
  assert "train" not in results and "mfu" not in results  # --sections=eval
  for attention in ("dense", "blockwise"):
    assert results["eval_peak_rss_gib"][attention]["256"] > 0
  assert results["compiles_per_eval_length"] <= 1  # each length compiles once, rescoring never
  assert "## Evaluation" in (tmp_path / "results.md").read_text()


def test_smoke_attention_section_matches_torch(tmp_path):
  benchmark.main(["--smoke", "--sections=attention", "--out", str(tmp_path)])
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results) >= {"attention", "machine_info"} and "train" not in results
  row = results["attention"]["256"]
  assert set(row["gflops"]) == {"jax/block64", "jax/block128", "torch/sdpa"}
  assert set(row["ratio_vs_torch"]) == {"jax/block64", "jax/block128"}
  assert row["output_max_diff"] < 1e-5  # the same output element in every process
  assert row["gflops"]["torch/sdpa"]["median"] > 0 and row["torch"]["torch_threads"] > 0
  assert "## Forward attention" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
  "flag,message",
  [("--sections=train,speed", "--sections: unknown speed"), ("--sizes=huge", "--sizes: unknown")],
)
def test_unknown_section_or_size_is_one_line(tmp_path, capsys, flag, message):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.main(["--smoke", flag, "--out", str(tmp_path)])
  assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_time_rounds_rotates_which_variant_goes_first():
  """Round r starts at variant r, every variant steps once per round, then the probe runs;
  results keep their variant."""
  order = []

  def step(name):
    def run():
      order.append(name)
      return 0.1, 0.2, float(len(order))

    return run

  probe = lambda: order.append("|") or len(order)
  times, probes = bench_variants.time_rounds({n: step(n) for n in "abc"}, rounds=4, probe=probe)
  assert "".join(order) == "abc|" + "bca|" + "cab|" + "abc|" and probes == [4, 8, 12, 16]
  assert times["b"]["loss"] == [2.0, 5.0, 11.0, 14.0] and times["a"]["wall"] == [0.1] * 4


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


def _prefill_row(system, length, calls, rss, nll=1.0):
  return {
    "system": system,
    "length": length,
    "calls": calls,
    "compile_seconds": 0.0,
    "peak_rss_gib": rss,
    "nll": nll,
  }


def test_prefill_comparison_uses_warm_calls_and_calls_each_target():
  rows = [
    # 2k: the first call is slow (temporaries); warm calls 1 s vs HF's 2 s -> 2x, memory 0.4x.
    _prefill_row("pe_research", 2048, [9.0, 1.2, 1.0, 0.9], rss=1.0),
    _prefill_row("transformers", 2048, [2.5, 2.0, 2.0, 2.1], rss=2.5),
    # 32k, one call each: 0.84x the speed (FAIL), 0.15x the memory (PASS).
    _prefill_row("pe_research", 32768, [424.2], rss=2.11, nll=5.0949),
    _prefill_row("transformers", 32768, [354.5], rss=13.93, nll=5.0948),
    _prefill_row("pe_research", 8192, [40.0], rss=1.9),  # no HF row: not compared
  ]
  assert pretrained_prefill.call_seconds(rows[0]) == 1.0
  assert pretrained_prefill.call_seconds(rows[2]) == 424.2
  short, long = pretrained_prefill.comparisons(rows)
  assert (short["length"], long["length"]) == (2048, 32768)
  assert short["speed"] == pytest.approx(2.0) and short["speed_pass"]
  assert short["memory"] == pytest.approx(0.4) and short["memory_pass"]
  assert long["speed"] == pytest.approx(354.5 / 424.2) and not long["speed_pass"]
  assert long["memory_pass"] and long["nll_diff"] == pytest.approx(1e-4)
  results = {"workdir": "w", "machine": runtime.machine(), "rows": rows}
  report = "\n".join(pretrained_prefill.report_lines(results))
  assert "| 32768 | 1 | 0.84 | FAIL | 0.15 | PASS |" in report
  assert "| 2048 | 1 | 2.00 | PASS | 0.40 | PASS |" in report


def test_prefill_rounds_pair_rows_by_round_and_judge_the_median():
  """Three rounds: per-round speed ratios 1.0, 1.6, 1.2 -> median 1.2 [1.0, 1.6], which fails
  the 1.5x target although one round passes; a round without its transformers row is dropped."""
  ours, hf = (1.0, 1.0, 1.0, 0.5), (1.0, 1.6, 1.2, 9.0)
  rows = [
    _prefill_row(system, 2048, [5.0, s], rss=r) | {"round": i}
    for i, (a, b) in enumerate(zip(ours, hf, strict=True))
    for system, s, r in (("pe_research", a, 1.0), ("transformers", b, 2.0 + i))
    if not (i == 3 and system == "transformers")
  ]
  (c,) = pretrained_prefill.comparisons(rows)
  assert c["rounds"] == 3 and c["speed"] == pytest.approx(1.2) and not c["speed_pass"]
  assert c["speed_range"] == pytest.approx((1.0, 1.6))
  assert c["memory"] == pytest.approx(1 / 3) and c["memory_range"] == pytest.approx((0.25, 0.5))
  results = {"workdir": "w", "machine": runtime.machine(), "rows": rows}
  report = "\n".join(pretrained_prefill.report_lines(results))
  assert "| 2048 | 3 | 1.20 [1.00, 1.60] | FAIL | 0.33 [0.25, 0.50] | PASS |" in report


def test_kernel_check_passes_the_kernel_and_fails_a_wrong_one(monkeypatch):
  """The Triton form (interpreted here) is within tolerance of dense for ALiBi at a small
  shape; a kernel whose output is off by 1% fails, and one that raises is recorded with its
  one-line error while the next case still runs."""
  small = dict(length=40, heads=4, kv_heads=2, head_dim=16, block=16)
  assert kernel_check.check(kernel_check.CASES["alibi"], **small) < 1e-5
  real = kernel_check.pallas_attention
  monkeypatch.setattr(kernel_check, "pallas_attention", lambda *a, **k: real(*a, **k) * 1.01)
  assert kernel_check.check(kernel_check.CASES["rope"], **small) > kernel_check.TOLERANCE

  def check(fields, **_):
    if fields["name"] == "t5":
      raise RuntimeError("Triton compilation failed\ntraceback")
    return 0.5

  monkeypatch.setattr(kernel_check, "check", check)
  rows = kernel_check.run(["t5", "kerple"])
  assert rows["t5"]["error"] == "RuntimeError: Triton compilation failed"
  assert rows["kerple"]["max_rel_err"] == 0.5 and rows["kerple"]["ok"] is False
  lines = gpu_benchmark.report_lines(
    {
      "device": "d",
      "jax": "j",
      "size": "s",
      "params": 1e6,
      "tokens_per_step": 1,
      "peak_tflops": {"datasheet": None, "matmul": 1.0},
      "train": {},
      "kernel_check": rows,
    }
  )
  assert any("Triton compilation failed" in line for line in lines)
