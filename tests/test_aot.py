"""``python -m pe_research.dry_run``: the real training step compiled ahead of time for 8 fake CPU
devices reports XLA's per-device memory, the step's FLOPs and a FIT / DOES NOT FIT verdict against
a chip's memory; the pod recipes load and validate for the device counts they name."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import tiny
from configs.recipes import llama2_7b, pose_llama2_7b_128k, yarn_llama2_7b_64k
from pe_research import aot, config_lib, dry_run, train
from pe_research.model_size import flops_per_token
from pe_research.sharding import MESH_AXES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES, FSDP = 8, 4
SMALL_CHIP_GIB = 1e-5  # A made-up chip of ~10 KiB: the tiny step cannot fit it.


@pytest.fixture(scope="module")
def small_chip_run(tmp_path_factory):
  """One dry run of configs/tiny.py on 8 fake CPU devices (data=2 × fsdp=4): its exit code,
  stdout and JSON."""
  out = tmp_path_factory.mktemp("aot") / "dry_run.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pe_research.dry_run",
      "--config=configs/tiny.py",
      f"--config.mesh.fsdp={FSDP}",
      f"--devices={DEVICES}",
      f"--chip_memory_gib={SMALL_CHIP_GIB}",
      f"--out={out}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out) as f:
    return proc.stdout, json.load(f)


def test_dry_run_reports_xla_memory_per_device_and_does_not_fit_a_small_chip(small_chip_run):
  stdout, r = small_chip_run
  assert r["devices"] == DEVICES
  assert r["mesh"] == {"data": DEVICES // FSDP, "fsdp": FSDP, "context": 1}
  assert "fake devices" in r["approximation"] and "APPROXIMATION" in stdout
  assert r["backend_policy"]["platform"] == "gpu"
  d = r["per_device"]
  total = d["argument_bytes"] + d["temp_bytes"] + d["output_bytes"] - d["alias_bytes"]
  assert d["total_bytes"] == total > 0
  # The arguments hold this device's shard of the state (params and AdamW moments split over
  # fsdp=4) and of the batch; the donated state is aliased by the output.
  config = tiny.get_config()
  config.mesh.fsdp = FSDP
  tx, _ = train.make_optimizer(config.train)
  state = jax.eval_shape(lambda: train.init_train_state(config, tx)[1])
  mesh = jax.sharding.AbstractMesh((DEVICES // FSDP, FSDP, 1), MESH_AXES)
  specs = train.state_specs(config, tx, state, mesh)
  _, params_per_device = dry_run._tree_bytes(state.params, specs.params, mesh)
  _, opt_per_device = dry_run._tree_bytes(state.opt_state, specs.opt_state, mesh)
  state_per_device = params_per_device + opt_per_device
  batch_per_device = 3 * 4 * config.train.batch_size * config.train.seq_len // DEVICES
  assert state_per_device <= d["argument_bytes"] <= 1.05 * state_per_device + batch_per_device
  assert state_per_device <= d["alias_bytes"] <= d["argument_bytes"]
  tokens = config.train.batch_size * config.train.seq_len
  assert r["tokens_per_step"] == tokens
  assert r["step_flops"] == pytest.approx(flops_per_token(config, config.train.seq_len) * tokens)
  peak = aot.CHIPS["h100"].peak_flops
  assert r["step_seconds_at_mfu"] == pytest.approx(r["step_flops"] / (DEVICES * peak * aot.MFU))
  # The made-up chip's memory is what the verdict compares against: DOES NOT FIT.
  assert r["chip_memory_bytes"] == int(SMALL_CHIP_GIB * aot.GIB) < total
  assert not r["fits"] and r["verdict"] == "DOES NOT FIT" and "DOES NOT FIT" in stdout


def test_fit_verdict_against_chip_memory_and_failed_compiles(small_chip_run):
  d = small_chip_run[1]["per_device"]
  assert aot.fits(d, aot.CHIPS["h100"].memory_bytes)
  assert aot.fits(d, d["total_bytes"])
  assert not aot.fits(d, d["total_bytes"] - 1)
  failed = {"error": "RESOURCE_EXHAUSTED: out of memory"}
  assert not aot.fits(failed, aot.CHIPS["h200"].memory_bytes)


def test_resource_exhausted_is_reported_as_xla_message_line():
  error = RuntimeError(
    "XlaRuntimeError: compile failed\n"
    "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm.\n"
    "  at frame 1\n"
  )
  line = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm."
  assert aot._one_line(error) == line
  assert aot._one_line(RuntimeError("\n  other failure\nmore")) == "other failure"


@pytest.mark.parametrize("recipe", [yarn_llama2_7b_64k, pose_llama2_7b_128k])
def test_recipes_validate_for_the_devices_they_name(recipe):
  for target, devices in llama2_7b.TARGETS.items():
    config_lib.validate(recipe.get_config(f"target={target}"), device_count=devices)
  with pytest.raises(ValueError, match="mesh"):  # A pod's mesh on one 8-GPU host: invalid.
    config_lib.validate(recipe.get_config("target=v5e-256"), device_count=8)
  with pytest.raises(ValueError, match="target="):
    recipe.get_config("target=v5e-4")


def test_topology_chip_and_missing_libtpu_are_one_line_errors():
  assert aot.chip_of_topology("v5e:16x16") == "v5e"
  with pytest.raises(ValueError, match="allowed: v4, v5e, v5p, v6e"):
    aot.chip_of_topology("h100:8")
  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is importable here: the topology would be built")
  with pytest.raises(ValueError, match="PYTHONPATH holds libtpu") as error:
    aot.topology_devices("v5e:2x2")
  assert "\n" not in str(error.value)
