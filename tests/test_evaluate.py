"""The evaluation harness: budgets, equivalences, compile counts, passkey prompts, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx

from configs import tiny
from pe_research import (
  checkpoint,
  cli,
  eval_lib,
  eval_report,
  evaluate,
  passkey,
  sharding,
  train,
  workdirs,
)
from pe_research.data import ByteTokenizer, make_eval_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = 300  # Not a multiple of any length: the last window is partly scored.
SPLIT = 20  # The regions (inside / beyond) of the per-window sums.
ENCODE = ByteTokenizer().encode


def _config(tmp, pe="rope", **fields):
  """configs/tiny.py on a small local_text corpus (train/ and validation/ from our sources)."""
  config = tiny.get_config(f"pe={pe}")
  config.data.name = "local_text"
  config.data.local_dir = str(tmp / "text")
  config.data.data_dir = str(tmp / "tfds")
  for dotted, value in fields.items():
    section, name = dotted.split("__")
    config[section][name] = value
  return config


def _save_run(workdir, config, steps: int = 0):
  """A run dir via the training code: ``steps`` training steps (0 = the initial parameters)."""
  if steps:
    config.train.steps, config.train.warmup_steps, config.train.checkpoint_every = steps, 1, steps
    workdirs.record_config(str(workdir), config, write=True)
    train.train(config, str(workdir))
    return workdir
  tx, _ = train.make_optimizer(config.train)
  _, state = train.create_train_state(config, sharding.make_mesh(config.mesh), tx)
  workdirs.record_config(str(workdir), config, write=True)
  ckpt = checkpoint.Checkpointer(str(workdir), keep=1)
  ckpt.save(1, state, {}, config)
  ckpt.close()
  return workdir


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("evaluate")
  for split, source in (("train", "model.py"), ("validation", "attention.py")):
    os.makedirs(tmp / "text" / split)
    with (
      open(os.path.join(REPO, "pe_research", source)) as f,
      open(tmp / "text" / split / "a.txt", "w") as g,
    ):
      g.write(f.read())
  return tmp


@pytest.fixture(scope="module")
def rope_run(tmp):
  return _save_run(tmp / "rope", _config(tmp), steps=3)


@pytest.fixture(scope="module")
def rope(rope_run):
  """The trained tiny RoPE model, its config and one evaluator shared by the tests."""
  model, config, _ = evaluate.load_model(str(rope_run))
  return eval_lib.Evaluator(model), config


@pytest.mark.parametrize("mode,stride", [("nonoverlapping", None), ("sliding", 8)])
def test_every_mode_scores_exactly_the_budgeted_tokens(rope, mode, stride):
  evaluator, config = rope
  rows, per_position, per_window = eval_lib.lm_sweep(
    evaluator, config, [32, 64], mode=mode, stride=stride, max_tokens=BUDGET, split=SPLIT
  )
  assert [r["tokens"] for r in rows] == [BUDGET, BUDGET]
  assert [per_position[n][1].sum() for n in (32, 64)] == [BUDGET, BUDGET]
  # Regions: each window's sums inside / beyond position SPLIT add up to the per-position ones.
  for row, n in zip(rows, (32, 64), strict=True):
    nll_L, weight_L = per_position[n]
    nll_WxR, weight_WxR = (np.array(per_window[n][k]) for k in ("nll_WxR", "weight_WxR"))
    assert len(weight_WxR) == row["windows"] and weight_WxR.sum() == BUDGET
    np.testing.assert_allclose(nll_WxR.sum(0), [nll_L[:SPLIT].sum(), nll_L[SPLIT:].sum()])
    assert row["tokens_inside"] == weight_L[:SPLIT].sum() > 0
    assert row["tokens_beyond"] == weight_L[SPLIT:].sum() > 0
    assert row["loss_beyond"] == pytest.approx(nll_L[SPLIT:].sum() / weight_L[SPLIT:].sum())
  assert all(np.isfinite(r["loss"]) and r["ppl"] == pytest.approx(np.exp(r["loss"])) for r in rows)
  # Bits per byte of the scored UTF-8 bytes; the budget holds no EOS, so bytes = tokens here.
  assert [r["bytes"] for r in rows] == [BUDGET, BUDGET]
  assert rows[0]["bits_per_byte"] == pytest.approx(rows[0]["loss"] / np.log(2))


def test_documents_mode_rows_name_their_units_and_say_when_there_are_too_few(rope):
  evaluator, config = rope
  (row,), _, _ = eval_lib.lm_sweep(evaluator, config, [64], mode="documents", max_tokens=128)
  assert row["tokens"] == 64 and row["windows"] == 1 and row["units"] == "validation/a.txt"
  assert "has 1 of the 2 requested units holding 65 tokens" in row["units_note"]


def test_sliding_with_stride_equal_to_length_is_nonoverlapping(rope):
  evaluator, config = rope
  _, slide, _ = eval_lib.lm_sweep(
    evaluator, config, [32], mode="sliding", stride=32, max_tokens=BUDGET
  )
  _, plain, _ = eval_lib.lm_sweep(evaluator, config, [32], max_tokens=BUDGET)
  np.testing.assert_array_equal(slide[32][1], plain[32][1])
  np.testing.assert_allclose(slide[32][0], plain[32][0], rtol=1e-6)


def test_compiles_one_program_per_length_and_none_on_rerun(rope_run, no_compilation_cache):
  model, config, _ = evaluate.load_model(str(rope_run))
  evaluator = eval_lib.Evaluator(model)
  for _ in range(2):
    eval_lib.lm_sweep(evaluator, config, [16, 48], max_tokens=BUDGET)
    eval_lib.lm_sweep(evaluator, config, [48], mode="sliding", stride=8, max_tokens=BUDGET)
    assert evaluator.num_compiles == 2
    assert evaluator.backend_compiles == 2  # measured from JAX's compile events


def test_blockwise_and_dense_evaluation_agree(rope):
  evaluator, config = rope
  losses = {}
  for attention in ("dense", "blockwise"):
    forced = eval_lib.Evaluator(evaluator.model, attention=attention)
    _, per_position, _ = eval_lib.lm_sweep(forced, config, [64], max_tokens=BUDGET)
    losses[attention] = per_position[64][0]
  np.testing.assert_allclose(losses["blockwise"], losses["dense"], rtol=1e-5, atol=1e-5)


def test_dense_switches_to_blockwise_above_the_memory_budget(rope):
  evaluator, _ = rope
  small = eval_lib.Evaluator(evaluator.model, dense_budget_bytes=2 * 64 * 64 * 4)  # B=1, H=2
  assert [small.attention_for(1, n) for n in (32, 64, 65, 4096)] == ["dense"] * 2 + [
    "blockwise"
  ] * 2
  assert eval_lib.dense_score_bytes(2, 4, 1024) == 2 * 4 * 1024 * 1024 * 4


def test_long_lengths_are_scored_blockwise_with_the_eval_block(rope):
  evaluator, _ = rope
  assert evaluator.model.attention == "dense"
  assert [evaluator.attention_for(1, n) for n in (512, 1023, 1024, 4096)] == ["dense"] * 2 + [
    "blockwise"
  ] * 2
  assert evaluator._plan(1, 1024) == ("blockwise", eval_lib.EVAL_BLOCK)
  assert eval_lib.eval_attention("xla", 128, 8192, True) == ("xla", 128)  # kept as trained
  assert eval_lib.eval_attention("blockwise", 128, 8192, False) == ("blockwise", 128)


@pytest.mark.parametrize("rope_type", ["linear", "ntk", "yarn"])
def test_zero_shot_scaling_with_factor_one_equals_no_scaling(rope, rope_run, rope_type):
  evaluator, config = rope
  batch = make_eval_batches(config, length=96)[0]
  spec = {"rope_type": rope_type, "factor": 1.0}
  scaled, _, _ = evaluate.load_model(str(rope_run), rope_scaling=json.dumps(spec))
  stretched, _, _ = evaluate.load_model(
    str(rope_run), rope_scaling=json.dumps({**spec, "factor": 4.0})
  )
  plain = evaluator.model(batch["inputs"])
  np.testing.assert_allclose(scaled(batch["inputs"]), plain, rtol=1e-5, atol=1e-5)
  # The override applies (3 training steps: positions move the logits by a few 1e-4).
  assert np.abs(stretched(batch["inputs"]) - plain).max() > 1e-4


def test_token_stats_weight_the_nll_and_exact_match_only_scored_targets():
  nll = -np.log([0.7, 0.6, 0.3])
  nll_BxL = np.array([[nll[0], nll[1]], [nll[0], nll[2]], [nll[0], nll[2]]], np.float32)
  hit_BxL = np.array([[True, True], [True, False], [True, False]])
  batch = {"weights": np.array([[1, 1], [1, 1], [1, 0]], np.float32)}
  stats = jax.tree.map(np.asarray, eval_lib.token_stats(nll_BxL, hit_BxL, batch))
  np.testing.assert_allclose(stats["nll_sum_L"], [3 * nll[0], nll[1] + nll[2]], rtol=1e-6)
  np.testing.assert_array_equal(stats["weight_sum_L"], [3, 2])
  np.testing.assert_array_equal(stats["exact_B"], [True, False, True])  # row 2: 2 is unscored


def test_synthetic_runs_report_exact_match_accuracy_per_task_length(tmp):
  config = _config(tmp, data__name="synthetic")
  workdir = str(_save_run(tmp / "copy", config))
  result = evaluate.evaluate(workdir, lengths=[4, 9], max_tokens=200)
  eval_report.write_results(result, os.path.join(workdir, "eval"))
  rows = result.rows
  assert [r["seq_len"] for r in rows] == [2 * 4 + 2, 2 * 9 + 2]  # BOS x SEP x EOS, shifted
  assert [r["examples"] for r in rows] == [200 // 10, 200 // 20]
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows) and rows[0]["tokens"] == 20 * 5
  assert os.path.getsize(tmp / "copy" / "eval" / "nonoverlapping.png") > 0


def test_randomized_run_evaluates_at_reproducible_random_positions_over_the_same_tokens(tmp):
  """pe.randomize_eval (default True): evaluation draws sorted positions from [0,
  max_random_len) as training does, the same draws each time the run is evaluated;
  pe.randomize_eval=False scores the same tokens at positions 0..n-1."""
  workdir = str(_save_run(tmp / "randomized", _config(tmp, pe="sinusoidal", pe__randomized=True)))
  batch = next(iter(make_eval_batches(_config(tmp), length=32, max_tokens=64, batch_size=2)))

  def stats(**overrides):
    model, _, _ = evaluate.load_model(workdir, overrides=overrides)
    return eval_lib.Evaluator(model).score(batch)[0]

  first, again, sequential = stats(), stats(), stats(**{"pe.randomize_eval": False})
  np.testing.assert_array_equal(first["nll_sum_L"], again["nll_sum_L"])
  assert np.abs(first["nll_sum_L"] - sequential["nll_sum_L"]).max() > 1e-3
  np.testing.assert_array_equal(first["weight_sum_L"], sequential["weight_sum_L"])


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("length", [300, 517])
def test_passkey_prompt_has_exact_length_needle_depth_and_answer(length, depth):
  example = passkey.make_example(length, depth, 71432, ENCODE)
  text = bytes(example.tokens.astype(np.uint8)).decode()
  needle = "\nThe pass key is 71432. Remember it. 71432 is the pass key.\n"
  assert len(example.tokens) == length + 1
  assert text.startswith(passkey.HEADER) and text.endswith(passkey.QUESTION + "71432")
  assert text.find(needle) == example.needle_start and text.count("71432") == 3
  filler = text[len(passkey.HEADER) :].replace(needle, "", 1)[: -len(passkey.QUESTION) - 5]
  assert not any(c.isdigit() for c in filler)
  assert example.needle_start - len(passkey.HEADER) == round(depth * len(filler))
  row = example.as_batch_row()
  assert bytes(row["targets"][row["weights"] > 0].astype(np.uint8)) == b"71432"
  np.testing.assert_array_equal(row["inputs"][1:], row["targets"][:-1])


def test_passkey_batches_are_padded_deterministic_and_reject_short_lengths():
  batches = passkey.make_batches(300, 0.5, trials=3, batch_size=2, encode=ENCODE, seed=1)
  assert [b["inputs"].shape for b in batches] == [(2, 300), (2, 300)]
  assert batches[1]["weights"][1].sum() == 0 and batches[0]["weights"][0].sum() == 5
  again = passkey.make_batches(300, 0.5, trials=3, batch_size=2, encode=ENCODE, seed=1)
  np.testing.assert_array_equal(batches[0]["targets"], again[0]["targets"])
  with pytest.raises(ValueError, match="too short"):
    passkey.make_example(passkey.min_length(ENCODE) - 1, 0.5, 12345, ENCODE)
  assert len(passkey.make_example(passkey.min_length(ENCODE), 0.5, 12345, ENCODE).tokens) > 0


def test_passkey_positive_control_fits_inside_a_byte_models_training_length():
  # A byte model trained at L=128 had no prompt inside L (the shortest is 250 bytes with
  # HEADER): its passkey grid had no positive control.
  assert passkey.min_length(ENCODE) > 128 and passkey.control_header(ENCODE, 512) == passkey.HEADER
  assert passkey.control_header(ENCODE, 128) == "" and passkey.control_header(ENCODE, 64) is None
  example = passkey.make_example(128, 0.5, 71432, ENCODE, header="")
  text = bytes(example.tokens.astype(np.uint8)).decode()
  assert len(example.tokens) == 129 and text.endswith(passkey.QUESTION + "71432")
  assert text.count("71432") == 3 and not text.startswith(passkey.HEADER)
  batches = passkey.make_batches(128, 1.0, trials=2, batch_size=2, encode=ENCODE, header="")
  assert batches[0]["inputs"].shape == (2, 128) and batches[0]["weights"].sum() == 10


def test_passkey_control_verdict_says_when_the_grid_is_not_evidence():
  passed = [{"depth": 0.0, "accuracy": 1.0}, {"depth": 1.0, "accuracy": 0.5}]
  failed = [{"depth": 0.0, "accuracy": 1.0}, {"depth": 1.0, "accuracy": 0.25}]
  assert "the grid is evidence" in passkey.control_verdict(passed, 128)
  assert "FAILED" in passkey.control_verdict(failed, 128)
  assert "the grid is not evidence" in passkey.control_verdict(failed, 128)
  assert "the grid is not evidence" in passkey.control_verdict([], 64)


def test_figure_titles_name_the_method_briefly_and_captions_hold_the_spec():
  spec = json.dumps({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
  fields = dict(name="n", workdir="w", step=1, pe="rope", train_len=64, mode="nonoverlapping")
  fields |= dict(synthetic=False, rows=[], per_position={}, compiles=0, programs=0)
  result = eval_report.EvalResult(rope_scaling=spec, overrides={"pe.logn_len": 64}, **fields)
  assert result.label == "rope YaRN s=4"  # Was the whole JSON, running off the figure.
  assert result.caption == f"rope_scaling={spec}; pe.logn_len=64"
  plain = eval_report.EvalResult(rope_scaling="", overrides={}, **fields)
  assert plain.label == "rope" and plain.caption == ""


def test_init_from_copies_parameters_but_not_optimizer_state(tmp, rope_run):
  source = nnx.to_pure_dict(nnx.state(evaluate.load_model(str(rope_run))[0], nnx.Param))
  config = _config(tmp, train__lr=1e-9)
  config.init_from = str(rope_run)
  config.train.steps, config.train.warmup_steps, config.train.checkpoint_every = 1, 0, 1
  workdirs.record_config(str(tmp / "fine_tune"), config, write=True)
  state = train.train(config, str(tmp / "fine_tune"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params, source)
  counts = [int(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
  assert counts and set(counts) == {1}  # a fresh optimizer after one step (the source ran 3)


def _cli(argv, capsys):
  """Runs the CLI in-process: absl parsing, then main; returns (exit code, stderr)."""
  flags.FLAGS.unparse_flags()
  code = 0
  try:
    evaluate.main(cli.parse_flags(["evaluate", *argv]))
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def other_runs(tmp):
  alibi = _save_run(tmp / "alibi", _config(tmp, pe="alibi"))
  learned = _save_run(tmp / "learned", _config(tmp, pe="learned", pe__max_len=64))
  os.makedirs(tmp / "empty")
  workdirs.record_config(str(tmp / "untrained"), _config(tmp), write=True)
  return {
    "alibi": alibi,
    "learned": learned,
    "empty": tmp / "empty",
    "untrained": tmp / "untrained",
  }


@pytest.mark.parametrize(
  "run,argv,message",
  [
    ("rope", ["--mode=strided"], "--mode='strided' is unknown"),
    (
      "rope",
      ["--mode=sliding", "--stride=40", "--lengths=32,64"],
      "--stride=40 must lie in [1, 32]",
    ),
    ("rope", ["--mode=sliding", "--stride=0"], "--stride=0 must lie in"),
    ("rope", ["--stride=8"], "--stride=8 needs --mode=sliding"),
    ("rope", ["--lengths=0,32"], "--lengths='0,32' must be integers >= 1"),
    ("rope", ["--stride=abc"], "stride"),
    ("rope", ["--attention=flash"], "--attention='flash' is unknown"),
    ("rope", ["--lengths=64", "--passkey_trials=1"], "needs a --lengths entry >= 250"),
    ("rope", ["--rope_scaling={bad"], "rope_scaling is not valid JSON"),
    ("rope", ['--rope_scaling={"rope_type":"warp","factor":2}'], "rope_type='warp' is unknown"),
    ("alibi", ['--rope_scaling={"rope_type":"linear","factor":2}'], "pe.name='alibi'"),
    ("learned", ["--lengths=32,128"], "128 exceeds 64"),
    ("empty", [], "has no config.json"),
    ("untrained", [], "has no checkpoint"),
    ("missing", [], "has no config.json"),
  ],
)
def test_bad_input_exits_2_with_one_line(tmp, rope_run, other_runs, capsys, run, argv, message):
  workdir = {"rope": rope_run, "missing": tmp / "missing", **other_runs}[run]
  code, err = _cli([f"--workdir={workdir}", *argv], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
  assert not os.path.exists(os.path.join(workdir, "eval"))


def test_cli_writes_tables_plots_and_compile_count(rope_run, no_compilation_cache):
  argv = ["--lengths=64,256", "--max_tokens=300", "--mode=sliding", "--stride=16"]
  argv += ["--passkey_trials=2", "--passkey_depths=0,1", "--name=smoke"]
  result = subprocess.run(
    [sys.executable, "-m", "pe_research.evaluate", f"--workdir={rope_run}", *argv],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  out = rope_run / "eval"
  summary = json.loads((out / "smoke.json").read_text())
  assert [r["tokens"] for r in summary["rows"]] == [300, 300]
  assert summary["compiles_per_eval_length"] == 1.0 and summary["step"] == 3
  # Trained at L=32: no passkey prompt (>= 103 bytes) fits inside L, so no positive control.
  assert "no positive control" in result.stdout and "grid is not evidence" in result.stdout
  passkey_rows = json.loads((out / "smoke_passkey.json").read_text())["rows"]
  assert passkey_rows and not any(r["control"] for r in passkey_rows)
  assert (out / "smoke.csv").read_text().startswith("length,mode,stride,attention,tokens,loss,ppl")
  windows = json.loads((out / "smoke_windows.json").read_text())
  assert windows["split"] == 32 and len(windows["lengths"]["256"]["weight_WxR"]) >= 1
  for name in (
    "smoke.png",
    "smoke_per_position.csv",
    "smoke_per_position.png",
    "smoke_windows.json",
    "smoke_passkey.png",
  ):
    assert (out / name).stat().st_size > 0
