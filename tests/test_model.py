"""The transformer with every registered encoding: causal, any length, any attention impl."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core

from configs import base
from pe_research import losses
from pe_research import model as model_lib
from pe_research.encodings.registry import encoding_names
from pe_research.model import Transformer, with_attention
from pe_research.model_size import count_params, flops_per_token

ENCODINGS = encoding_names()  # Every family in the registry gets the model-level tests below.
TRAIN_LEN = 8


def _config(pe="nope", **model):
  config = base.get_config()
  config.model.update(
    {"num_layers": 1, "model_dim": 16, "num_heads": 2, "attention_block": 8, **model}
  )
  config.pe.name = pe
  config.train.seq_len = TRAIN_LEN
  config.pe.max_len = 2 * TRAIN_LEN
  config.pe.max_random_len = 8 * TRAIN_LEN
  config.pe.fire_l_thr_init = float(TRAIN_LEN)
  config.pe.xpos_gamma = 16.0
  return config


def _model(config, seed=0):
  return Transformer(config, rngs=nnx.Rngs(seed))


def _inputs(length, batch=2, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 260, dtype=jnp.int32)


def _jit_logits(models, inputs_BxL, train=False):
  """Logits of each model, all compiled as one program (one compile is cheaper than many)."""
  graphdefs, states = zip(*(nnx.split(model) for model in models), strict=True)

  @jax.jit
  def forward(states, x):
    return [nnx.merge(g, s)(x, train=train) for g, s in zip(graphdefs, states, strict=True)]

  return forward(states, inputs_BxL)


@pytest.mark.parametrize("pe", ENCODINGS)
def test_no_position_depends_on_a_later_one_and_jit_matches_eager(pe):
  """d logits[t] / d x[t'] is exactly zero for t' > t and nonzero for t' <= t."""
  model = _model(_config(pe))
  inputs_BxL = _inputs(TRAIN_LEN, batch=1)
  x_BxLxD, pos_BxL = model.embed_tokens(inputs_BxL)
  w_V = jax.random.normal(jax.random.key(1), (260,))
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits_and_jacobian(state, inputs_BxL, x_BxLxD):
    model = nnx.merge(graphdef, state)
    jacobian = jax.jacrev(lambda x: model.decode(x, pos_BxL)[0] @ w_V)(x_BxLxD)
    return model(inputs_BxL), jacobian

  logits, jacobian_LxBxLxD = logits_and_jacobian(state, inputs_BxL, x_BxLxD)
  norms_LxL = np.linalg.norm(np.asarray(jacobian_LxBxLxD)[:, 0], axis=-1)
  assert np.all(norms_LxL[np.triu_indices(TRAIN_LEN, k=1)] == 0.0)
  assert np.all(norms_LxL[np.tril_indices(TRAIN_LEN)] > 0.0)
  np.testing.assert_allclose(logits, model(inputs_BxL), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pe", ENCODINGS)
def test_long_evaluation_agrees_across_attention_implementations_and_bfloat16(pe):
  """At 4x the training length (learned: its table size), dense = blockwise = xla to 1e-5;
  bf16 compute is close to fp32."""
  model = _model(_config(pe))
  bf16_model = _model(_config(pe, compute_dtype="bfloat16"))  # same seed: same parameters
  length = min(4 * TRAIN_LEN, model.encodings[0].max_length or 4 * TRAIN_LEN)
  models = [model, with_attention(model, "blockwise"), with_attention(model, "xla"), bf16_model]
  dense, blockwise, xla, bf16 = _jit_logits(models, _inputs(length))
  assert dense.shape == (2, length, 260) and dense.dtype == jnp.float32
  assert np.all(np.isfinite(dense))
  np.testing.assert_allclose(blockwise, dense, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(xla, dense, atol=1e-5, rtol=1e-5)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, dense, atol=5e-3)  # |logits| ~ 0.4


def test_learned_positions_beyond_the_table_are_a_clear_error():
  model = _model(_config("learned"))
  with pytest.raises(ValueError, match="pe.max_len"):
    model(_inputs(4 * TRAIN_LEN))


def test_blockwise_training_gradients_equal_dense():
  """Gradients of the loss w.r.t. every parameter (encoding's too) match across impls."""
  model = _model(_config("kerple", attention_block=4))
  inputs_BxL = _inputs(10)

  def grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      logits_BxLxV = nnx.merge(graphdef, params, rest)(inputs_BxL)
      return -jnp.mean(jax.nn.log_softmax(logits_BxLxV)[..., 0])

    return jax.jit(jax.grad(loss))(params)

  dense = grads(model)
  blockwise = grads(with_attention(model, "blockwise"))
  for got, expected in zip(jax.tree.leaves(blockwise), jax.tree.leaves(dense), strict=True):
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-4)


def test_variants_run_and_count_parameters():
  """swiglu + rmsnorm + untied + one encoding per layer (kerple: 2 params/head) + randomized."""
  config = _config(
    "kerple",
    num_layers=2,
    mlp="swiglu",
    norm="rmsnorm",
    tie_embeddings=False,
    attention="blockwise",
  )
  config.pe.share_across_layers = False
  config.pe.randomized = True
  model = _model(config)
  (logits,) = _jit_logits([model], _inputs(3 * TRAIN_LEN), train=True)
  assert logits.shape == (2, 3 * TRAIN_LEN, 260) and np.all(np.isfinite(logits))
  d, f, v, layers, heads = 16, 64, 260, 2, 2  # swiglu: 8/3 * 16 = 42 -> 64
  per_layer = 2 * d + 4 * d * d + 3 * d * f + 2 * heads
  assert count_params(model) == 2 * v * d + layers * per_layer + d


def test_with_attention_shares_parameters():
  model = _model(_config("alibi"))
  view = with_attention(model, "blockwise", block_size=4)
  assert (view.attention, view.attention_block) == ("blockwise", 4)
  assert model.attention == "dense"
  assert view.embed.embedding[...] is model.embed.embedding[...]


def test_flops_per_token_counts_matmuls_and_causal_attention():
  config = _config(num_layers=2)  # D=16, H*E=16, F=64, V=260
  n = 2 * (4 * 16 * 16 + 2 * 16 * 64) + 16 * 260
  assert flops_per_token(config, 8) == 6 * n + 6 * 2 * 16 * 9


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("norm", "batchnorm", "model.norm='batchnorm'.*layernorm, rmsnorm"),
    ("mlp", "relu", "model.mlp='relu'.*gelu, swiglu"),
    ("attention", "flash", "model.attention='flash'.*dense, blockwise, xla"),
    ("compute_dtype", "float16", "model.compute_dtype='float16'"),
  ],
)
def test_bad_model_config_is_a_one_line_value_error(field, value, match):
  with pytest.raises(ValueError, match=match):
    _model(_config(**{field: value}))


