"""Context-parallel attention (``context_parallel.py``) equals single-device dense attention.

One subprocess with 8 fake CPU devices checks every case and prints a JSON result. Per strategy
(all_gather, ring) and context size (2: mesh data=2 x fsdp=2 x context=2, the batch over both
batch axes; 4: data=2 x fsdp=1 x context=4), one compiled step (both strategies) runs four
attention calls
through the encodings' real ``positions``/``rotate``/``rotate_far``/``bias`` hooks (each built
by the registry); rows of one call are different encodings stacked on the batch axis:

  * rotate: NoPE, RoPE with YaRN scaling, xPos; grouped-query (G = 2 of H = 4), positions [1, L];
  * bias: ALiBi + T5 + KERPLE + FIRE biases summed (each hook's parameters get their own
    gradient), H = G, positions [1, L];
  * positions: PoSE (RoPE) and randomized (RoPE) training positions [B, L] with a T5 bias,
    multi-query (G = 1);
  * window: Self-Extend (W = 6, group 2) and ReRoPE (W = 6) rows, G = 2, L = 32 in chunks of
    4 (context 4) or 8: the window and the 2-position blocks cross chunk and shard boundaries.

The output and the gradients of q, k, v (before the encoding's rotation) and of every encoding
parameter must equal dense attention on one device to 1e-5 (absolute and relative). Three
steps of the tiny training run (``train.jit_train_step``) on a data=2 x context=2 mesh must
give one device's losses and parameters (ring: with stacked layers and full remat).
"""

import os
import textwrap

import fake_devices
import jax
import jax.numpy as jnp
import pytest

from pe_research.attention import attend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ("all_gather", "ring")
CONTEXTS = (2, 4)
CALLS = ("rotate", "bias", "positions", "window")

