"""The Pallas attention kernel (interpreted on the CPU) computes dense attention for every
encoding: outputs and the gradients of q, k, v and of the encoding's parameters."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import get_config
from pe_research import backend
from pe_research.attention import attend
from pe_research.encodings.registry import build_encoding
from pe_research.kernels import pallas_attention, pallas_blocks

B, H, E, BLOCK = 2, 4, 8, 8
LENGTH = 3 * BLOCK + 5  # 4 blocks per side, the last one ragged
YARN = json.dumps({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})

# case: (pe fields of one encoding or of several that share a kernel, KV heads G). G = 2 of
# H = 4 unless said: Y = 2 query heads per block row. Encodings that differ only in how they
# rotate q and k (no bias; the same window) are stacked along the batch of one call.
ROPE_NEAR = dict(name="rope", rope_scaling=YARN, logn_len=16)
ROTATIONS = [dict(name="nope"), ROPE_NEAR, dict(name="xpos")]
CASES = {
  "nope_rope_yarn_logn_xpos": (ROTATIONS, 2),
  "splash_nope_rope_yarn_logn_xpos": (ROTATIONS, 2),  # JAX's splash kernel, L padded to 128
  # W = 10 with 8-blocks: block pairs δ = 0 near, δ = 1, 2 mixed, δ = 3 far.
  "self_extend_logn_rerope": (
    [dict(ROPE_NEAR, self_extend_window=10, self_extend_group=3), dict(rerope_window=10)],
    2,
  ),
  "alibi_mha": ([dict(name="alibi")], 4),  # G = H: one head per block row
  "kerple_log": ([dict(name="kerple", kerple_variant="log")], 2),
  "kerple_power": ([dict(name="kerple", kerple_variant="power")], 2),
  # T5 and FIRE at [B, L] positions, PoSE and randomized draws (one per row), G = 1 (MQA).
  "t5_pose": ([dict(name="t5", t5_num_buckets=8, t5_max_distance=20, pose_target_len=90)], 1),
  "fire_randomized": (
    [dict(name="fire", fire_hidden=4, fire_l_thr_init=6.0, randomized=True, max_random_len=70)],
    1,
  ),
}


def _encoding(fields, heads=H):
  pe = get_config().pe
  pe.update(dict(dict(name="rope"), **fields))
  return build_encoding(pe, num_heads=heads, head_dim=E, model_dim=16, rngs=nnx.Rngs(0))


def _attention(encs, impl, q, k, v, pos_BxL, block=BLOCK):
  """Attention as the model calls it (rotated q, k, the far set, the encoding's bias), for
  each encoding of ``encs`` (one bias and window among them), stacked along the batch."""
  enc = encs[0]
  sets = []
  for e in encs:
    rotated = [e.rotate(q, pos_BxL, is_query=True), e.rotate(k, pos_BxL, is_query=False)]
    if enc.window is not None:
      rotated += [e.rotate_far(q, pos_BxL, is_query=True), e.rotate_far(k, pos_BxL, is_query=False)]
    sets.append(rotated)
  q, k, *far = (jnp.concatenate(xs, axis=0) for xs in zip(*sets, strict=True))
  if far:
    far = dict(q_far_BxLxHxE=far[0], k_far_BxLxGxE=far[1], window=enc.window)
  stack = lambda x: jnp.concatenate([x] * len(encs), axis=0)
  return attend(
    q,
    k,
    stack(v),
    q_pos_BxL=pos_BxL if pos_BxL.shape[0] == 1 else stack(pos_BxL),
    k_pos_BxL=pos_BxL if pos_BxL.shape[0] == 1 else stack(pos_BxL),
    bias_fn=enc.bias if enc.has_bias else None,
    impl=impl,
    block_size=block,
    **(far or {}),
  )


def _out_and_grads(impl, encs, qkv, pos_BxL, cotangent, block=BLOCK):
  """Output, gradients of q, k, v and of the first encoding's parameters (leaves), one jit."""
  graphdef, params, rest = nnx.split(encs[0], nnx.Param, ...)

  def loss(params, qkv):
    encs_now = [nnx.merge(graphdef, params, rest), *encs[1:]]
    out = _attention(encs_now, impl, *qkv, pos_BxL, block)
    return jnp.sum(out * cotangent), out

  (dparams, dqkv), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, qkv)
  return out, [*dqkv, *jax.tree.leaves(dparams)]


def check_equals_dense(case, fields, kv_heads, heads=H, length=LENGTH, block=BLOCK):
  """fp32: output and gradients of q, k, v and the bias parameters equal dense attention's
  to 1e-5, for the encodings ``fields`` with ``kv_heads`` of ``heads``."""
  encs = [_encoding(f, heads) for f in fields]
  pos_BxL = encs[0].positions(B, length, train=True)
  keys = jax.random.split(jax.random.key(1), 4)
  qkv = [jax.random.normal(keys[0], (B, length, heads, E))]
  qkv += [jax.random.normal(key, (B, length, kv_heads, E)) for key in keys[1:3]]
  cotangent = jax.random.normal(keys[3], (B * len(encs), length, heads, E))
  impl = "splash" if case.startswith("splash") else "pallas"
  out, grads = _out_and_grads(impl, encs, qkv, pos_BxL, cotangent, block)
  out_ref, grads_ref = _out_and_grads("dense", encs, qkv, pos_BxL, cotangent, block)
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  learned = encs[0].has_bias and not case.startswith("alibi")
  assert len(grads) == len(grads_ref) == 3 + learned * len(grads[3:]) and len(grads) > 3 * learned
  for got, expected in zip(grads, grads_ref, strict=True):
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_pallas_equals_dense_forward_and_every_gradient(case):
  """The TPU (Mosaic) kernel, interpreted: L = 29 in 8-blocks (4 per side, the last ragged)."""
  check_equals_dense(case, *CASES[case])


