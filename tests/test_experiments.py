"""Experiment scripts: each smoke preset writes its CSV, PNG and REPORT.md; reruns reuse runs.

The LM smoke runs train configs/tiny.py for 30 steps on a small local_text corpus; the ALiBi
figure and the RoPE-extension experiment share one runs folder (the RoPE base run is reused).
"""

import csv
import json
import os
import shlex

import numpy as np
import pytest

from experiments import (
  alibi_train_short_test_long,
  context_extension,
  length_generalization,
  lm_presets,
  rope_decay,
)
from pe_research import config_lib
from pe_research.data.pipeline import eval_windows
from pe_research.launch import grid, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _assert_outputs(out, *pngs):
  for name in pngs:
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == PNG, name
  with open(os.path.join(out, "REPORT.md")) as f:
    text = f.read()
  assert "Does the published shape appear?" in text or "## Checks" in text
  return text


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  """(runs folder, --set flags) for LM smoke runs on a corpus of this repo's sources."""
  tmp = tmp_path_factory.mktemp("experiments")
  for split, sources in (("train", ("model.py", "train.py")), ("validation", ("attention.py",))):
    os.makedirs(tmp / "text" / split)
    for source in sources:
      with (
        open(os.path.join(REPO, "pe_research", source)) as f,
        open(tmp / "text" / split / source, "w") as g,
      ):
        g.write(f.read())
  sets = ["data.name=local_text", f"data.local_dir={tmp / 'text'}", f"data.data_dir={tmp / 'tfds'}"]
  return str(tmp / "runs"), [arg for item in sets for arg in ("--set", item)]


@pytest.fixture(scope="module")
def alibi_out(lm, tmp_path_factory):
  runs, sets = lm
  out = str(tmp_path_factory.mktemp("alibi"))
  alibi_train_short_test_long.main(["--preset=smoke", f"--out={out}", f"--runs={runs}", *sets])
  return out


def test_alibi_smoke_writes_csv_png_report(alibi_out):
  rows = _rows(os.path.join(alibi_out, "results.csv"))
  preset = alibi_train_short_test_long.PRESETS["smoke"]
  nonoverlapping = [r for r in rows if r["mode"] == "nonoverlapping"]
  assert len(nonoverlapping) == len(preset.encodings) * len(preset.lengths)
  assert {int(r["length"]) for r in rows} >= {32, 512}  # Evaluated to 16x the training length.
  assert {r["encoding"] for r in rows if r["mode"] == "sliding"} == set(preset.encodings)
  assert all(np.isfinite(float(r["ppl"])) for r in rows)
  text = _assert_outputs(alibi_out, "ppl_vs_length.png", "sliding.png")
  assert "Sinusoidal explodes right past L" in text and "ALiBi stays flat" in text


def _scored_targets(budget: int, length: int, mode: str, stride) -> np.ndarray:
  """How often each target s[1..budget] is scored at ``length`` (pipeline.eval_windows)."""
  starts_W, score_from_W = eval_windows(budget, length, mode, stride)
  count_N = np.zeros(budget + 2, np.int64)
  np.add.at(count_N, starts_W + score_from_W + 1, 1)  # Window k scores a_k + i + 1 for
  np.add.at(count_N, np.minimum(starts_W + length, budget) + 1, -1)  # c_k <= i, a_k + i < N.
  return np.cumsum(count_N)[1 : budget + 1]


@pytest.mark.parametrize("name", ["smoke", "cpu", "paper"])
def test_alibi_sliding_and_nonoverlapping_score_the_same_target_bytes(name):
  preset = alibi_train_short_test_long.PRESETS[name]
  (_, nonoverlapping), (_, sliding) = alibi_train_short_test_long.requests(preset).items()
  assert sliding["mode"] == "sliding" and nonoverlapping.get("mode") is None
  assert sliding["max_tokens"] == nonoverlapping["max_tokens"] == preset.max_tokens
  for request, mode in ((nonoverlapping, "nonoverlapping"), (sliding, "sliding")):
    for length in request["lengths"]:
      once_N = _scored_targets(request["max_tokens"], length, mode, request.get("stride"))
      assert (once_N == 1).all(), (mode, length)  # Every target s[1..N] exactly once.


def _ppl_rows(*ppls):
  return [{"length": 32 * 2**i, "ppl": p} for i, p in enumerate(ppls)]


