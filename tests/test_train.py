"""Training: loss falls for every encoding, the optimizer schedule, NaN handling, 8-device
data parallelism, and the command-line run's outputs (config.json, metrics.jsonl)."""

import json
import os
import subprocess
import sys
import textwrap

import fake_devices
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from pe_research import sharding, train
from pe_research.data import make_train_iterator
from pe_research.encodings.registry import encoding_names
from pe_research.losses import softmax_nll, weighted_cross_entropy
from pe_research.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(config, steps: int) -> list[float]:
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = train.make_optimizer(config.train)
  graphdef, state = train.create_train_state(config, mesh, tx)
  step_fn = train.jit_train_step(graphdef, tx, schedule, state, mesh)
  data = make_train_iterator(config)
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, sharding.global_batch(next(data), mesh))
    losses.append(metrics["loss"])
  return [float(x) for x in jax.device_get(losses)]


@pytest.mark.parametrize("name", encoding_names())
def test_loss_falls_on_tiny_config_for_every_encoding(name):
  config = tiny.get_config(f"pe={name}")
  config.train.steps = 40
  losses = _losses(config, 40)
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses


def test_schedule_warms_up_then_decays_to_min_lr():
  config = tiny.get_config()
  t = config.train
  _, schedule = train.make_optimizer(t)
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(t.warmup_steps), t.lr, rtol=1e-6)
  np.testing.assert_allclose(schedule(t.steps), t.lr * t.min_lr_ratio, rtol=1e-6)
  assert schedule(t.warmup_steps + 1) < t.lr


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_nll_matches_optax_in_value_and_gradient(dtype):
  """The fused loss equals optax's on the float32 logits; its gradient is optax's, rounded
  once to the logits' dtype."""
  logits_NxV = (3.0 * jax.random.normal(jax.random.key(0), (37, 61))).astype(dtype)
  targets_N = jax.random.randint(jax.random.key(1), (37,), 0, 61)
  g_N = jax.random.uniform(jax.random.key(2), (37,))
  reference = lambda x: optax.softmax_cross_entropy_with_integer_labels(
    x.astype(jnp.float32), targets_N
  )
  got, got_vjp = jax.vjp(lambda x: softmax_nll(x, targets_N), logits_NxV)
  want, want_vjp = jax.vjp(reference, logits_NxV)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  (got_grad,), (want_grad,) = got_vjp(g_N), want_vjp(g_N)
  assert got_grad.dtype == dtype
  tolerance = 1e-6 if dtype == jnp.float32 else 4e-3  # one bf16 rounding of values <= 1
  np.testing.assert_allclose(
    np.asarray(got_grad, np.float32), np.asarray(want_grad, np.float32), atol=tolerance
  )


def test_weighted_cross_entropy_ignores_zero_weight_tokens():
  logits_BxLxV = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
  targets_BxL = jnp.array([[0, 1]])
  np.testing.assert_allclose(
    weighted_cross_entropy(logits_BxLxV, targets_BxL, jnp.array([[1.0, 0.0]])),
    np.log(2.0),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    weighted_cross_entropy(logits_BxLxV, targets_BxL, jnp.array([[1.0, 1.0]])),
    (np.log(2.0) - np.log(0.1)) / 2,
    rtol=1e-6,
  )


def test_non_finite_step_keeps_parameters_and_optimizer_state():
  config = tiny.get_config()
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = train.make_optimizer(config.train)
  graphdef, state = train.create_train_state(config, mesh, tx)
  before = jax.device_get((state.params, state.opt_state))
  batch = next(make_train_iterator(config))
  batch["weights"][0, 0] = np.nan
  step = jax.jit(train.make_train_step(graphdef, tx, schedule))
  new_state, metrics = step(state, sharding.global_batch(batch, mesh))
  assert not bool(metrics["finite"])
  assert int(new_state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, before, (new_state.params, new_state.opt_state))


def test_accumulated_micro_batches_equal_one_batch():
  """One step on a batch of 8 rows as 8 micro-batches of one row (a lax.scan; sums of w·NLL
  and of w over micro-batches, divided once) equals the step on the whole batch: loss,
  gradient norm, parameters and AdamW moments. Row 1, a whole micro-batch, has zero weight
  (a mean per micro-batch would divide by zero)."""
  config = tiny.get_config("pe=t5")
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = train.make_optimizer(config.train)
  graphdef, state = train.create_train_state(config, mesh, tx)
  batch = sharding.global_batch(next(make_train_iterator(config)), mesh)
  batch["weights"] = batch["weights"].at[1].set(0.0)
  state = state.replace(step=jnp.ones((), jnp.int32))  # A learning rate > 0.
  steps = [train.make_train_step(graphdef, tx, schedule, mesh, k) for k in (1, 8)]
  results = jax.jit(lambda state, batch: [step(state, batch) for step in steps])(state, batch)
  (want_state, want), (got_state, got) = jax.device_get(results)
  assert np.isfinite(got["loss"])
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  jax.tree.map(close, got_state.params, want_state.params)
  jax.tree.map(close, got_state.opt_state, want_state.opt_state)


