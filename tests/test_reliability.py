"""Faults injected into real runs of configs/tiny.py (``python -m pe_research.main``): kill -9
at random steps, SIGTERM/SIGINT, damaged checkpoint files, divergence, bad command lines and
workdir mistakes (fuzzed configs: test_configs.py). A recovered run must equal an uninterrupted
one bit for bit: every metrics.jsonl record (but the timing) and the final parameters."""

import concurrent.futures
import functools
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import fake_devices
import jax
import numpy as np
import pytest

from configs import tiny
from pe_research import checkpoint, evaluate, integrity, sharding, train
from pe_research.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
RUN = [
  *("--config=configs/tiny.py:pe=rope", "--config.pe.randomized=True"),  # RNG state resumes too.
  *(f"--config.train.steps={STEPS}", "--config.train.log_every=1"),
  *("--config.train.checkpoint_every=4", "--config.train.keep_checkpoints=2"),
]


# A run on 8 fake CPU devices, mesh data=2 x fsdp=2 x context=2: stacked layers gathered per
# layer, full remat, ring context parallelism, two accumulated micro-batches.
MESH_STEPS = 8
MESH_RUN = [
  *("--config=configs/tiny.py:pe=t5", f"--config.train.steps={MESH_STEPS}"),
  *("--config.train.log_every=1", "--config.train.checkpoint_every=2"),
  *("--config.mesh.fsdp=2", "--config.mesh.context=2", "--config.model.context_parallel=ring"),
  *("--config.model.scan_layers=True", "--config.model.remat=full"),
  "--config.train.grad_accum_steps=2",
]
EIGHT_DEVICES = fake_devices.xla_env(8)


def _command(workdir, *flags: str, module: str = "pe_research.main") -> list[str]:
  return [sys.executable, "-m", module, f"--workdir={workdir}", *flags]


def _run(
  workdir, *flags: str, module: str = "pe_research.main", env=None
) -> subprocess.CompletedProcess:
  return subprocess.run(
    _command(workdir, *flags, module=module),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, **(env or {})),
  )


def _start(workdir, *flags: str, env=None) -> subprocess.Popen:
  log = open(f"{workdir}.log", "a")  # noqa: SIM115  (the child holds it; a pipe could fill up)
  env = dict(os.environ, **(env or {}))
  command = _command(workdir, *flags)
  return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log, text=True, env=env)


def _wait_for_step(proc: subprocess.Popen, workdir, step: int) -> None:
  """Returns once ``metrics.jsonl`` has a record of ``step`` or later."""
  path, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + 240
  while proc.poll() is None and time.time() < deadline:
    records = read_metrics(str(workdir)) if os.path.exists(path) else []
    if records and records[-1]["step"] >= step:
      return
    time.sleep(0.002)
  with open(f"{workdir}.log") as log:
    raise AssertionError(f"no step {step}; exit code {proc.returncode}: {log.read()[-3000:]}")


def _without_timing(records):
  return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


@functools.cache
def _like(arg: str = "pe=rope", randomized: bool = True):
  """A train state of the runs' config: the shapes to restore checkpoints into."""
  config = tiny.get_config(arg)
  config.pe.randomized = randomized
  tx, _ = train.make_optimizer(config.train)
  return config, train.create_train_state(config, sharding.make_mesh(config.mesh), tx)[1]


def _final_params(workdir):
  return jax.device_get(checkpoint.load_params(str(workdir), _like()[1].params))


