"""The one map between our parameter tree and HF Llama tensors: a table that import, export,
streaming import and the GGUF reader all loop over.

Each row is one tensor of ours (per layer under ``blocks[i]``, else at the root) made of one or
more HF tensors stacked along HF's first axis, transposed where HF stores a linear layer as
``[out, in]`` and we as ``[in, out]``::

  ours     = concat(HF parts, axis 0)^T        (^T only for rows with transpose)
  HF parts = split(ours^T, at the parts' rows)

  blocks[i].attn.qkv.kernel  = [W_q | W_k | W_v]^T      (.bias = [b_q | b_k | b_v]: Qwen2)
  blocks[i].attn.out.kernel  = W_o^T
  blocks[i].mlp.up.kernel    = [W_gate | W_up]^T         (SwiGLU: silu(x W_gate) * x W_up)
  blocks[i].mlp.down.kernel  = W_down^T
  blocks[i].attn_norm.scale  = input_layernorm,  blocks[i].mlp_norm.scale = post_attention_layernorm
  embed.embedding = embed_tokens,  final_norm.scale = norm,  unembed.kernel = lm_head^T (untied)

Every HF part's shape follows from the model config (:class:`Dims`) and is checked here, once.
Q and K rows rotate per head (``rope_heads``): llama.cpp permutes exactly these rows in GGUF
files (gguf_file.py undoes it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

LAYER = "model.layers.{i}."


@dataclasses.dataclass(frozen=True)
class Dims:
  """The sizes the table's shapes are written in (the package's shape alphabet)."""

  V: int
  D: int
  H: int
  G: int
  E: int
  F: int
  qkv_bias: bool
  tied: bool

  @classmethod
  def of(cls, model_cfg) -> Dims:
    from pe_research.model_size import kv_heads, resolved_dims

    m = model_cfg
    e, f = resolved_dims(m)
    return cls(
      m.vocab_size, m.model_dim, m.num_heads, kv_heads(m), e, f, m.qkv_bias, m.tie_embeddings
    )


@dataclasses.dataclass(frozen=True)
class Part:
  """One HF tensor: its name (``{i}``: the layer), HF shape, and the heads of its rotated rows."""

  name: str
  shape: Callable[[Dims], tuple[int, ...]]
  rope_heads: Callable[[Dims], int] | None = None


@dataclasses.dataclass(frozen=True)
class Row:
  """One tensor of ours (``path`` below ``blocks[i]`` or the root) and its HF parts."""

  path: tuple[str, ...]
  parts: tuple[Part, ...]
  transpose: bool = False
  when: Callable[[Dims], bool] = lambda dims: True


def _projection(name: str, rows, heads=None, *, bias: bool = False) -> Part:
  """``self_attn.{name}_proj``: weight ``[rows, D]`` or bias ``[rows]``."""
  suffix, shape = ("bias", lambda d: (rows(d),)) if bias else ("weight", lambda d: (rows(d), d.D))
  return Part(f"{LAYER}self_attn.{name}_proj.{suffix}", shape, heads)


def _qkv(bias: bool) -> tuple[Part, ...]:
  return (
    _projection("q", lambda d: d.H * d.E, lambda d: d.H, bias=bias),
    _projection("k", lambda d: d.G * d.E, lambda d: d.G, bias=bias),
    _projection("v", lambda d: d.G * d.E, bias=bias),
  )


def _norm(name: str) -> Part:
  return Part(name, lambda d: (d.D,))


LAYER_ROWS = (
  Row(("attn_norm", "scale"), (_norm(f"{LAYER}input_layernorm.weight"),)),
  Row(("attn", "qkv", "kernel"), _qkv(bias=False), transpose=True),
  Row(("attn", "qkv", "bias"), _qkv(bias=True), when=lambda d: d.qkv_bias),
  Row(
    ("attn", "out", "kernel"),
    (Part(f"{LAYER}self_attn.o_proj.weight", lambda d: (d.D, d.H * d.E)),),
    transpose=True,
  ),
  Row(("mlp_norm", "scale"), (_norm(f"{LAYER}post_attention_layernorm.weight"),)),
  Row(
    ("mlp", "up", "kernel"),
    tuple(Part(f"{LAYER}mlp.{n}_proj.weight", lambda d: (d.F, d.D)) for n in ("gate", "up")),
    transpose=True,
  ),
  Row(
    ("mlp", "down", "kernel"),
    (Part(f"{LAYER}mlp.down_proj.weight", lambda d: (d.D, d.F)),),
    transpose=True,
  ),
)
FIRST_ROWS = (
  Row(("embed", "embedding"), (Part("model.embed_tokens.weight", lambda d: (d.V, d.D)),)),
)
LAST_ROWS = (
  Row(("final_norm", "scale"), (_norm("model.norm.weight"),)),
  Row(
    ("unembed", "kernel"),
    (Part("lm_head.weight", lambda d: (d.V, d.D)),),
    transpose=True,
    when=lambda d: not d.tied,
  ),
)


@dataclasses.dataclass(frozen=True)
class Entry:
  """A row at one layer: our full path, its HF names and shapes."""

  path: tuple
  names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  rope_heads: tuple[int | None, ...]
  transpose: bool

  @property
  def shape(self) -> tuple[int, ...]:
    """Our shape: the parts stacked on axis 0, transposed for linear layers."""
    stacked = (sum(s[0] for s in self.shapes), *self.shapes[0][1:])
    return stacked[::-1] if self.transpose else stacked

  def to_ours(self, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """Our float32 tensor; ``read(name)`` gives each HF part, one at a time (any float dtype:
    widened as it is copied in)."""
    out = np.empty(self.shape, np.float32)
    start = 0
    for name, shape in zip(self.names, self.shapes, strict=True):
      part = check_shape(name, read(name), shape)
      rows = slice(start, start + shape[0])
      if self.transpose:
        out[:, rows] = part.T
      else:
        out[rows] = part
      start = rows.stop
    return out

  def to_hf(self, x: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, float32 HF tensor)`` of each part of our tensor ``x`` (C-contiguous)."""
    x = check_shape("/".join(map(str, self.path)), x, self.shape)
    x = x.T if self.transpose else x
    start = 0
    for name, shape in zip(self.names, self.shapes, strict=True):
      yield name, np.ascontiguousarray(x[start : start + shape[0]], np.float32)
      start += shape[0]