def test_kerple_parameter_below_its_bound_gets_a_gradient_and_is_projected_after_a_step():
  """KERPLE's bounds are a projection after the optimizer step, not a clamp in the forward pass
  (which zeroed the gradient below the bound and froze the parameter there)."""
  config = tiny.get_config("pe=kerple")
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = train.make_optimizer(config.train)
  graphdef, state = train.create_train_state(config, mesh, tx)
  params = jax.device_get(state.params)
  for name in ("r1", "r2"):  # Below the bound 1e-2, as a step without projection could leave.
    params["encodings"][0][name] = np.full_like(params["encodings"][0][name], 1e-3)
  state = state.replace(params=params)
  batch = sharding.global_batch(next(make_train_iterator(config)), mesh)

  def loss(params):
    model = nnx.merge(graphdef, params, state.model_state)
    logits_BxLxV = model(batch["inputs"], train=True)
    return weighted_cross_entropy(logits_BxLxV, batch["targets"], batch["weights"])

  grads = jax.grad(loss)(state.params)["encodings"][0]
  assert (np.abs(grads["r1"]) > 0).all() and (np.abs(grads["r2"]) > 0).all()
  new_state, _ = jax.jit(train.make_train_step(graphdef, tx, schedule))(state, batch)
  for name in ("r1", "r2"):
    assert (np.asarray(new_state.params["encodings"][0][name]) >= 1e-2).all(), name


_EIGHT_DEVICES = textwrap.dedent(
  """
  import jax, numpy as np
  from configs import tiny
  from pe_research import sharding, train
  from pe_research.data import make_train_iterator

  def run(devices, fsdp, steps_per_call=1):
    config = tiny.get_config("pe=alibi")
    config.mesh.fsdp = fsdp
    mesh = sharding.make_mesh(config.mesh, devices)
    tx, schedule = train.make_optimizer(config.train)
    graphdef, state = train.create_train_state(config, mesh, tx)
    step_fn = train.jit_train_step(graphdef, tx, schedule, state, mesh, steps_per_call)
    data, losses = make_train_iterator(config), []
    if steps_per_call == 3:  # One call of three steps, batches stacked on a leading axis.
      local = [next(data) for _ in range(3)]
      stacked = {k: np.stack([b[k] for b in local]) for k in local[0]}
      state, metrics = step_fn(state, sharding.global_batch(stacked, mesh, stacked=True))
      return np.array(metrics["loss"]), jax.device_get(state.params)
    for _ in range(3):
      state, metrics = step_fn(state, sharding.global_batch(next(data), mesh))
      losses.append(metrics["loss"])
    return np.array(losses), jax.device_get(state.params)

  assert jax.device_count() == 8
  loss_1, params_1 = run(jax.devices()[:1], 1)
  for fsdp, steps_per_call in ((1, 1), (2, 1), (2, 3)):
    loss_8, params_8 = run(jax.devices(), fsdp, steps_per_call)
    np.testing.assert_allclose(loss_8, loss_1, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 params_8, params_1)
  print("OK")
  """
)


def test_eight_device_steps_equal_one_device_steps():
  """Data parallel, FSDP, and FSDP with three steps per call: the single-device steps."""
  assert "OK" in fake_devices.run(_EIGHT_DEVICES)


def test_main_writes_config_metrics_and_tensorboard(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
    [
      sys.executable, "-m", "pe_research.main", "--config=configs/tiny.py:pe=t5",
      f"--workdir={workdir}", "--config.train.steps=6", "--config.train.log_every=2",
      "--config.train.seq_len=24",
    ],
    cwd=REPO, capture_output=True, text=True,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  assert not [line for line in result.stderr.splitlines() if line.startswith("I1")]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["pe"]["name"] == "t5" and saved["train"]["steps"] == 6
  assert saved["pe"]["train_len"] == saved["train"]["seq_len"] == 24
  assert saved["backend"]["platform"] == "cpu" and saved["backend"]["cpu_matmul"]  # What ran.
  records = read_metrics(str(workdir))
  assert [r["step"] for r in records] == [2, 4, 6]
  for record in records:
    assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second"} <= record.keys()
    assert record["tokens_per_second"] > 0
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))


def test_steps_per_call_runs_the_same_steps(tmp_path):
  """Three steps per call (a lax.scan) are three single steps: the same records and parameters;
  calls end at log and checkpoint steps and at the end (K=3, logs at 4 and 8, save at 8, end at
  11: calls 1-3, 4, 5-7, 8, 9-11)."""

  def run(steps_per_call: int):
    config = tiny.get_config("pe=rope")
    config.pe.randomized = True  # Positions drawn from RNG state carried through the scan.
    config.train.update(steps=11, log_every=4, checkpoint_every=8, steps_per_call=steps_per_call)
    workdir = str(tmp_path / str(steps_per_call))
    state = train.train(config, workdir)
    return workdir, read_metrics(workdir), jax.device_get(state)

  _, records_1, state_1 = run(1)
  workdir, records_3, state_3 = run(3)
  assert [r["step"] for r in records_3] == [r["step"] for r in records_1] == [4, 8, 11]
  for one, three in zip(records_1, records_3, strict=True):
    for key in ("loss", "grad_norm", "learning_rate"):
      np.testing.assert_allclose(three[key], one[key], rtol=1e-5, err_msg=key)
  assert int(state_3.step) == 11
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, state_3.params, state_1.params)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["11", "8"]


def test_fetch_splits_stacked_metrics_and_names_the_non_finite_step():
  stacked = {
    "loss": np.array([1.0, np.nan, 2.0]),
    "finite": np.array([True, False, True]),
    "grad_norm": np.ones(3),
  }
  single = {"loss": np.float32(3.0), "finite": np.bool_(True), "grad_norm": np.float32(1.0)}
  records = train._fetch([single, stacked], 4, "skip", None)  # Steps 4 and 5-7.
  np.testing.assert_array_equal([r["loss"] for r in records], [3.0, 1.0, np.nan, 2.0])
  assert [bool(r["finite"]) for r in records] == [True, True, False, True]
  with pytest.raises(train.DivergenceError, match="step 6:"):
    train._fetch([single, stacked], 4, "stop", None)