def test_long_sequences_run_mlp_and_head_in_chunks_with_the_same_values(monkeypatch):
  """With SEQUENCE_CHUNK = 8, a length-21 input (3 chunks, the last padded) gives the same
  logits, and ``nll_and_hits`` equals NLL/argmax computed from the full logits, over the whole
  vocabulary and over VOCAB_CHUNK = 100 (3 chunks, the last one ragged). A training forward
  (``train=True``) runs the MLP unchunked (no ``lax.map`` in its graph) with the same logits."""
  model = _model(_config("alibi"))
  inputs_BxL, targets_BxL = _inputs(21), _inputs(21, seed=1)
  full = model(inputs_BxL)
  monkeypatch.setattr(model_lib, "SEQUENCE_CHUNK", 8)
  np.testing.assert_allclose(model(inputs_BxL), full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(model(inputs_BxL, train=True), full, atol=1e-5, rtol=1e-5)
  maps = lambda train: str(jax.make_jaxpr(lambda x: model(x, train=train))(inputs_BxL)).count(
    "scan["
  )
  assert (maps(False), maps(True)) == (1, 0)  # One layer: one MLP map, outside training only.
  logp_BxLxV = jax.nn.log_softmax(full)
  expected_nll = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  assert full.shape[-1] == 260
  for vocab_chunk in (260, 100):
    monkeypatch.setattr(model_lib, "VOCAB_CHUNK", vocab_chunk)
    nll_BxL, hit_BxL = model.nll_and_hits(inputs_BxL, targets_BxL)
    np.testing.assert_allclose(nll_BxL, expected_nll, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(hit_BxL, jnp.argmax(full, axis=-1) == targets_BxL)


def test_vocab_chunked_nll_has_the_one_shot_values_ties_and_gradient():
  """Over ragged vocabulary chunks: the NLL and its gradient equal the one-shot logsumexp's,
  every target in every chunk; argmax keeps the first of tied maxima, also across chunks."""
  logits_BxCxV = jax.random.normal(jax.random.key(0), (2, 5, 23)) * 3
  logits_BxCxV = logits_BxCxV.at[0, 0, 4].set(50.0).at[0, 0, 17].set(50.0)  # tie across chunks
  logits_BxCxV = logits_BxCxV.at[0, 1, 9].set(50.0).at[0, 1, 8].set(50.0)  # tie inside a chunk
  targets_BxC = (jnp.arange(10).reshape(2, 5) * 2 + 1).at[0, 0].set(4).at[0, 1].set(8)
  one_shot = lambda x: (
    jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, targets_BxC[..., None], -1)[..., 0]
  )
  chunked = lambda x: losses.nll_and_hits_by_vocab_chunks(
    lambda start, size: x[..., start : start + size], 23, 7, targets_BxC
  )
  nll, hit = chunked(logits_BxCxV)
  np.testing.assert_allclose(nll, one_shot(logits_BxCxV), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(hit, jnp.argmax(logits_BxCxV, -1) == targets_BxC)
  assert hit[0, 0] and hit[0, 1]  # the first of each tie is the target
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * jnp.arange(10.0).reshape(2, 5)))
  np.testing.assert_allclose(
    grad(lambda x: chunked(x)[0])(logits_BxCxV), grad(one_shot)(logits_BxCxV), atol=1e-6
  )