@pytest.mark.parametrize(
  "nonoverlapping,sliding,verdict",
  [
    ((10.0, 30.0), (10.0, 40.0), "matches the paper"),
    ((10.0, 12.0), (10.0, 11.0), "does NOT explode in either protocol"),
    ((10.0, 13.3), (10.0, 40.0), "the protocols disagree: no verdict"),
    ((10.0, 30.0), (10.0, 11.0), "the protocols disagree: no verdict"),
  ],
)
def test_sinusoidal_verdict_needs_both_protocols_to_agree(nonoverlapping, sliding, verdict):
  line = alibi_train_short_test_long.sinusoidal_line(
    {"sinusoidal": _ppl_rows(*nonoverlapping)}, {"sinusoidal": _ppl_rows(*sliding)}
  )
  assert verdict in line
  ratios = (nonoverlapping[1] / nonoverlapping[0], sliding[1] / sliding[0])
  assert f"non-overlapping ppl(64)/ppl(L) = {ratios[0]:.2f}" in line
  assert f"sliding ppl(64)/ppl(L) = {ratios[1]:.2f}" in line
  only_one = alibi_train_short_test_long.sinusoidal_line(
    {"sinusoidal": _ppl_rows(*nonoverlapping)}, {}
  )
  assert "no verdict" in only_one and "does NOT explode" not in only_one


def test_rerun_reuses_finished_runs_and_cached_evaluations(lm, alibi_out):
  runs, sets = lm
  stamps = {}
  for pe in ("sinusoidal", "rope", "alibi"):
    for rel in ("metrics.jsonl", "eval/fig1.json"):
      stamps[pe, rel] = os.path.getmtime(os.path.join(runs, pe, rel))
  alibi_train_short_test_long.main(
    ["--preset=smoke", f"--out={alibi_out}", f"--runs={runs}", *sets]
  )
  for (pe, rel), mtime in stamps.items():
    assert os.path.getmtime(os.path.join(runs, pe, rel)) == mtime, (pe, rel)


def test_context_extension_smoke_reuses_base_and_writes_outputs(lm, alibi_out, tmp_path):
  runs, sets = lm
  base_metrics = os.path.getmtime(os.path.join(runs, "rope", "metrics.jsonl"))
  context_extension.main(["--preset=smoke", f"--out={tmp_path}", f"--runs={runs}", *sets])
  assert os.path.getmtime(os.path.join(runs, "rope", "metrics.jsonl")) == base_metrics
  preset = context_extension.PRESETS["smoke"]
  rows = _rows(tmp_path / "results.csv")
  models = {r["model"] for r in rows}
  assert len(models) == len(preset.methods) + len(preset.ft_methods) + 2
  assert "fine-tuned: fine-tune only" in models
  ppl = {(r["model"], int(r["length"])): float(r["ppl"]) for r in rows}
  # Dynamic NTK reverts to the original frequencies at seq_len <= L: identical to no scaling.
  np.testing.assert_allclose(
    ppl["zero-shot: dynamic NTK", 32], ppl["zero-shot: none", 32], rtol=1e-5
  )
  with open(os.path.join(runs, "rope_ft2x_yarn", "config.json")) as f:
    ft = json.load(f)
  assert ft["init_from"] == os.path.join(runs, "rope") and ft["train"]["seq_len"] == 64
  assert json.loads(ft["pe"]["rope_scaling"])["original_max_position_embeddings"] == 32
  assert {int(r["length"]) for r in _rows(tmp_path / "passkey.csv")} == {256}
  text = _assert_outputs(tmp_path, "zero_shot.png", "fine_tuned.png")
  assert "YaRN" in text and "PI at s·L" in text
  # Trained at 32 and 64 bytes: no prompt fits inside L, so the passkey grid is not evidence.
  assert "- Passkey, zero-shot: none: no positive control" in text


def test_context_extension_report_says_when_the_passkey_positive_control_fails():
  grid = [{"length": 512, "depth": 0.5, "accuracy": 0.0, "control": False}]
  control = lambda accuracy: [{"length": 128, "depth": 0.5, "accuracy": accuracy, "control": True}]
  summaries = {
    "zero-shot: none": {"train_len": 128, "passkey": grid + control(0.0)},
    "zero-shot: PI": {"train_len": 128, "passkey": grid + control(1.0)},
    "fine-tuned: PI": {"train_len": 32, "passkey": grid},
  }
  failed, passed, missing = context_extension.passkey_controls(summaries)
  assert "zero-shot: none" in failed and "FAILED" in failed and "not evidence" in failed
  assert "the grid is evidence" in passed
  assert "no positive control" in missing and "not evidence" in missing
  rows, lengths = context_extension.passkey_table(summaries)
  assert lengths == [512] and len(rows) == 3  # The control rows are not grid cells.


