"""Per-layer FSDP on 8 fake CPU devices (one subprocess): stacked layers gathered a layer at a
time inside the scan, with remat and gradient accumulation, train exactly like data
parallelism; the step compiles from abstract sharded inputs (no arrays), and its temporary
memory with scan + remat is below the whole-model gather's."""

import os
import textwrap

import fake_devices
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_EIGHT_DEVICES = textwrap.dedent(
  """
  import json, jax, numpy as np
  from configs import tiny
  from pe_research import sharding, train
  from pe_research.data import make_train_iterator
  from pe_research.stacking import layers_stacked, unstack_layers

  def config_for(data, fsdp, **model):
    config = tiny.get_config("pe=t5")
    config.pe.share_across_layers = False  # Per-layer encodings: stacked into the blocks.
    config.train.update(batch_size=16, warmup_steps=1)
    config.mesh.data, config.mesh.fsdp = data, fsdp
    config.model.update(model)
    return config

  def run(config, steps=3):
    mesh = sharding.make_mesh(config.mesh)
    tx, schedule = train.make_optimizer(config.train)
    graphdef, state = train.create_train_state(config, mesh, tx)
    step_fn = train.jit_train_step(
      graphdef, tx, schedule, state, mesh, grad_accum_steps=config.train.grad_accum_steps
    )
    batches, losses = make_train_iterator(config), []
    for _ in range(steps):
      state, metrics = step_fn(state, sharding.global_batch(next(batches), mesh))
      losses.append(float(metrics["loss"]))
    params = jax.device_get(state.params)
    if not layers_stacked(params):
      return losses, params, None
    stored = state.params["blocks"]["mlp"]["up"]["kernel"].sharding.spec
    return losses, unstack_layers(params), str(stored)

  def temp_bytes(**model):
    # Compiled from abstract sharded inputs: temporaries of one step over the weights' bytes.
    config = tiny.get_config("pe=rope")
    config.model.update(model_dim=256, num_layers=4, num_heads=4, **model)
    config.train.update(batch_size=8, seq_len=16)
    config.mesh.data, config.mesh.fsdp = 1, 8
    mesh = sharding.make_mesh(config.mesh)
    tx, schedule = train.make_optimizer(config.train)
    graphdef, state = train.abstract_train_state(config, mesh, tx)
    spec = jax.ShapeDtypeStruct((8, 16), np.int32, sharding=sharding.batch_sharding(mesh))
    batch = {"inputs": spec, "targets": spec, "weights": spec.update(dtype=np.float32)}
    step = train.jit_train_step(graphdef, tx, schedule, state, mesh)
    memory = step.lower(state, batch).compile().memory_analysis()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    return memory.temp_size_in_bytes / weights, memory.argument_size_in_bytes / weights

  assert jax.device_count() == 8
  dp_losses, dp_params, _ = run(config_for(8, 1))
  fsdp_config = config_for(2, 4, scan_layers=True, remat="full")
  fsdp_config.train.grad_accum_steps = 2
  losses, params, stored = run(fsdp_config)
  diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, dp_params)
  out = dict(
    dp=dp_losses, fsdp=losses, diff=max(jax.tree.leaves(diffs)), stored=stored,
    same_tree=jax.tree.structure(params) == jax.tree.structure(dp_params),
    whole=temp_bytes(), scan_remat=temp_bytes(scan_layers=True, remat="full"),
  )
  print(json.dumps(out))
  """
)


@pytest.fixture(scope="module")
def eight_devices() -> dict:
  return fake_devices.run_json(_EIGHT_DEVICES)


def test_per_layer_fsdp_with_remat_and_accumulation_equals_data_parallelism(eight_devices):
  """data=2 x fsdp=4, stacked layers (weights stored split over fsdp along the model width),
  full remat, two micro-batches of 8: the losses and parameters of 3 steps of data=8."""
  run = eight_devices
  assert run["stored"] == "P(None, 'fsdp', None)", run["stored"]
  assert run["same_tree"]
  np.testing.assert_allclose(run["fsdp"], run["dp"], atol=1e-5, rtol=1e-5)
  assert run["diff"] < 1e-5, run["diff"]


def test_scan_with_remat_needs_less_temporary_memory_than_the_whole_model_gather(eight_devices):
  """XLA's temporaries of one step, over the weights' bytes, fsdp=8, 4 layers of d=256: the
  whole model gathered at the top holds about twice the weights; a scan gathering a layer at a
  time under full remat well under one. The arguments (params and AdamW moments) are 3/8."""
  whole, scan_remat = eight_devices["whole"], eight_devices["scan_remat"]
  assert whole[0] > 1.5, whole
  assert scan_remat[0] < 0.5 * whole[0], (scan_remat, whole)
  np.testing.assert_allclose([whole[1], scan_remat[1]], 3 / 8, rtol=0.01)