def test_blocked_argmax_is_jnp_argmax_with_its_tie_rule():
  """max_and_first_argmax equals (max, jnp.argmax) on ties inside a block, across blocks and
  at block edges, constant and -inf rows; a K the block does not divide takes jnp.argmax."""
  x_RxK = jax.random.normal(jax.random.key(1), (9, 32))
  x_RxK = x_RxK.at[0, 5].set(9.0).at[0, 6].set(9.0)  # tie inside block 1 (of 4-blocks)
  x_RxK = x_RxK.at[1, 3].set(9.0).at[1, 4].set(9.0)  # tie across a block edge
  x_RxK = x_RxK.at[2, 30].set(9.0).at[2, 9].set(9.0)  # later block first in the row
  x_RxK = x_RxK.at[3].set(0.0).at[4].set(-jnp.inf).at[5, 31].set(9.0).at[6, 0].set(9.0)
  x_RxK = x_RxK.at[7, 12].set(jnp.inf).at[7, 8].set(jnp.inf)
  for block in (4, 8, 16):
    top, arg = losses.max_and_first_argmax(x_RxK, block)
    np.testing.assert_array_equal(arg, jnp.argmax(x_RxK, -1))
    np.testing.assert_array_equal(top, x_RxK.max(-1))
  assert list(losses.max_and_first_argmax(x_RxK, 4)[1][:3]) == [5, 3, 9]
  _, arg = losses.max_and_first_argmax(x_RxK[:, :30], 4)  # 4 does not divide 30
  np.testing.assert_array_equal(arg, jnp.argmax(x_RxK[:, :30], -1))