def test_block_pair_kinds_follow_the_window_rule():
  """Near / far / mixed per block pair (a, c) as the kernel decides it equals the brute-force
  rule over the pair's visible (i, j): near if every i − j < W, far if every i − j >= W; the
  GPU kernel's loop bounds (``kind_ranges``, from a query block or from a key block) visit
  each visible pair once, as the same kind."""
  p, n = 4, 8
  for window in (None, 1, 3, 4, 5, 9, 30):
    config = pallas_blocks.Config(p, 1, n, window, None, 0, window is not None, 1, True)
    by_query, by_key = {}, {}
    for x in range(n):
      for kind, lo, hi in config.kind_ranges(x, key_major=False):
        by_query.update({(x, c): kind for c in range(int(lo), int(hi))})
      for kind, lo, hi in config.kind_ranges(x, key_major=True):
        by_key.update({(a, x): kind for a in range(int(lo), int(hi))})
    for a in range(n):
      for c in range(n):
        kinds = [k for k, cond in config.pair_kinds(a, c) if bool(cond)]
        d = [i - j for i in range(a * p, a * p + p) for j in range(c * p, c * p + p) if j <= i]
        w = window or 10**9
        want = [] if not d else [0] if max(d) < w else [1] if min(d) >= w else [2]
        assert kinds == want, (window, a, c)
        assert [k for k in (by_query.get((a, c)),) if k is not None] == want, (window, a, c)
        assert [k for k in (by_key.get((a, c)),) if k is not None] == want, (window, a, c)


def test_index_maps_copy_only_visible_block_pairs():
  """Over the grid of n = 5 blocks per side, the steps whose operand blocks differ from the
  previous step's (the steps that copy anything) are the n (n + 1) / 2 visible pairs, in the
  query-major (forward, dq) and key-major (dk, dv) grids."""
  n, p = 5, 8
  config = pallas_blocks.Config(p, 2, n, None, None, 0, False, 1, True)
  q, k = (jax.ShapeDtypeStruct((1, heads, n * p, E), jnp.float32) for heads in (4, 2))
  for key_major in (False, True):
    specs = pallas_attention._in_specs(config, q, k, (), key_major, backward=True)
    copies = 0
    for i in range(n):
      previous = None
      for j in range(n):
        blocks = [tuple(int(x) for x in spec.index_map(0, 0, i, j)) for spec in specs]
        copies += blocks != previous
        previous = blocks
    assert copies == n * (n + 1) // 2


def test_bias_without_kernel_form_or_splash_with_a_bias_is_a_value_error():
  q = jnp.zeros((1, 4, 2, E))
  pos = jnp.arange(4)[None]
  bias_fn = lambda qp, kp: None
  with pytest.raises(ValueError, match="model.attention='pallas' needs the bias as an encoding"):
    attend(q, q, q, q_pos_BxL=pos, k_pos_BxL=pos, bias_fn=bias_fn, impl="pallas")
  with pytest.raises(ValueError, match="model.attention='splash' takes no bias and one logit"):
    attend(q, q, q, q_pos_BxL=pos, k_pos_BxL=pos, bias_fn=bias_fn, impl="splash")


def test_policy_interprets_kernels_off_tpu_and_picks_fast_attention(use_policy):
  """Per platform: Pallas compiled on TPU (Mosaic) and GPU (Triton), interpreted on the CPU
  (splash, a Mosaic kernel, interpreted on GPU too); ``model.attention="fast"`` is splash or
  the Pallas kernel on TPU, cuDNN (xla) or blockwise on GPU, blockwise on the CPU, and attend
  follows the policy's choice for encodings with and without a bias (recorded in config.json's
  backend)."""
  choices = {
    "tpu": (False, "mosaic", False, ("splash", "pallas")),
    "gpu": (False, "triton", True, ("xla", "blockwise")),
    "cpu": (True, "mosaic", True, ("blockwise", "blockwise")),
  }
  for platform, (interpret, lowering, splash_interpreted, fast) in choices.items():
    policy = backend.Policy.for_platform(platform, 2, 1)
    recorded = json.loads(json.dumps(policy.to_dict()))  # as config.json holds it
    assert (recorded["pallas_interpret"], recorded["pallas_lowering"]) == (interpret, lowering)
    assert policy.interprets("mosaic") == splash_interpreted
    assert (recorded["fast_attention_plain"], recorded["fast_attention_bias"]) == fast
  use_policy(fast_attention_plain="xla", fast_attention_bias="pallas")
  q = jnp.zeros((1, 16, 4, E))
  pos = jnp.arange(16)[None]

  def traced(bias_fn):
    fn = lambda q: attend(q, q, q, q_pos_BxL=pos, k_pos_BxL=pos, bias_fn=bias_fn, impl="fast")
    return str(jax.make_jaxpr(fn)(q))

  assert "pallas_call" in traced(_encoding(dict(name="alibi")).bias)
  assert "pallas_call" not in traced(None)