_SCRIPT = textwrap.dedent(
  """
  import json
  import jax, jax.numpy as jnp, numpy as np
  from flax import nnx
  from configs import base, tiny
  from pe_research import sharding, stacking, train
  from pe_research.attention import attend
  from pe_research.encodings.registry import build_encoding
  from pe_research.data import make_train_iterator

  B, L, H, E, W = 2, 32, 4, 8, 6
  KV = {"rotate": 2, "bias": H, "positions": 1, "window": 2}
  ENCODINGS = {  # name: (pe fields, call)
    "nope": (dict(name="nope"), "rotate"),
    "rope_yarn": (dict(rope_scaling='{"rope_type": "yarn", "factor": 4.0}'), "rotate"),
    "xpos": (dict(name="xpos"), "rotate"),
    "alibi": (dict(name="alibi"), "bias"),
    "t5": (dict(name="t5"), "bias"),
    "kerple": (dict(name="kerple"), "bias"),
    "fire": (dict(name="fire", fire_l_thr_init=16.0), "bias"),
    "pose": (dict(pose_target_len=128), "positions"),
    "randomized": (dict(randomized=True, max_random_len=128), "positions"),
    "positions_t5": (dict(name="t5"), None),  # the positions call's bias
    "self_extend": (dict(self_extend_window=W, self_extend_group=2), "window"),
    "rerope": (dict(rerope_window=W), "window"),
  }

  def build(seed, fields):
    pe = base.get_config().pe
    pe.update(fields)
    return build_encoding(pe, num_heads=H, head_dim=E, model_dim=H * E, rngs=nnx.Rngs(seed))

  encodings = {name: build(i, fields) for i, (name, (fields, _)) in enumerate(ENCODINGS.items())}
  shared = jnp.arange(L, dtype=jnp.int32)[None]
  positions = {
    name: enc.positions(B, L, train=True) for name, enc in encodings.items()
  }  # [1, L] except PoSE's and randomized's [B, L]
  assert positions["pose"].shape == (B, L) and positions["nope"].shape == (1, L)
  graphs = {name: nnx.split(enc, nnx.Param, ...) for name, enc in encodings.items()}
  params = {name: g[1] for name, g in graphs.items()}
  members = {c: [n for n, (_, call) in ENCODINGS.items() if call == c] for c in KV}

  keys = iter(jax.random.split(jax.random.key(0), 64))
  normal = lambda *shape: jax.random.normal(next(keys), shape)
  inputs = {
    c: {
      n: (normal(B, L, H, E), normal(B, L, KV[c], E), normal(B, L, KV[c], E))
      for n in members[c]
    }
    for c in KV
  }
  cotangents = {c: normal(B * len(members[c]), L, H, E) for c in KV}

  def attend_all(params, inputs, impl, strategy):
    enc = {n: nnx.merge(g[0], params[n], g[2]) for n, g in graphs.items()}
    outs = {}
    for c in KV:
      rows = {"q": [], "k": [], "v": [], "q_far": [], "k_far": [], "pos": []}
      for n in members[c]:
        q, k, v = inputs[c][n]
        pos = jnp.broadcast_to(positions[n], (B, L))
        rows["q"].append(enc[n].rotate(q, pos, is_query=True))
        rows["k"].append(enc[n].rotate(k, pos, is_query=False))
        rows["v"].append(v)
        rows["pos"].append(pos)
        if enc[n].window is not None:
          rows["q_far"].append(enc[n].rotate_far(q, pos, is_query=True))
          rows["k_far"].append(enc[n].rotate_far(k, pos, is_query=False))
      cat = {key: jnp.concatenate(x) for key, x in rows.items() if x}
      pos = cat["pos"] if c == "positions" else shared
      bias_fn = None
      if c == "bias":
        bias_fn = lambda qp, kp: sum(enc[n].bias(qp, kp) for n in members["bias"])
      if c == "positions":
        bias_fn = enc["positions_t5"].bias
      far = {}
      if c == "window":
        far = dict(q_far_BxLxHxE=cat["q_far"], k_far_BxLxGxE=cat["k_far"], window=W)
      outs[c] = attend(
        cat["q"], cat["k"], cat["v"], q_pos_BxL=pos, k_pos_BxL=pos, bias_fn=bias_fn,
        impl=impl, block_size=2, context_strategy=strategy, **far,
      )
    loss = sum(jnp.sum(outs[c] * cotangents[c]) for c in KV)
    return loss, outs

  grad_fn = jax.grad(attend_all, argnums=(0, 1), has_aux=True)
  reference = jax.jit(lambda p, x: grad_fn(p, x, "dense", None))
  # Both strategies in one compiled program per mesh (fewer compiles).
  both_strategies = jax.jit(
    lambda p, x: {s: grad_fn(p, x, "blockwise", s) for s in ("all_gather", "ring")}
  )

  def compare(got, expected):
    # Per call: [max |error|, max |reference|, within 1e-5]; q/k/v and parameter gradients of
    # the call's encodings and its output.
    errors = {}
    pairs = zip(*(jax.tree_util.tree_leaves_with_path(x) for x in (expected, got)), strict=True)
    for (path, e), (_, g) in pairs:
      e, g = np.asarray(e), np.asarray(g)
      name = jax.tree_util.keystr(path)
      ok = bool(np.allclose(g, e, atol=1e-5, rtol=1e-5))
      errors[name] = [float(np.abs(g - e).max()), float(np.abs(e).max()), ok]
    return errors

  (ref_dparams, ref_dinputs), ref_outs = reference(params, inputs)
  expected = {"out": ref_outs, "dinputs": ref_dinputs, "dparams": ref_dparams}
  result = {"leaves": {}, "params": {n: len(jax.tree.leaves(p)) for n, p in params.items()}}
  result["members"] = {**members, "positions": members["positions"] + ["positions_t5"]}
  for context, (data, fsdp) in ((2, (2, 2)), (4, (2, 1))):
    mesh = jax.make_mesh(
      (data, fsdp, context), ("data", "fsdp", "context"),
      (jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[: data * fsdp * context],
    )
    with jax.set_mesh(mesh):
      by_strategy = both_strategies(params, inputs)
    for strategy, ((dparams, dinputs), outs) in by_strategy.items():
      got = {"out": outs, "dinputs": dinputs, "dparams": dparams}
      result["leaves"][f"{strategy}/{context}"] = compare(got, expected)

  # Pallas (a Mosaic kernel, which XLA cannot partition) on a data=4 x fsdp=2 mesh: attend runs
  # it per batch shard; output and the gradients of q, k, v and T5's table equal dense.
  t5_graph = graphs["t5"]
  q8, k8, v8, cot8 = (normal(8, L, H, E) for _ in range(4))

  def t5_loss(p, q, k, v, impl):
    enc = nnx.merge(t5_graph[0], p, t5_graph[2])
    out = attend(q, k, v, q_pos_BxL=shared, k_pos_BxL=shared, bias_fn=enc.bias, impl=impl,
                 block_size=8)
    return jnp.sum(out * cot8), out

  t5_grad = jax.grad(t5_loss, argnums=(0, 1, 2, 3), has_aux=True)
  dense = jax.jit(lambda *a: t5_grad(*a, "dense"))(params["t5"], q8, k8, v8)
  batch_mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "context"),
                             (jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(batch_mesh):
    pallas = jax.jit(lambda *a: t5_grad(*a, "pallas"))(params["t5"], q8, k8, v8)
    jaxpr = jax.make_jaxpr(lambda *a: t5_grad(*a, "pallas"))(params["t5"], q8, k8, v8)
  result["leaves"]["pallas/batch_shards"] = compare(pallas, dense)  # gradients, output
  result["pallas_shard_map"] = "shard_map" in str(jaxpr)

  # The tiny training run (train.jit_train_step, RoPE): 3 steps on one device and on
  # data=2 x context=2 (ring: with stacked layers and full remat); the losses, the parameters
  # after them (per-layer tree) and the step's collectives.
  def train_run(data, context, strategy, **model):
    config = tiny.get_config()
    config.model.update(model)
    config.model.context_parallel = strategy
    config.mesh.data, config.mesh.context = data, context
    mesh = sharding.make_mesh(config.mesh, jax.devices()[: data * context])
    tx, schedule = train.make_optimizer(config.train)
    graphdef, state = train.create_train_state(config, mesh, tx)
    step_fn = train.jit_train_step(graphdef, tx, schedule, state, mesh)
    batches, losses = make_train_iterator(config), []
    for _ in range(3):
      state, metrics = step_fn(state, sharding.global_batch(next(batches), mesh))
      losses.append(metrics["loss"])
    text = step_fn.lower(state, sharding.global_batch(next(batches), mesh)).as_text()
    params = stacking.unstack_layers(state.params) if model else state.params
    run = {"losses": jnp.stack(losses), "params": params}
    return jax.device_get(run), [text.count("all_gather"), text.count("collective_permute")]

  one_device, _ = train_run(1, 1, "all_gather")
  for strategy, model in (("all_gather", {}), ("ring", dict(scan_layers=True, remat="full"))):
    run, collectives = train_run(2, 2, strategy, **model)
    result["leaves"][f"model/{strategy}"] = compare(run, one_device)
    result[f"model_collectives/{strategy}"] = collectives
  print(json.dumps(result))
  """
)