def test_vocab_chunked_hits_use_the_blocked_argmax_and_drop_nan_rows():
  """Chunks the argmax block divides (the blocked path), ties across and inside chunks: the
  hits are jnp.argmax's; a row with a NaN logit has a NaN NLL and no hit."""
  logits_BxCxV = jax.random.normal(jax.random.key(2), (2, 6, 48))
  logits_BxCxV = logits_BxCxV.at[0, 0, 3].set(9.0).at[0, 0, 40].set(9.0)
  logits_BxCxV = logits_BxCxV.at[0, 1, 17].set(9.0).at[0, 1, 18].set(9.0)
  logits_BxCxV = logits_BxCxV.at[1, 2, 7].set(jnp.nan)
  targets_BxC = jnp.argmax(logits_BxCxV, -1).at[0, 2].set(0)
  nll, hit = losses.nll_and_hits_by_vocab_chunks(
    lambda start, size: logits_BxCxV[..., start : start + size],
    48,
    16,
    targets_BxC,
    argmax_block=4,
  )
  expected = jnp.argmax(logits_BxCxV, -1) == targets_BxC
  assert np.isnan(nll[1, 2]) and not hit[1, 2]
  np.testing.assert_array_equal(hit.at[1, 2].set(False), expected.at[1, 2].set(False))
  assert hit[0, 0] and hit[0, 1] and not hit[0, 2] and int(hit.sum()) == 10


# Operations that only move, cast or multiply values: XLA:CPU runs them on bf16 without
# widening each one to float32 and rounding it back.
_BF16_SAFE = {
  "convert_element_type", "dot_general", "reshape", "transpose", "slice", "dynamic_slice",
  "dynamic_update_slice", "concatenate", "split", "stack", "pad", "squeeze", "broadcast_in_dim",
  "optimization_barrier", "jit", "pjit", "custom_vjp_call", "custom_jvp_call", "scan", "while",
  "name",  # checkpoint_name: the identity, tagging a value for remat policies
}  # fmt: skip


def _bf16_arithmetic(jaxpr, found: set) -> set:
  """Names of the primitives in ``jaxpr`` (and every jaxpr nested in it) that take or give
  bf16 values and are not in ``_BF16_SAFE``."""
  for eqn in jaxpr.eqns:
    avals = (v.aval for v in (*eqn.invars, *eqn.outvars))
    if eqn.primitive.name not in _BF16_SAFE and any(
      getattr(a, "dtype", None) == jnp.bfloat16 for a in avals
    ):
      found.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
          _bf16_arithmetic(getattr(sub, "jaxpr", sub), found)
  return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="activations are bf16 elsewhere")
@pytest.mark.parametrize("pe,attention", [("rope", "dense"), ("t5", "blockwise"), ("xpos", "xla")])
def test_bfloat16_on_the_cpu_is_only_a_matmul_operand(pe, attention):
  """On the CPU a bf16 model's training gradient does no arithmetic on bf16 values (norms,
  GELU, softmax, the encodings and their backward passes stay float32): XLA:CPU would widen
  each such op to float32 and round it back."""
  model = _model(_config(pe, compute_dtype="bfloat16", attention=attention))
  assert model.activation_dtype == jnp.float32
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  inputs_BxL = _inputs(TRAIN_LEN)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    logits_BxLxV = m(inputs_BxL, train=True, logits_dtype=m.activation_dtype)
    return jnp.mean(jax.nn.log_softmax(logits_BxLxV)[..., 0])

  assert _bf16_arithmetic(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, set()) == set()


def test_bfloat16_gradients_are_close_to_float32():
  """bf16 matmuls with fp32 accumulation in all three products (``matmul``): every
  parameter's gradient within 5% of its largest fp32 entry."""
  inputs_BxL = _inputs(12)

  def grads(compute_dtype):
    graphdef, params, rest = nnx.split(
      _model(_config("t5", compute_dtype=compute_dtype)), nnx.Param, ...
    )

    def loss(params):
      logits_BxLxV = nnx.merge(graphdef, params, rest)(inputs_BxL)
      return -jnp.mean(jax.nn.log_softmax(logits_BxLxV)[..., 0])

    return jax.jit(jax.grad(loss))(params)

  for got, expected in zip(
    jax.tree.leaves(grads("bfloat16")), jax.tree.leaves(grads("float32")), strict=True
  ):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, atol=0.05 * float(np.abs(expected).max()))