def _assert_equals_reference(workdir, reference) -> None:
  records = read_metrics(str(workdir))
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert _without_timing(records) == _without_timing(read_metrics(str(reference)))
  jax.tree.map(np.testing.assert_array_equal, _final_params(workdir), _final_params(reference))


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """The runs share JAX's persistent compilation cache: the first compiles, the others load
  the same executables (10 s -> 4 s of CPU per run here)."""
  with pytest.MonkeyPatch.context() as env:
    env.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
    env.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reliability") / "uninterrupted"
  result = _run(workdir, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_kill_9_at_three_random_steps_then_rerun_equals_uninterrupted_run(reference, tmp_path):
  """Kills land anywhere: in a step, in a checkpoint save, in writing a metrics record."""
  k1 = random.randint(2, 10)
  kills = [k1, random.randint(k1 + 6, 22), random.randint(28, 34)]
  workdir = tmp_path / "killed"
  for step in kills:
    proc = _start(workdir, *RUN)
    _wait_for_step(proc, workdir, step)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, kills
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 35, "grad_norm": 0.9')  # A record cut short by the kill.
  assert _run(workdir, *RUN).returncode == 0, kills
  _assert_equals_reference(workdir, reference)


def test_kill_9_on_a_data_fsdp_context_mesh_then_rerun_equals_uninterrupted_run(tmp_path):
  """On a data=2 x fsdp=2 x context=2 mesh (per-layer FSDP, remat, ring attention, accumulated
  micro-batches) a run killed mid-way and rerun equals the uninterrupted run bit for bit."""
  reference = tmp_path / "mesh_reference"
  done = _run(reference, *MESH_RUN, env=EIGHT_DEVICES)
  assert done.returncode == 0, done.stderr[-3000:]
  workdir = tmp_path / "mesh_killed"
  proc = _start(workdir, *MESH_RUN, env=EIGHT_DEVICES)
  _wait_for_step(proc, workdir, random.randint(3, 5))
  proc.kill()
  assert proc.wait() == -signal.SIGKILL
  rerun = _run(workdir, *MESH_RUN, env=EIGHT_DEVICES)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  records = read_metrics(str(workdir))
  assert [r["step"] for r in records] == list(range(1, MESH_STEPS + 1))
  assert _without_timing(records) == _without_timing(read_metrics(str(reference)))
  like = _like("pe=t5", randomized=False)[1].params  # One device, per-layer: load_params converts.
  final = lambda path: jax.device_get(checkpoint.load_params(str(path), like))
  jax.tree.map(np.testing.assert_array_equal, final(workdir), final(reference))


def test_sigterm_and_sigint_save_the_current_step_exit_0_and_the_rerun_resumes_there(
  reference, tmp_path
):
  workdir, kept = tmp_path / "preempted", []
  for signum, step in (
    (signal.SIGTERM, random.randint(3, 14)),
    (signal.SIGINT, random.randint(20, 32)),
  ):
    proc = _start(workdir, *RUN)
    _wait_for_step(proc, workdir, step)
    sent = time.time()
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 0 and time.time() - sent < 10, signum
    records = read_metrics(str(workdir))
    assert checkpoint.latest_intact_step(str(workdir)) == records[-1]["step"] < STEPS
    assert records[: len(kept)] == kept  # Resumed at the last stop: no record was rewritten.
    kept = records
  assert _run(workdir, *RUN).returncode == 0
  assert read_metrics(str(workdir))[: len(kept)] == kept
  _assert_equals_reference(workdir, reference)


def _copy(reference, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(reference, workdir)
  return workdir


def _largest_file(step_dir, item: str) -> str:
  files = glob.glob(os.path.join(step_dir, item, "**", "*"), recursive=True)
  return max((f for f in files if os.path.isfile(f)), key=os.path.getsize)


def test_truncated_latest_checkpoint_resumes_from_previous_with_warning(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  os.truncate(_largest_file(workdir / "checkpoints" / str(STEPS), "params"), 100)
  result = _run(workdir, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  warning = [line for line in result.stderr.splitlines() if "damaged checkpoint" in line]
  assert len(warning) == 1 and f"step {STEPS} (params/" in warning[0], result.stderr[-3000:]
  assert f"resuming from step {STEPS - 4}" in warning[0]
  assert os.listdir(workdir / integrity.DAMAGED_DIR) == [str(STEPS)]
  _assert_equals_reference(workdir, reference)


def _flip_a_byte(path: str) -> None:
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


DAMAGES = {
  "truncated state file": lambda d: os.truncate(_largest_file(d, "state"), 10),
  "emptied params metadata": lambda d: os.truncate(os.path.join(d, "params", "_METADATA"), 0),
  "deleted data file": lambda d: os.remove(os.path.join(d, "data", "metadata")),
  "flipped byte": lambda d: _flip_a_byte(_largest_file(d, "params")),
  "deleted integrity file": lambda d: os.remove(os.path.join(d, integrity.INTEGRITY_FILE)),
}


@pytest.mark.parametrize("fault", DAMAGES)
def test_damaged_latest_checkpoint_is_detected_and_moved_aside(reference, tmp_path, fault):
  workdir = _copy(reference, tmp_path)
  DAMAGES[fault](str(workdir / "checkpoints" / str(STEPS)))
  assert checkpoint.latest_intact_step(str(workdir)) == STEPS - 4  # Read-only (evaluation).
  assert os.path.isdir(workdir / "checkpoints" / str(STEPS))
  checkpointer = checkpoint.Checkpointer(str(workdir), keep=2)
  assert checkpointer.latest_step() == STEPS - 4
  checkpointer.close()
  assert os.listdir(workdir / integrity.DAMAGED_DIR) == [str(STEPS)]


def test_evaluation_loads_the_newest_intact_checkpoint(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  os.truncate(_largest_file(workdir / "checkpoints" / str(STEPS), "params"), 100)
  assert evaluate.load_model(str(workdir))[2] == STEPS - 4


def test_damaged_newer_checkpoints_never_cause_the_intact_one_to_be_pruned(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  config, like = _like()
  os.remove(_largest_file(workdir / "checkpoints" / str(STEPS), "params"))
  checkpointer = checkpoint.Checkpointer(str(workdir), keep=1)
  state, data_state = checkpointer.restore(checkpointer.latest_step(), like)
  checkpointer.save(STEPS - 3, state, data_state, config)  # keep=1 would have kept damaged STEPS.
  checkpointer.close()
  assert os.listdir(workdir / "checkpoints") == [str(STEPS - 3)]
  assert checkpoint.latest_intact_step(str(workdir)) == STEPS - 3


def test_no_intact_checkpoint_refuses_and_deletes_nothing(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  for step in (STEPS - 4, STEPS):
    os.truncate(_largest_file(workdir / "checkpoints" / str(step), "params"), 1)
  with pytest.raises(checkpoint.WorkdirError, match=f"step {STEPS} .*; step {STEPS - 4} ") as e:
    checkpoint.Checkpointer(str(workdir), keep=2)
  assert "\n" not in str(e.value) and "allowed" in str(e.value)
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(STEPS - 4), str(STEPS)]


def test_too_little_disk_space_is_reported_before_training(tmp_path, monkeypatch):
  config = tiny.get_config()
  tx, _ = train.make_optimizer(config.train)
  _, state = train.create_train_state(config, sharding.make_mesh(config.mesh), tx)
  checkpointer = checkpoint.Checkpointer(str(tmp_path), keep=3)
  checkpointer.check_disk_space(state)
  monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 2**20))
  with pytest.raises(checkpoint.WorkdirError, match="4 more checkpoints"):
    checkpointer.check_disk_space(state)
  checkpointer.close()


def _write_typo_config(tmp_path) -> str:
  path = tmp_path / "typo.py"
  path.write_text(
    "from configs import tiny\n\n\ndef get_config(arg=None):\n"
    "  config = tiny.get_config(arg)\n  config.train.learnin_rate = 0.01\n  return config\n"
  )
  return str(path)


def test_command_line_faults_exit_with_one_line_before_training(reference, tmp_path):
  """Invalid configs, bad evaluation input, a mismatched, unwritable or too small workdir
  (exit 2), divergence (exit 1) and ``--overwrite`` (moves the old run aside), in parallel."""
  (tmp_path / "file").write_text("")
  mismatched, overwritten = _copy(reference, tmp_path), tmp_path / "overwritten"
  shutil.copytree(reference, overwritten)
  new, full, diverged = tmp_path / "new", tmp_path / "full", tmp_path / "diverged"
  nan = "step 3: loss or gradients are not finite; last good checkpoint: step 2"
  cases = [
    (new, ["--config=configs/tiny.py", "--config.train.steps=0"], 2, "train.steps=0"),
    (new, [f"--config={_write_typo_config(tmp_path)}"], 2, "train.learnin_rate is an unknown"),
    (new, ["--config=configs/tiny.py:pe=learned", "--config.train.seq_len=200"], 2, "pe.max_len"),
    (reference, ["--rope_scaling={bad"], 2, "rope_scaling is not valid JSON"),
    (mismatched, [*RUN, "--config.train.lr=0.01"], 2, "train.lr: 0.003 -> 0.01"),
    (tmp_path / "file" / "run", RUN, 2, "is not writable"),
    (full, [*RUN, "--config.train.keep_checkpoints=1000000000"], 2, "GiB"),
    (diverged, [*RUN, "--config.train.lr=1e30", "--config.train.checkpoint_every=2"], 1, nan),
    (
      overwritten,
      [*RUN, "--config.train.steps=6", "--config.train.lr=0.01", "--overwrite"],
      0,
      "--overwrite: moved the old run to",
    ),
  ]

  def run(case):
    module = "pe_research.evaluate" if case[0] == reference else "pe_research.main"
    return _run(case[0], *case[1], module=module)

  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    results = list(pool.map(run, cases))
  for (_, flags, code, message), result in zip(cases, results, strict=True):
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error", "--"))]
    assert result.returncode == code and len(lines) == 1, (flags, result.stderr[-3000:])
    assert message in lines[0] and ("allowed" in lines[0] or code != 2), (flags, lines)
  assert not os.path.exists(new) and not os.listdir(full / "checkpoints")
  assert not os.path.exists(full / "metrics.jsonl")
  assert len(read_metrics(str(mismatched))) == STEPS
  (old,) = glob.glob(f"{overwritten}.old-*")
  assert len(read_metrics(old)) == STEPS and len(read_metrics(str(overwritten))) == 6
