"""The suite's XLA:CPU optimization level (-O0, conftest.py) computes what XLA's default computes.

The suite compiles its programs with LLVM at -O0 to save compile time; users' runs compile at
XLA's default. One subprocess per level computes the tiny model's loss and every gradient for
encodings that reach each attention path (RoPE dense, ALiBi blockwise with its bias, T5 through
the XLA path, FIRE blockwise with its MLP, NoPE under Self-Extend's two logit sets); the two
must agree to float32 rounding. A flag that changed the arithmetic would fail here.
"""

import json
import os
import textwrap

import conftest
import fake_devices
import numpy as np

CASES = {  # name: (pe.name, model.attention, extra pe fields)
  "rope_dense": ("rope", "dense", {}),
  "alibi_blockwise": ("alibi", "blockwise", {}),
  "t5_xla": ("t5", "xla", {}),
  "fire_blockwise": ("fire", "blockwise", {}),
  "self_extend": ("rope", "blockwise", {"self_extend_window": 8, "self_extend_group": 2}),
}

_SCRIPT = textwrap.dedent(
  """
  import json, sys
  import jax, jax.numpy as jnp
  from flax import nnx
  from configs import tiny
  from pe_research import model as model_lib

  results = {}
  inputs_BxL = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)
  for name, (pe, attention, fields) in json.loads(sys.argv[1]).items():
    config = tiny.get_config(f"pe={pe}")
    config.model.attention, config.model.attention_block = attention, 8
    config.pe.update(fields)
    model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
    loss = lambda m: jnp.mean(m.nll_and_hits(inputs_BxL, jnp.roll(inputs_BxL, -1, 1))[0])
    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    leaves = [value, *jax.tree.leaves(nnx.state(grads))]
    results[name] = [jnp.ravel(x).tolist() for x in leaves]
  print(json.dumps(results))
  """
)


def _values(xla_flags: str) -> dict:
  return fake_devices.run_json(_SCRIPT, json.dumps(CASES), devices=1, flags=xla_flags)


def test_the_suites_optimization_level_computes_what_the_default_computes():
  """Loss and every gradient at -O0 equal XLA's default level to float32 rounding, for each
  case; and the suite really runs at -O0 (its flag is in this process's environment)."""
  assert conftest.TEST_XLA_FLAGS in os.environ["XLA_FLAGS"] or (
    os.environ.get("PE_RESEARCH_TEST_XLA_OPT") == "default"
  )
  fast_compile, default = _values(conftest.TEST_XLA_FLAGS), _values("")
  assert set(fast_compile) == set(default) == set(CASES)
  for name in CASES:
    assert len(fast_compile[name]) == len(default[name]) > 3, name
    for got, want in zip(fast_compile[name], default[name], strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
