"""Scale-out: two JAX processes (4 CPU devices each) train exactly like one process with 8, also
across a resume; the data position resumes on another process count; FSDP (alone and with data
parallelism) equals pure data parallelism; ``--dry_run`` plans for 1, 8 and 256 devices without
training, with a memory estimate close to XLA's."""

import os
import re
import subprocess
import sys
import textwrap

import fake_devices
import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from pe_research import checkpoint, dry_run, train
from pe_research.data import make_train_iterator
from pe_research.metrics import read_metrics
from pe_research.model import Transformer
from pe_research.model_size import count_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# Updates 0..2 use the warmup part of the schedule, which does not depend on train.steps, so a
# run stopped at step 3 and extended to STEPS follows the uninterrupted STEPS-step run.
RUN_FLAGS = [
  "--config=configs/tiny.py",
  "--config.train.warmup_steps=2",
  "--config.train.log_every=1",
  "--config.train.checkpoint_every=3",
]

# One process, 8 devices: the data-parallel losses of STEPS steps, and for each FSDP mesh the
# losses, the largest parameter difference from data parallelism after 3 steps, and the
# fraction of one device's parameter and optimizer bytes over all of them.
_EIGHT_DEVICES = textwrap.dedent(
  f"""
  import json, jax, numpy as np
  from configs import tiny
  from pe_research import sharding, train
  from pe_research.data import make_train_iterator

  def run(data, fsdp, steps):
    # Losses of all steps; parameters and one device's share of the state after step 3.
    config = tiny.get_config()
    config.train.steps, config.train.warmup_steps = {STEPS}, 2
    config.mesh.data, config.mesh.fsdp = data, fsdp
    mesh = sharding.make_mesh(config.mesh)
    tx, schedule = train.make_optimizer(config.train)
    graphdef, state = train.create_train_state(config, mesh, tx)
    step_fn = train.jit_train_step(graphdef, tx, schedule, state, mesh)
    batches, losses = make_train_iterator(config), []
    for step in range(1, steps + 1):
      state, metrics = step_fn(state, sharding.global_batch(next(batches), mesh))
      losses.append(float(metrics["loss"]))
      if step == 3:
        params = jax.device_get(state.params)
        leaves = jax.tree.leaves((state.params, state.opt_state))
        local = sum(x.addressable_shards[0].data.nbytes for x in leaves)
        fraction = local / sum(x.nbytes for x in leaves)
    return losses, params, fraction

  assert jax.device_count() == 8
  dp_losses, dp_params, _ = run(8, 1, {STEPS})
  out = {{"dp": dp_losses, "fsdp": {{}}}}
  for data, fsdp in ((2, 4), (1, 8)):
    losses, params, fraction = run(data, fsdp, 3)
    diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, dp_params)
    out["fsdp"][f"{{data}}x{{fsdp}}"] = dict(
      losses=losses, dp=dp_losses[:3], diff=max(jax.tree.leaves(diffs)), fraction=fraction
    )
  print(json.dumps(out))
  """
)


@pytest.fixture(scope="module")
def eight_devices() -> dict:
  return fake_devices.run_json(_EIGHT_DEVICES)


def _launch(entry: list[str], *flags: str) -> subprocess.CompletedProcess:
  command = [sys.executable, *entry, "--num_processes=2", "--devices_per_process=4", "--", *flags]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


def test_fsdp_shards_state_and_equals_data_parallel(eight_devices):
  for mesh, run in eight_devices["fsdp"].items():
    np.testing.assert_allclose(run["losses"], run["dp"], atol=1e-5, rtol=1e-5, err_msg=mesh)
    assert run["diff"] < 1e-5, (mesh, run["diff"])
    fsdp = int(mesh.split("x")[1])
    # One device holds ~1/fsdp of the parameters and AdamW moments (scalars are replicated).
    assert run["fraction"] < 1.5 / fsdp, (mesh, run["fraction"])