def test_longrope_factors_ramp_from_one_to_factor():
  factors = context_extension.longrope_factors(4.0, 128, 32, 10000.0)
  assert len(factors) == 16 and factors[0] == 1.0 and factors[-1] == 4.0
  assert (np.diff(factors) >= 0).all()


def test_rope_decay_learned_alibi_equals_analytic(lm, alibi_out, tmp_path):
  runs, _ = lm
  rope_decay.main(["--preset=smoke", f"--out={tmp_path}", f"--checkpoints={runs}/alibi"])
  learned, analytic = (
    _rows(tmp_path / "learned_bias_vs_distance.csv"),
    _rows(tmp_path / "bias_vs_distance.csv"),
  )
  assert len(learned) == 129  # smoke: r = 0..128.
  # ALiBi has no parameters: the trained run's bias is -m_h r (tiny has 2 heads: m = 1/16, 1/256).
  column = next(c for c in learned[0] if c.startswith("alibi@") and c.endswith("_h1"))
  np.testing.assert_allclose([float(r[column]) for r in learned], -np.arange(129) / 16, rtol=1e-5)
  assert float(analytic[128]["alibi_h1"]) == -128 * 0.25  # Analytic panel: 4 heads, m_1 = 1/4.
  assert "Learned biases" in _assert_outputs(tmp_path, "rope_decay.png", "learned_bias.png")
  with pytest.raises(ValueError, match="adds no attention bias"):
    rope_decay.main(["--preset=smoke", f"--out={tmp_path}", f"--checkpoints={runs}/rope"])


def test_length_generalization_smoke(tmp_path):
  out, runs = tmp_path / "out", tmp_path / "runs"
  length_generalization.main(["--preset=smoke", f"--out={out}", f"--runs={runs}"])
  preset = length_generalization.PRESETS["smoke"]
  rows = _rows(out / "results.csv")
  assert len(rows) == len(preset.tasks) * len(preset.methods) * len(preset.seeds) * len(
    preset.lengths
  )
  assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
  assert {r["method"] for r in _rows(out / "mrr.csv")} == set(preset.methods)
  text = _assert_outputs(out, "accuracy_passkey.png")
  assert "Mean reciprocal rank" in text and "RoPE randomized vs RoPE" in text


def test_mean_ranks_share_ties_and_mrr():
  assert length_generalization.mean_ranks({"a": 0.9, "b": 0.5, "c": 0.5}) == {
    "a": 1.0,
    "b": 2.5,
    "c": 2.5,
  }
  preset = length_generalization.Preset(("t",), ("a", "b"), (0, 1), (4, 8))
  ood = {("t", "a", 0): 1.0, ("t", "b", 0): 0.0, ("t", "a", 1): 0.0, ("t", "b", 1): 1.0}
  assert length_generalization.mrr(ood, preset, ("a", "b")) == {"a": 0.75, "b": 0.75}


def _mrr_findings(ood_by_method: dict[str, float]) -> str:
  """The MRR ranking line of length_generalization.findings for one (task, seed) of scores."""
  methods = tuple(ood_by_method)
  preset = length_generalization.Preset(("t",), methods, (0,), (4, 8))
  ood = {("t", m, 0): a for m, a in ood_by_method.items()}
  lines = length_generalization.findings(ood, ood, preset)
  return next(line for line in lines if line.startswith("- MRR ranking"))


def test_mrr_all_tied_share_one_rank_and_are_written_as_ties():
  five = ("NoPE", "T5", "ALiBi", "RoPE", "absolute")
  preset = length_generalization.Preset(("t",), five, (0,), (4, 8))
  ood = {("t", m, 0): 0.5 for m in five}
  assert length_generalization.mrr(ood, preset, five) == dict.fromkeys(five, 1 / 3)  # Rank 3.
  line = _mrr_findings(dict.fromkeys(five, 0.5))
  assert "NoPE = T5 = ALiBi = RoPE = absolute;" in line
  assert "same order" not in line and "NoPE is tied for first" in line
  assert "absolute is tied for last" in line


def test_mrr_two_tied_are_written_as_a_tie_not_in_the_papers_order():
  line = _mrr_findings({"NoPE": 0.9, "T5": 0.5, "ALiBi": 0.5, "RoPE": 0.3, "absolute": 0.1})
  assert "NoPE > T5 = ALiBi > RoPE > absolute;" in line
  assert "same order" not in line and "not separated" in line
  assert "NoPE is first" in line and "absolute is last" in line
  strict = _mrr_findings({"NoPE": 0.9, "T5": 0.6, "ALiBi": 0.5, "RoPE": 0.3, "absolute": 0.1})
  assert "NoPE > T5 > ALiBi > RoPE > absolute;" in strict and "same order" in strict
  swapped = _mrr_findings({"NoPE": 0.9, "T5": 0.5, "ALiBi": 0.6, "RoPE": 0.3, "absolute": 0.1})
  assert "NoPE > ALiBi > T5 > RoPE > absolute;" in swapped and "a different order" in swapped


