"""The backend policy: every tuned kernel computes what its reference form computes, the
policy is chosen from the platform, and a run records it."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from pe_research import backend, workdirs
from pe_research import model as model_lib

CPU = backend.Policy.for_platform("cpu", cores=2, local_devices=1)


def test_policy_is_chosen_from_the_platform():
  """The CPU gets every XLA:CPU form; a GPU gets the reference forms with bf16 matmul outputs,
  cuDNN as its fast attention without a bias and the Pallas kernel compiled by Triton; several
  CPU devices (data parallel) get no batch pieces; the process policy is this one."""
  assert CPU.float32_activations and CPU.cpu_matmul and CPU.attention_batch_pieces == 2
  gpu = backend.Policy.for_platform("gpu", cores=16, local_devices=1)
  assert gpu == dataclasses.replace(
    backend.Policy.reference("gpu"),
    low_precision_matmul_output=True,
    fast_attention_plain="xla",
    pallas_interpret=False,
    pallas_lowering="triton",
  )
  assert backend.Policy.for_platform("cpu", cores=8, local_devices=8).attention_batch_pieces == 1
  assert backend.policy().platform == jax.default_backend()
  assert json.loads(json.dumps(backend.policy().to_dict()))["platform"] == jax.default_backend()


def test_activation_dtype_follows_the_policy(use_policy):
  use_policy(**dataclasses.asdict(CPU))
  assert backend.activation_dtype(jnp.bfloat16) == jnp.float32
  use_policy(reference=True)
  assert backend.activation_dtype(jnp.bfloat16) == jnp.bfloat16


@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("d,f", [(8, 24), (24, 8)])  # dW from x^T g, and from (g^T x)^T
@pytest.mark.parametrize("cpu_forms", [True, False])
def test_matmul_values_and_gradients(use_policy, cpu_forms, w_transposed, d, f):
  """``backend.matmul`` (custom VJP; with the CPU forms, transposed row-major copies) equals
  ``jnp.dot``'s value and autodiff gradients in float32, and is within bf16 rounding of them
  with bf16 ``x``; ``dW`` is float32 either way, and bf16 for a bf16 ``W`` (weights cast before an
  FSDP gather, ``model.gather_dtype``: a custom VJP's cotangent has its primal's dtype)."""
  use_policy(cpu_matmul=cpu_forms)
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x_NxD = jax.random.normal(kx, (40, d))
  w = jax.random.normal(kw, (f, d) if w_transposed else (d, f))
  g_NxF = jax.random.normal(kg, (40, f))
  reference = lambda x, w: jnp.dot(x, w.T if w_transposed else w)
  expected_y, vjp = jax.vjp(reference, x_NxD, w)
  expected_dx, expected_dw = vjp(g_NxF)
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    fn = jax.jit(lambda x, w: backend.matmul(x, w, jnp.float32, w_transposed))
    y, vjp = jax.vjp(fn, x_NxD.astype(dtype), w)
    dx, dw = vjp(g_NxF)
    assert dx.dtype == dtype and dw.dtype == jnp.float32 and dw.shape == w.shape
    for got, want in ((y, expected_y), (dx, expected_dx), (dw, expected_dw)):
      scale = float(np.abs(want).max())
      np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol * scale)
  # float32 x, bf16 operands: the forward is the product of the rounded operands, and dx comes
  # back in float32 (the product g W^T of rounded operands, not rounded again).
  fn = jax.jit(lambda x, w: backend.matmul(x, w, jnp.float32, w_transposed, jnp.bfloat16))
  y, vjp = jax.vjp(fn, x_NxD, w)
  dx, dw = vjp(g_NxF)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  round_ = lambda a: np.asarray(a.astype(jnp.bfloat16), np.float32)
  np.testing.assert_allclose(y, reference(round_(x_NxD), round_(w)), rtol=1e-5, atol=1e-5)
  w_DxF = round_(w).T if w_transposed else round_(w)
  np.testing.assert_allclose(dx, round_(g_NxF) @ w_DxF.T, rtol=1e-5, atol=1e-5)
  _, vjp = jax.vjp(fn, x_NxD, w.astype(jnp.bfloat16))
  dw_bf16 = vjp(g_NxF)[1]
  assert dw_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dw_bf16, np.float32), round_(dw), rtol=1e-2, atol=1e-5)


def test_batch_pieces_divide_the_batch_up_to_the_policy(use_policy):
  use_policy(attention_batch_pieces=4)
  assert [backend.batch_pieces(b) for b in (1, 2, 3, 6, 7, 8, 16)] == [1, 2, 3, 3, 1, 4, 4]
  use_policy(attention_batch_pieces=1)
  assert backend.batch_pieces(16) == 1


def test_materialised_tables_are_the_tables(use_policy):
  """The identity matmul is exact in float32."""
  cos_LxR, sin_LxR = jax.random.normal(jax.random.key(0), (2, 1, 37, 16)) * 1e3
  use_policy(materialise_tables=True)
  got = jax.jit(backend.materialised)(cos_LxR, sin_LxR)
  for table, want in zip(got, (cos_LxR, sin_LxR), strict=True):
    np.testing.assert_array_equal(table, want)


def test_lookup_columns_by_matmul_equals_the_gather(use_policy):
  """Value exactly and gradient to rounding, one-hot matmul against gather."""
  table_ZxH = jax.random.normal(jax.random.key(0), (8, 3))
  index = jax.random.randint(jax.random.key(1), (2, 5, 7), 0, 8)
  cotangent = jax.random.normal(jax.random.key(2), (3, 2, 5, 7))

  def value_and_grad(by_matmul):
    use_policy(lookup_by_matmul=by_matmul)
    f = jax.jit(lambda t: backend.lookup_columns(t, index))
    return f(table_ZxH), jax.grad(lambda t: jnp.sum(f(t) * cotangent))(table_ZxH)

  (value_m, grad_m), (value_g, grad_g) = value_and_grad(True), value_and_grad(False)
  assert value_m.shape == (3, 2, 5, 7)
  np.testing.assert_array_equal(value_m, value_g)
  np.testing.assert_array_equal(value_g, np.moveaxis(np.asarray(table_ZxH)[index], -1, 0))
  np.testing.assert_allclose(grad_m, grad_g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_sum_leading_is_the_sum(use_policy, rows):
  x = jax.random.normal(jax.random.key(rows), (rows, 3, 4))
  use_policy(pairwise_sum_leading=True)
  got = jax.jit(backend.sum_leading)(x)
  np.testing.assert_allclose(got, jnp.sum(x, axis=0, keepdims=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pe,attention", [("rope", "dense"), ("t5", "blockwise"), ("alibi", "xla")])
def test_model_under_the_cpu_policy_equals_the_reference(use_policy, pe, attention):
  """The same model (float32) under the CPU policy and under the reference policy (every
  formula as written): the same loss and gradients to float32 rounding."""
  config = tiny.get_config(f"pe={pe}")
  config.model.attention = attention
  config.model.attention_block = 8
  inputs_BxL = jax.random.randint(jax.random.key(1), (4, 32), 0, 256)

  def loss_and_grads():
    model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
    loss = lambda m: jnp.mean(m.nll_and_hits(inputs_BxL, jnp.roll(inputs_BxL, -1, 1))[0])
    loss_value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    return loss_value, jax.tree.leaves(nnx.state(grads))

  use_policy(**dataclasses.asdict(dataclasses.replace(CPU, attention_batch_pieces=2)))
  tuned = loss_and_grads()
  use_policy(reference=True)
  reference = loss_and_grads()
  np.testing.assert_allclose(tuned[0], reference[0], rtol=1e-6)
  for got, want in zip(tuned[1], reference[1], strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_run_records_its_policy_and_resumes_under_another(tmp_path):
  """``config.json`` holds the policy that ran (``"backend"``); a run recorded under another
  policy (another machine) resumes: the policy is not part of the config."""
  config = tiny.get_config()
  workdirs.record_config(str(tmp_path), config, write=True)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["backend"] == backend.policy().to_dict()
  saved["backend"] = backend.Policy.reference("gpu").to_dict()
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdirs.record_config(str(tmp_path), config, write=True)
  config.train.lr = 0.5
  with pytest.raises(ValueError, match="train.lr"):
    workdirs.record_config(str(tmp_path), config, write=False)
