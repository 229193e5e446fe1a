"""Stacked layers (``model.scan_layers``): the blocks' parameters on a leading layer axis.

The per-layer tree (``params["blocks"][i]``, ``params["encodings"][i]`` for one encoding per
layer) is the canonical form of checkpoints and of import/export; :func:`stack_layers` and
:func:`unstack_layers` convert between it and the stacked tree (``params["blocks"]`` one
subtree with arrays ``[num_layers, ...]``, per-layer encodings
moved into their blocks, ``params["blocks"]["encoding"]``; a shared encoding stays
``params["encodings"][0]`` in both).
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
  ``encodings`` 0..n-1, just 0, or absent) with the blocks stacked on a leading layer axis,
  per-layer encodings moved into their blocks first: the tree of ``model.scan_layers=True``.
  ``stack``: a list of arrays -> the stacked array (other leaf types need their own)."""
  blocks = [tree["blocks"][key] for key in sorted(tree["blocks"], key=int)]
  out = dict(tree)
  if len(tree.get("encodings", ())) > 1:  # One per layer (no key: none has parameters).
    encodings = out.pop("encodings")
    keys = sorted(encodings, key=int)
    blocks = [dict(b, encoding=encodings[k]) for b, k in zip(blocks, keys, strict=True)]
  out["blocks"] = jax.tree.map(lambda *xs: stack(list(xs)), *blocks)
  return out


def unstack_layers(tree: dict, take=lambda x, i: x[i]) -> dict:
  """The inverse of :func:`stack_layers`: the per-layer tree of a stacked one. ``take(x, i)``:
  layer ``i`` of a stacked leaf."""
  num_layers = jax.tree.leaves(tree["blocks"])[0].shape[0]
  stacked = dict(tree["blocks"])
  layer = lambda subtree, i: jax.tree.map(lambda x: take(x, i), subtree)
  out = dict(tree, blocks={i: layer(stacked, i) for i in range(num_layers)})
  if "encoding" in stacked:
    encodings = stacked.pop("encoding")
    out["blocks"] = {i: layer(stacked, i) for i in range(num_layers)}
    out["encodings"] = {i: layer(encodings, i) for i in range(num_layers)}
  return out
