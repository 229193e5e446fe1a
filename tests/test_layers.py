"""How the blocks run: remat policies and the scan over stacked layers compute the same loss and
gradients as the plain loop, and checkpoints convert between the per-layer and stacked trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from pe_research import checkpoint, train
from pe_research.model import Transformer
from pe_research.stacking import layers_stacked, stack_layers, unstack_layers

SCAN = {"scan_layers": True}
# (encoding, one encoding per layer, variants of the loop model): per-layer encodings with
# parameters under every variant; a shared encoding (closed over by the scan body) scanned.
ENCODINGS = [
  (
    "t5",
    True,
    [
      {"remat": "full"},
      {"remat": "save_projections"},
      SCAN,
      {**SCAN, "remat": "full"},
      {**SCAN, "remat": "save_projections", "gather_dtype": "float32"},
    ],
  ),
  ("rope", False, [SCAN]),
]


def _config(pe: str, per_layer: bool, **model):
  config = tiny.get_config(f"pe={pe}")
  config.model.update(num_layers=2, **model)
  config.pe.share_across_layers = not per_layer
  return config


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module", params=ENCODINGS, ids=[pe for pe, _, _ in ENCODINGS])
def losses_and_grads(request):
  """The loop model's loss and gradients, then each variant's, gradients unstacked to the
  per-layer tree; all compiled as one program."""
  pe, per_layer, variants = request.param
  models = [Transformer(_config(pe, per_layer, **v), rngs=nnx.Rngs(0)) for v in [{}, *variants]]
  splits = [nnx.split(model, nnx.Param, ...) for model in models]
  inputs_BxL = jax.random.randint(jax.random.key(1), (2, 8), 0, 260)

  @jax.jit
  def run(all_params):
    out = []
    for (graphdef, _, rest), params in zip(splits, all_params, strict=True):
      loss = lambda p, g=graphdef, r=rest: jnp.mean(
        jax.nn.log_softmax(nnx.merge(g, p, r)(inputs_BxL))[..., 3]
      )
      out.append(jax.value_and_grad(loss)(params))
    return out

  results = run([nnx.to_pure_dict(params) for _, params, _ in splits])
  grads = [unstack_layers(g) if layers_stacked(g) else g for _, g in results]
  params = dict(zip(["loop", *map(str, variants)], map(_params, models), strict=True))
  return [loss for loss, _ in results], grads, params, per_layer, variants


def test_every_remat_policy_and_the_scan_equal_the_loop(losses_and_grads):
  losses, grads, _, _, variants = losses_and_grads
  for variant, loss, grad in zip(variants, losses[1:], grads[1:], strict=True):
    np.testing.assert_allclose(loss, losses[0], atol=1e-6, err_msg=str(variant))
    leaves = jax.tree.leaves_with_path(grad)
    assert len(leaves) == len(jax.tree.leaves(grads[0])), variant
    for (path, got), want in zip(leaves, jax.tree.leaves(grads[0]), strict=True):
      np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"{variant} {path}")


def test_scan_model_starts_from_the_loop_models_parameters_stacked(losses_and_grads):
  _, _, params, per_layer, _ = losses_and_grads
  loop, scan = params["loop"], params[str(SCAN)]
  assert not layers_stacked(loop) and layers_stacked(scan)
  assert scan["blocks"]["mlp"]["up"]["kernel"].shape[0] == 2
  if per_layer:  # Moved into the stacked blocks (RoPE has no parameters).
    assert "encodings" not in scan and scan["blocks"]["encoding"]["table"].shape[0] == 2
  jax.tree.map(np.testing.assert_array_equal, stack_layers(loop), scan)
  jax.tree.map(np.testing.assert_array_equal, unstack_layers(scan), loop)


def test_scan_with_per_layer_random_positions_is_a_one_line_error():
  config = _config("rope", True, scan_layers=True)
  config.pe.randomized = True
  with pytest.raises(ValueError, match="model.scan_layers=True with pe.share_across_layers"):
    Transformer(config, rngs=nnx.Rngs(0))


def test_bad_remat_and_gather_dtype_are_one_line_errors():
  with pytest.raises(ValueError, match="model.remat='some'.*none, full, save_projections"):
    Transformer(_config("rope", False, remat="some"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="model.gather_dtype='int8'"):
    Transformer(_config("rope", False, gather_dtype="int8"), rngs=nnx.Rngs(0))


def test_checkpoints_load_across_the_per_layer_and_stacked_layouts(tmp_path):
  """A checkpoint of the loop model loads into a scan model with the loop model's logits, and
  one of the scan model into a loop model (both made with another seed first)."""
  tx, _ = train.make_optimizer(tiny.get_config().train)
  inputs_BxL = jax.random.randint(jax.random.key(2), (2, 16), 0, 260)
  expected = Transformer(_config("t5", True), rngs=nnx.Rngs(0))(inputs_BxL)
  for scan in (False, True):
    config = _config("t5", True, scan_layers=scan)
    saver = checkpoint.Checkpointer(str(tmp_path / str(scan)), keep=1)
    saver.save(1, train.init_train_state(config, tx)[1], {"next_index": 0}, config)
    saver.close()
  for scan in (False, True):
    model = Transformer(_config("t5", True, scan_layers=scan), rngs=nnx.Rngs(1))
    loaded = checkpoint.load_params(str(tmp_path / str(not scan)), _params(model))
    assert layers_stacked(loaded) == scan
    nnx.update(model, loaded)
    np.testing.assert_allclose(model(inputs_BxL), expected, atol=1e-6)
