"""The Pallas attention kernel's GPU form (``kernels/pallas_gpu.py``). Interpreted on the CPU,
it computes dense attention for every encoding: the output and every gradient. Lowered for
CUDA with ``jax.export`` (no GPU needed), the forward and backward of every encoding become
Triton kernels."""

import jax
import jax.numpy as jnp
import pytest
from jax import export
from test_pallas_attention import CASES, _encoding, check_equals_dense

from benchmarks import kernel_check
from pe_research.kernels import pallas_attention

BLOCK = 16  # Triton's smallest matmul side
LENGTH = 5 * BLOCK + 5  # 6 blocks per side, the last one ragged
HEADS = 6
WINDOW = 20  # with 16-blocks: δ = 0 near, δ = 1, 2 mixed, δ >= 3 far
# KV heads of CASES' 4 query heads -> of 6: G = 2 (Y = 3, not a power of two), MHA, MQA.
KV_HEADS = {2: 2, 4: HEADS, 1: 1}


# CASES' fields at this length: the far set's window W, randomized positions drawn up to 250.
LONGER = {"self_extend_window": WINDOW, "rerope_window": WINDOW, "max_random_len": 250}


def _gpu_case(case):
  fields, kv_heads = CASES[case]
  return [{k: LONGER.get(k, v) for k, v in f.items()} for f in fields], KV_HEADS[kv_heads]


# Every case of the TPU kernel's test but splash and KERPLE's log form (the same kernel path as
# its power form here: the two differ only inside the bias function).
GPU_CASES = [c for c in CASES if not c.startswith("splash") and c != "kerple_log"]


@pytest.mark.parametrize("case", GPU_CASES)
def test_triton_form_equals_dense_forward_and_every_gradient(case, use_policy):
  """fp32, L = 85 in 16-blocks, E = 8 padded to 16 in the kernel, the parameters padded to
  power-of-two sides: output and gradients of q, k, v, the bias parameters equal dense's."""
  use_policy(pallas_lowering="triton")
  check_equals_dense(case, *_gpu_case(case), heads=HEADS, length=LENGTH, block=BLOCK)


def _lowered(fields, length=200, heads=6, kv_heads=2, head_dim=80, block=64) -> str:
  """StableHLO of the bf16 loss's gradient (q, k, v, bias parameters) through the Triton form,
  exported for CUDA on this host."""
  enc = _encoding(fields, heads)
  q = jnp.zeros((2, length, heads, head_dim), jnp.bfloat16)
  k = jnp.zeros((2, length, kv_heads, head_dim), jnp.bfloat16)
  pos = jnp.arange(length)[None]
  kernel_bias = enc.kernel_bias() if enc.has_bias else None

  def loss(q, k, v, params):
    bias = None if kernel_bias is None else type(kernel_bias)(kernel_bias.fn, params)
    far = None if enc.window is None else (q, k)
    out = pallas_attention.pallas_attention(
      q, k, v, pos, pos, bias, block, far=far, window=enc.window, lowering="triton"
    )
    return jnp.sum(out.astype(jnp.float32))

  params = () if kernel_bias is None else kernel_bias.params
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  return export.export(grad, platforms=["cuda"], disabled_checks=[triton])(q, k, k, params)


LOWERED = kernel_check.CASES  # the cases make bench-gpu checks on a GPU


@pytest.mark.parametrize("name", LOWERED)
def test_every_encoding_lowers_to_triton_forward_and_backward(name):
  """bf16, L = 200 (ragged in 64-blocks), H = 6 over G = 2, E = 80 (padded to 128): the
  gradient's module holds the three kernels as Triton calls (forward, dq, dk/dv)."""
  text = _lowered(LOWERED[name]).mlir_module()
  assert text.count("__gpu$xla.gpu.triton") == 3
  for kernel in ("pe_forward_kernel", "pe_dq_kernel", "pe_dkv_kernel"):
    assert f'name = "{kernel}' in text, kernel


def test_triton_block_must_be_a_power_of_two():
  q = jnp.zeros((1, 40, 2, 16))
  pos = jnp.arange(40)[None]
  with pytest.raises(ValueError, match="model.attention_block=24 must be a power of two"):
    pallas_attention.pallas_attention(q, q, q, pos, pos, None, 24, lowering="triton")
  with pytest.raises(ValueError, match="lowering='cuda'; allowed: 'mosaic', 'triton'"):
    pallas_attention.pallas_attention(q, q, q, pos, pos, None, 16, lowering="cuda")
