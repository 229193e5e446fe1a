"""The PyTorch reference (benchmarks/torch_reference.py) is the benchmark's JAX model: same
logits and gradients, the same optimizer hyperparameters and learning-rate schedule."""

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import pe_research.encodings  # noqa: F401  (registers every family)
from benchmarks import bench_lib, torch_reference
from benchmarks.torch_reference import TorchTransformer
from pe_research import train
from pe_research.losses import weighted_cross_entropy
from pe_research.model import Transformer


def _jax_and_torch_models(pe: str, d: int = 128, length: int = 64, block: int = 32):
  """The benchmark's JAX model (blockwise attention, heads of 64) and its PyTorch copy."""
  config = bench_lib.model_config(d, 2, length, 2, pe, attention="blockwise", attention_block=block)
  model = Transformer(config, rngs=nnx.Rngs(0))
  m = config.model
  reference = TorchTransformer(
    vocab_size=m.vocab_size, model_dim=d, num_layers=2, num_heads=m.num_heads, pe=pe
  )
  reference.load_jax_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return model, reference


def _jax_loss_and_grads(model, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params):
    logits_BxLxV = nnx.merge(graphdef, params, rest)(batch["inputs"])
    return weighted_cross_entropy(logits_BxLxV, batch["targets"], batch["weights"])

  return jax.value_and_grad(loss_fn)(params)


def _torch_loss_and_grads(reference, batch):
  inputs, targets = (torch.from_numpy(batch[k]).long() for k in ("inputs", "targets"))
  nll = torch.nn.functional.cross_entropy(
    reference(inputs).flatten(0, 1), targets.flatten(), reduction="none"
  )
  weights = torch.from_numpy(batch["weights"]).flatten()
  loss = (nll * weights).sum() / weights.sum()
  loss.backward()
  return loss.item(), {n: p.grad.numpy() for n, p in reference.named_parameters()}


@pytest.mark.parametrize("pe", ["nope", "rope", "alibi", "t5"])
def test_torch_reference_has_the_jax_models_logits_and_gradients(pe):
  """Two heads, two layers, the benchmark's blockwise attention (two blocks); every parameter's
  gradient, matched through the mapping that loads the parameters."""
  model, reference = _jax_and_torch_models(pe)
  batch = bench_lib.random_batch(64, 2, vocab_size=260)
  with torch.no_grad():
    expected = reference(torch.from_numpy(batch["inputs"]).long()).numpy()
  np.testing.assert_allclose(np.asarray(model(batch["inputs"])), expected, rtol=2e-4, atol=2e-5)
  jax_loss, jax_grads = _jax_loss_and_grads(model, batch)
  torch_loss, torch_grads = _torch_loss_and_grads(reference, batch)
  np.testing.assert_allclose(float(jax_loss), torch_loss, rtol=1e-5)
  jax_grads = nnx.to_pure_dict(jax_grads)
  for name, (path, transposed) in reference.jax_paths().items():
    grad = np.asarray(functools.reduce(lambda tree, key: tree[key], path, jax_grads))
    scale = np.abs(grad).max()  # Gradients differ in size by orders of magnitude.
    np.testing.assert_allclose(
      grad.T if transposed else grad, torch_grads[name], rtol=2e-4, atol=2e-5 * scale, err_msg=name
    )
  assert set(reference.jax_paths()) == set(torch_grads)  # every parameter compared


def test_logit_parity_detects_one_perturbed_parameter():
  model, reference = _jax_and_torch_models("t5")
  with torch.no_grad():
    reference.t5_table[3, 1] += 1e-2  # one bucket of one head
  inputs = torch.from_numpy(bench_lib.random_batch(64, 2, vocab_size=260)["inputs"])
  with torch.no_grad():
    perturbed = reference(inputs.long()).numpy()
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(np.asarray(model(inputs.numpy())), perturbed, rtol=2e-4, atol=2e-5)


def test_torch_schedule_is_the_jax_schedule():
  train_cfg = bench_lib.model_config(64, 2, 32, 2, "rope").train
  train_cfg.update(steps=50, warmup_steps=10, lr=3e-3, min_lr_ratio=0.2)
  _, schedule = train.make_optimizer(train_cfg)
  reference = TorchTransformer(vocab_size=260, model_dim=64, num_layers=1, num_heads=1, pe="nope")
  optimizer, _ = torch_reference.make_optimizer(reference, train_cfg)
  lr_schedule = torch.optim.lr_scheduler.LambdaLR(
    optimizer, functools.partial(torch_reference.lr_multiplier, train_cfg)
  )
  for step in range(60):
    np.testing.assert_allclose(optimizer.param_groups[0]["lr"], schedule(step), rtol=1e-5)
    optimizer.step()
    lr_schedule.step()


def test_torch_optimizer_uses_the_configs_hyperparameters():
  train_cfg = bench_lib.model_config(64, 2, 32, 2, "rope").train
  reference = TorchTransformer(vocab_size=260, model_dim=64, num_layers=1, num_heads=1, pe="nope")
  optimizer, kind = torch_reference.make_optimizer(reference, train_cfg)
  decay, no_decay = optimizer.param_groups
  assert kind in ("fused", "foreach") and decay[kind]
  assert decay["betas"] == (train_cfg.b1, train_cfg.b2)
  assert decay["weight_decay"] == train_cfg.weight_decay and no_decay["weight_decay"] == 0.0
  assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