def check_shape(name: str, x, shape: tuple[int, ...]) -> np.ndarray:
  """``x`` as a numpy array, or a one-line ValueError when its shape is not ``shape``."""
  x = np.asarray(x)
  if x.shape != tuple(shape):
    raise ValueError(f"tensor {name} has shape {list(x.shape)}; the config needs {list(shape)}")
  return x


def _entry(row: Row, dims: Dims, layer: int | None) -> Entry:
  path = row.path if layer is None else ("blocks", layer, *row.path)
  return Entry(
    path,
    tuple(p.name.format(i=layer) for p in row.parts),
    tuple(p.shape(dims) for p in row.parts),
    tuple(p.rope_heads and p.rope_heads(dims) for p in row.parts),
    row.transpose,
  )


def entries(model_cfg) -> Iterator[Entry]:
  """Every tensor of the model, in HF's order: the embedding, layer by layer, the head."""
  dims = Dims.of(model_cfg)
  rows = [(row, None) for row in FIRST_ROWS]
  rows += [(row, i) for i in range(model_cfg.num_layers) for row in LAYER_ROWS]
  rows += [(row, None) for row in LAST_ROWS]
  for row, layer in rows:
    if row.when(dims):
      yield _entry(row, dims, layer)


def hf_specs(model_cfg) -> dict[str, tuple[tuple[int, ...], int | None]]:
  """HF name -> ``(shape, rope_heads)`` of every HF tensor of the model, in order."""
  return {
    name: (shape, heads)
    for entry in entries(model_cfg)
    for name, shape, heads in zip(entry.names, entry.shapes, entry.rope_heads, strict=True)
  }


def params_from(read: Callable[[str], np.ndarray], model_cfg, place=None) -> dict:
  """Our parameter pure dict, each tensor built from its HF parts (``read(name)``, one at a
  time; a KeyError is a missing tensor) and stored as ``place(path, x)`` (default: ``x``)."""

  def checked_read(name: str) -> np.ndarray:
    try:
      return read(name)
    except KeyError:
      raise ValueError(
        f"tensor {name} is missing from the checkpoint; allowed: a complete one"
      ) from None

  params: dict = {}
  for entry in entries(model_cfg):
    x = entry.to_ours(checked_read)
    node = params
    for key in entry.path[:-1]:
      node = node.setdefault(key, {})
    node[entry.path[-1]] = place(entry.path, x) if place else x
  return params


def hf_tensors(params: dict, model_cfg) -> Iterator[tuple[str, np.ndarray]]:
  """``(HF name, tensor)`` of our parameters, one at a time, in :func:`entries` order."""
  for entry in entries(model_cfg):
    node = params
    for key in entry.path:
      node = node[key] if key in node else node[str(key)]
    yield from entry.to_hf(np.asarray(node, np.float32))