def test_launch_expands_sweeps_and_prints_commands_for_unfinished_runs(tmp_path, capsys):
  assert grid.expand("pe=a,b;n=1,2") == ["pe=a,n=1", "pe=a,n=2", "pe=b,n=1", "pe=b,n=2"]
  with pytest.raises(ValueError, match="--sweep axis"):
    grid.expand("pe")
  grid.main(
    [
      "--config=configs/synthetic.py",
      "--sweep=pe=nope,rope;size=smoke",
      "--seeds=0,1",
      f"--root={tmp_path}",
      "--set=train.steps=5",
      "--print_commands",
    ]
  )
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4 and not os.listdir(tmp_path)  # Printing trains nothing.
  argv = shlex.split(lines[0])
  assert argv[:3] == ["python", "-m", "pe_research.main"]
  assert (
    "--config=configs/synthetic.py:pe=nope,size=smoke" in argv and "--config.train.steps=5" in argv
  )
  run = grid.Run(
    "configs/synthetic.py", "pe=nope,size=smoke", str(tmp_path / "r"), (("train.steps", 5),)
  )
  sweep.train_run(run.config(), run.workdir)
  assert grid.launch([run], print_commands=True) == []  # Finished: nothing left to print.


@pytest.mark.parametrize("module", [alibi_train_short_test_long, context_extension])
def test_paper_presets_print_valid_configs(module, tmp_path, capsys):
  module.main(["--preset=paper", f"--runs={tmp_path}", "--print_commands"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines and all("configs/alibi_paper.py" in line for line in lines)
  base = lm_presets.lm_run("paper", "rope", str(tmp_path))
  os.makedirs(base.workdir)  # Fine-tunes validate that init_from exists.
  config = base.config()
  config_lib.validate(config, device_count=8)
  assert (config.model.num_layers, config.model.model_dim, config.model.num_heads) == (16, 1024, 8)
  assert config.data.name == "pg19" and config.train.seq_len == 512
  if module is context_extension:
    preset = context_extension.PRESETS["paper"]
    scalings = context_extension.methods(4, 512, 128, 10000.0)
    for label in preset.ft_methods:
      run = context_extension.fine_tune_run(base, label, scalings[label], preset)
      config_lib.validate(run.config(), device_count=8)
      assert (run.config().train.seq_len, run.config().train.batch_size) == (2048, 32)


def test_length_generalization_paper_configs_validate(tmp_path):
  preset = length_generalization.PRESETS["paper"]
  runs = length_generalization.runs_for("paper", preset, str(tmp_path), ())
  assert len(runs) == len(preset.tasks) * len(preset.methods) * 3
  for run in runs.values():
    config_lib.validate(run.config(), device_count=8)


@pytest.mark.parametrize(
  "gains, verdict",
  [
    ((0.10, 0.12, 0.14), "matches the paper"),
    ((-0.10, -0.12, -0.14), "does NOT match the paper"),
    ((-0.10, 0.0, 0.12), "not separated from 0 across seeds"),
    ((0.10,), "one seed: no interval"),
  ],
)
def test_randomized_gain_needs_an_interval_across_seeds_that_excludes_zero(gains, verdict):
  seeds = tuple(range(len(gains)))
  preset = length_generalization.Preset(("t",), ("RoPE", "RoPE randomized"), seeds, (4, 8))
  ood = {("t", "RoPE", s): 0.2 for s in seeds}
  ood |= {("t", "RoPE randomized", s): 0.2 + g for s, g in zip(seeds, gains, strict=True)}
  learned = {"RoPE": 1.0, "RoPE randomized": 1.0}
  line = length_generalization.randomized_gain_line(ood, preset, "RoPE randomized", "RoPE", learned)
  assert verdict in line, line


def test_length_generalization_reads_the_training_length_from_the_runs():
  """The in-distribution length is the runs' ``data.train_max_len`` (not the preset's first
  length); runs that disagree, or a preset that does not score that length, are refused."""
  preset = length_generalization.PRESETS["smoke"]
  runs = length_generalization.runs_for("smoke", preset, "/tmp/unused", {})
  assert length_generalization.training_length(runs, preset) == 4
  shifted = length_generalization.Preset(preset.tasks, preset.methods, preset.seeds, (8, 12))
  with pytest.raises(ValueError, match="data.train_max_len=\\[4\\]"):
    length_generalization.training_length(runs, shifted)