def test_two_processes_equal_eight_devices_across_a_resume(tmp_path, eight_devices):
  workdir = f"--workdir={tmp_path / 'run'}"
  first = _launch(["pe_research/launch/local.py"], *RUN_FLAGS, workdir, "--config.train.steps=3")
  assert first.returncode == 0, first.stderr[-3000:]
  assert os.path.isdir(tmp_path / "run/checkpoints/3/params/ocdbt.process_1")  # p1 saved too.
  assert [r["step"] for r in read_metrics(str(tmp_path / "run"))] == [1, 2, 3]
  steps = f"--config.train.steps={STEPS}"
  second = _launch(["-m", "pe_research.launch.local"], *RUN_FLAGS, workdir, steps)
  assert second.returncode == 0, second.stderr[-3000:]
  records = read_metrics(str(tmp_path / "run"))
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  losses = [r["loss"] for r in records]
  np.testing.assert_allclose(losses, eight_devices["dp"], atol=1e-5, rtol=1e-5)


def test_launcher_forwards_a_failing_exit_code(tmp_path):
  result = _launch(["pe_research/launch/local.py"], *RUN_FLAGS, f"--workdir={tmp_path}", "--bad")
  assert result.returncode == 2, result.stderr[-3000:]
  # The first process to fail relays its error with its prefix; the launcher may stop the other
  # before it gets as far (it can still be importing JAX on a loaded machine).
  error = re.search(r"\[p[01]\] error: Unknown command line flag 'bad'", result.stderr)
  assert error, result.stderr


def test_data_state_resumes_on_another_process_count():
  config = tiny.get_config()
  second_of_two = make_train_iterator(config, process_index=1, process_count=2)
  for _ in range(3):
    next(second_of_two)
  saved = checkpoint.global_data_state(second_of_two.get_state(), process_count=2)
  alone = make_train_iterator(config)
  alone.set_state(checkpoint.local_data_state(saved, process_count=1))
  np.testing.assert_array_equal(next(second_of_two)["inputs"], next(alone)["inputs"][1::2])


@pytest.mark.parametrize("devices, fsdp", [(1, 1), (8, 1), (8, 2), (256, 8)])
def test_dry_run_plans_mesh_batch_memory_and_steps(devices, fsdp):
  config = tiny.get_config("pe=alibi")  # ALiBi's slopes must not need a device under eval_shape.
  config.train.batch_size = 2 * devices
  config.mesh.fsdp = fsdp
  text = dry_run.plan_text(config, device_count=devices)
  assert f"data={devices // fsdp} × fsdp={fsdp}" in text
  assert ("gathered      per device" in text) == (fsdp > 1)
  assert f"global {2 * devices} × 32 tokens; per device 2" in text
  assert "steps         60 (warmup 5), " + f"{60 * 2 * devices * 32:,} tokens" in text
  params = count_params(Transformer(config, rngs=nnx.Rngs(0)))
  assert f"parameters    {params:,} = " in text


def test_dry_run_memory_estimate_is_close_to_xla():
  """Estimated activations + gradients vs XLA's temporary buffers for the compiled step."""
  config = tiny.get_config()
  config.train.batch_size = 16
  tx, schedule = train.make_optimizer(config.train)
  graphdef, state = nnx.eval_shape(lambda: train.init_train_state(config, tx))
  spec = jax.ShapeDtypeStruct((16, config.train.seq_len), np.int32)
  batch = {"inputs": spec, "targets": spec, "weights": spec.update(dtype=np.float32)}
  step = jax.jit(train.make_train_step(graphdef, tx, schedule), donate_argnums=0)
  xla = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
  grads = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  estimate = dry_run.activation_bytes(config, 16) + grads
  assert 0.75 < estimate / xla < 1.25, (estimate, xla)


def test_main_dry_run_prints_plan_for_256_devices_and_writes_nothing(tmp_path):
  result = subprocess.run(
    [
      sys.executable, "-m", "pe_research.main", "--config=configs/tiny.py", "--dry_run",
      f"--workdir={tmp_path / 'run'}", "--dry_run_devices=256", "--config.train.batch_size=512",
      "--config.mesh.fsdp=4",
    ],
    cwd=REPO, capture_output=True, text=True,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  assert "devices       256 (planned, not present)" in result.stdout
  assert "data=64 × fsdp=4" in result.stdout and "per device 2" in result.stdout
  assert not (tmp_path / "run").exists()
