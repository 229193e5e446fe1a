"""Stacked layers (``model.scan_layers``): the blocks' parameters on a leading layer axis.

The per-layer tree (``params["blocks"][i]``, ``params["encodings"][i]`` for one encoding per
layer) is the canonical form of checkpoints and of import/export; :func:`stack_layers` and
:func:`unstack_layers` convert between it and the stacked tree (``params["blocks"]`` one
subtree with arrays ``[num_layers, ...]``, per-layer encodings as ``params["encodings"][0]``
stacked likewise; a shared encoding stays ``params["encodings"][0]`` in both).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import spmd


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
  """One module like ``modules[0]`` whose arrays are those of ``modules`` stacked on a new
  leading axis, named ``layers`` where the arrays have logical names."""
  graphdef, _ = nnx.split(modules[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.split(m)[1] for m in modules))
  return nnx.merge(graphdef, spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: "layers"}))


def layers_stacked(params: dict) -> bool:
  """Whether a parameter tree (pure dict) holds the blocks stacked (``model.scan_layers``)
  rather than one subtree per layer (keys 0, 1, ...)."""
  return not all(isinstance(key, int) or str(key).isdigit() for key in params["blocks"])


def stack_layers(tree: dict, stack=jnp.stack) -> dict:
  """The per-layer tree ``tree`` (params, or any tree with their top level: ``blocks`` 0..n-1,
  ``encodings`` 0..n-1 or just 0) with the blocks, and per-layer encodings, stacked on a
  leading layer axis: the tree of ``model.scan_layers=True``. ``stack``: a list of arrays ->
  the stacked array (``jnp.stack``; other leaf types, e.g. shape structs, need their own)."""
  stack_all = lambda layers: jax.tree.map(lambda *xs: stack(list(xs)), *layers)
  by_index = lambda d: [d[key] for key in sorted(d, key=int)]
  out = dict(tree, blocks=stack_all(by_index(tree["blocks"])))
  if len(tree.get("encodings", ())) > 1:  # No key: encodings without parameters.
    out["encodings"] = {0: stack_all(by_index(tree["encodings"]))}
  return out


def unstack_layers(tree: dict, per_layer_encodings: bool, take=lambda x, i: x[i]) -> dict:
  """The inverse of :func:`stack_layers`: the per-layer tree of a stacked one.
  ``per_layer_encodings``: ``pe.share_across_layers=False`` (then ``encodings[0]`` is stacked
  too); ``take(x, i)``: layer ``i`` of a stacked leaf."""
  num_layers = jax.tree.leaves(tree["blocks"])[0].shape[0]
  layer = lambda stacked, i: jax.tree.map(lambda x: take(x, i), stacked)
  out = dict(tree, blocks={i: layer(tree["blocks"], i) for i in range(num_layers)})
  if per_layer_encodings and num_layers > 1 and "encodings" in tree:
    out["encodings"] = {i: layer(tree["encodings"][0], i) for i in range(num_layers)}
  return out