@pytest.fixture(scope="module")
def context_parallel() -> dict:
  return fake_devices.run_json(_SCRIPT)


def _leaves(results: dict, prefix: str) -> dict:
  return {name: v for name, v in results.items() if name.startswith(prefix)}


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("call", CALLS)
def test_context_parallel_equals_dense_attention(context_parallel, strategy, context, call):
  """Output, q/k/v gradients and the gradients of the call's encodings' parameters (T5's
  table, KERPLE's r, FIRE's MLP) within 1e-5 of single-device dense attention."""
  leaves = context_parallel["leaves"][f"{strategy}/{context}"]
  members = context_parallel["members"][call]
  checked = _leaves(leaves, f"['out']['{call}']") | _leaves(leaves, f"['dinputs']['{call}']")
  assert len(checked) == 1 + 3 * len([n for n in members if n != "positions_t5"])
  for name in members:
    checked |= _leaves(leaves, f"['dparams']['{name}']")
  failed = {name: v for name, v in checked.items() if not v[2]}
  assert not failed, failed


def test_every_parametrised_encoding_has_parameter_gradients_checked(context_parallel):
  """The bias encodings with parameters (T5, KERPLE, FIRE) reach the comparison; a case that
  silently dropped them would compare nothing."""
  counts = context_parallel["params"]
  assert counts["t5"] >= 1 and counts["kerple"] >= 1 and counts["fire"] >= 2
  leaves = context_parallel["leaves"]["ring/4"]
  for name in ("t5", "kerple", "fire", "positions_t5"):
    assert len(_leaves(leaves, f"['dparams']['{name}']")) == counts[name]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tiny_training_on_a_context_mesh_equals_one_device(context_parallel, strategy):
  """Three training steps of the tiny model on data=2 x context=2 (ring: ``scan_layers`` and
  ``remat="full"``): the losses and every parameter after them equal one device's to 1e-5,
  and the step really ran context-parallel (its collectives)."""
  leaves = context_parallel["leaves"][f"model/{strategy}"]
  assert len(leaves) > 10
  failed = {name: v for name, v in leaves.items() if not v[2]}
  assert not failed, failed
  gathers, permutes = context_parallel[f"model_collectives/{strategy}"]
  assert (gathers > 0) if strategy == "all_gather" else (permutes > 0)


def test_pallas_under_a_batch_mesh_runs_per_shard_and_equals_dense(context_parallel):
  """XLA cannot partition a Mosaic kernel: on a data=4 x fsdp=2 mesh the Pallas kernel runs per
  batch shard (sharding.per_batch_shard); its output and the gradients of T5's table, q, k and
  v equal dense attention on one device (1e-5, as every check here)."""
  assert context_parallel["pallas_shard_map"]
  leaves = context_parallel["leaves"]["pallas/batch_shards"]
  assert len(leaves) == 5  # four gradients and the output
  bad = {name: v for name, v in leaves.items() if not v[2]}
  assert not bad, bad


@pytest.mark.parametrize(
  "length,strategy,message",
  [
    (12, "all_gather", "sequence length 12 must divide by 2 x mesh.context = 8"),
    (16, "zigzag", "model.context_parallel='zigzag' is unknown; allowed: all_gather, ring"),
  ],
)
def test_context_mesh_rejects_a_length_or_strategy_it_cannot_run(length, strategy, message):
  """Under a mesh with context=4, L must split into 2 x 4 zigzag chunks and the strategy must
  be known: one-line ValueErrors, raised while tracing (an abstract mesh, no devices)."""
  q = jnp.zeros((1, length, 2, 4))
  pos = jnp.arange(length)[None]
  mesh = jax.sharding.AbstractMesh((4,), ("context",))
  with jax.sharding.use_abstract_mesh(mesh), pytest.raises(ValueError, match=message):
    attend(q, q, q, q_pos_BxL=pos, k_pos_BxL=pos, impl="blockwise", context_strategy=strategy)
