"""Checkpoints and faults: an interrupted run resumes bit-for-bit, old checkpoints are pruned,
``init_from`` loads parameters, a workdir refuses a different config, and a non-finite loss
stops the run (``train.nan_policy="stop"``) or skips the step (``"skip"``)."""

import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from pe_research import checkpoint, config_lib, data, train, workdirs
from pe_research.metrics import read_metrics

STEPS = 12


class _Crash(Exception):
  pass


class _FaultyIterator:
  """Passes on the batches of ``inner``; at batch ``at`` (1-based) it raises ``_Crash`` (like a
  killed process) or, with ``fault="nan"``, returns the batch with one NaN weight."""

  def __init__(self, inner, at: int, fault: str):
    self.inner, self.at, self.fault, self.count = inner, at, fault, 0

  def __next__(self):
    self.count += 1
    if self.count == self.at and self.fault == "crash":
      raise _Crash()
    batch = next(self.inner)
    if self.count == self.at:
      batch["weights"][0, 0] = np.nan
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _inject(monkeypatch, at: int, fault: str):
  make_iterator = data.make_train_iterator  # train.train imports it from here at call time.
  monkeypatch.setattr(
    data, "make_train_iterator", lambda *a, **k: _FaultyIterator(make_iterator(*a, **k), at, fault)
  )
  return make_iterator


def _config():
  config = tiny.get_config("pe=rope")
  config.pe.randomized = True  # Draws positions from RNG state that must be restored too.
  config.train.steps = STEPS
  config.train.log_every = 1
  config.train.checkpoint_every = 4
  config.train.keep_checkpoints = 2
  return config


def _without_timing(records):
  return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  state = train.train(_config(), workdir)
  return workdir, jax.device_get(state.params)


def test_resume_after_crash_equals_uninterrupted_run_bit_for_bit(
  uninterrupted, tmp_path, monkeypatch
):
  reference_dir, reference_params = uninterrupted
  workdir = str(tmp_path)
  make_iterator = _inject(monkeypatch, at=11, fault="crash")
  with pytest.raises(_Crash):
    train.train(_config(), workdir)
  assert [r["step"] for r in read_metrics(workdir)] == list(range(1, 11))
  monkeypatch.setattr(data, "make_train_iterator", make_iterator)
  params = jax.device_get(train.train(_config(), workdir).params)  # Resumes from step 8.
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert _without_timing(records) == _without_timing(read_metrics(reference_dir))
  jax.tree.map(np.testing.assert_array_equal, params, reference_params)


def test_keeps_only_the_last_checkpoints(uninterrupted):
  workdir, _ = uninterrupted
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "8"]


def test_init_from_loads_the_latest_parameters_of_another_run(uninterrupted):
  workdir, reference_params = uninterrupted
  params = checkpoint.load_params(workdir, reference_params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), reference_params)


def test_load_params_accepts_a_relative_workdir(uninterrupted, monkeypatch):
  """Orbax rejects relative paths; ``--checkpoints=runs/demo/alibi`` must still load."""
  workdir, reference_params = uninterrupted
  monkeypatch.chdir(os.path.dirname(workdir))
  params = checkpoint.load_params(os.path.basename(workdir), reference_params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), reference_params)


def test_init_from_without_checkpoint_is_a_value_error(tmp_path):
  with pytest.raises(ValueError, match="init_from"):
    checkpoint.load_params(str(tmp_path), {})


def test_workdir_accepts_more_steps_but_refuses_another_config(tmp_path):
  config = _config()
  workdirs.record_config(str(tmp_path), config, write=True)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["train"]["steps"] == STEPS and saved["pe"]["train_len"] == 32
  config.train.steps = 2 * STEPS
  config.train.steps_per_call = 4  # How steps are grouped into calls: no other result.
  workdirs.record_config(str(tmp_path), config, write=True)
  config.pe.name = "alibi"
  config.train.lr = 0.5
  with pytest.raises(ValueError, match=r"pe.name: 'rope' -> 'alibi'; train.lr") as error:
    workdirs.record_config(str(tmp_path), config, write=True)
  assert "\n" not in str(error.value)


def test_non_finite_loss_stops_the_run_naming_the_step_and_last_checkpoint(tmp_path, monkeypatch):
  _inject(monkeypatch, at=6, fault="nan")
  with pytest.raises(train.DivergenceError, match="step 6: .* last good checkpoint: step 4"):
    train.train(_config(), str(tmp_path))
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]


def test_skip_policy_skips_a_non_finite_step_and_finishes(tmp_path, monkeypatch, caplog):
  _inject(monkeypatch, at=6, fault="nan")
  config = _config()
  config.train.nan_policy = "skip"
  train.train(config, str(tmp_path))
  losses = [r["loss"] for r in read_metrics(str(tmp_path))]
  assert len(losses) == STEPS and np.isnan(losses[5]) and np.isfinite(np.delete(losses, 5)).all()
  assert "step 6: loss or gradients are not finite; skipped" in caplog.text


def test_workdir_recorded_with_sequential_eval_positions_resumes_under_the_new_default(tmp_path):
  config = _config()
  assert config.pe.randomize_eval  # Evaluation draws positions like training by default.
  saved = config_lib.config_to_dict(config)
  saved["pe"]["randomize_eval"] = False  # The default recorded by runs before that change.
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdirs.record_config(str(tmp_path), config, write=False)  # Evaluation only: no clash.


def test_workdir_from_before_a_new_config_field_resumes_while_it_keeps_its_default(tmp_path):
  config = _config()
  saved = config_lib.config_to_dict(config)
  del saved["model"]["mlp"]  # As if model.mlp had been added to configs/base.py since.
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdirs.record_config(str(tmp_path), config, write=False)
  config.model.mlp = "swiglu"
  with pytest.raises(ValueError, match="model.mlp: 'gelu' -> 'swiglu'"):
    workdirs.record_config(str(tmp_path), config, write=False)
