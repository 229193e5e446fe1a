"""Decoder-only pre-norm transformer (Flax NNX) with a pluggable positional encoding.

  pos = enc.positions(B, L);  x = enc.embed(E[tokens], pos)
  per layer:  x += W_o attend(enc.rotate(q), enc.rotate(k), v; bias = enc.bias)   (on norm(x))
              (with enc.window W: q_far, k_far = enc.rotate_far(q), enc.rotate_far(k) give the
              logits of pairs i − j >= W: Self-Extend, ReRoPE)
              x += MLP(norm(x))
  logits = norm(x) E^T   (tied)  or  norm(x) W_out   (untied)

The encoding (``config.pe``) is built by the registry (which wraps it in randomized positions
when ``pe.randomized``, in PoSE positions when ``pe.pose_target_len``) and used only through
the :class:`~pe_research.encodings.base.PositionalEncoding` hooks. With
``pe.share_across_layers`` (default True) one encoding serves every layer; otherwise each layer
owns one (``model.scan_layers``: stacked inside the blocks) and the first also supplies
positions and the input embedding.

Choices: no biases in linear layers except the optional q/k/v bias (``model.qkv_bias``, Qwen2);
``model.num_kv_heads`` < ``num_heads`` is grouped-query attention (Llama-2/3, Mistral, SmolLM2);
weights ~ N(0, init_std), residual output projections
~ N(0, init_std / sqrt(2 num_layers)) (GPT-2); GELU is the tanh approximation; ``head_dim=0``
means ``model_dim // num_heads``; ``mlp_dim=0`` means ``4 model_dim`` (gelu) or ``8/3 model_dim``
rounded up to a multiple of 64 (swiglu, LLaMA-style, keeps the parameter count near gelu's).
``compute_dtype="bfloat16"``: bf16 matmuls with fp32 accumulation (forward and both backward
products, :func:`~pe_research.backend.matmul`, and attention's), fp32 parameters, fp32 residual
stream and softmax. The activations between matmuls are in the backend policy's
:func:`~pe_research.backend.activation_dtype` (bf16 on accelerators; fp32 on the CPU, where bf16
is only a matmul operand). Training takes logits in that
dtype and computes its loss in fp32 (:func:`pe_research.losses.softmax_nll`); evaluation scores
fp32 logits.
Outside training, sequences longer than ``SEQUENCE_CHUNK`` run the MLP chunk by chunk, and
:meth:`Transformer.nll_and_hits` scores tokens without materialising ``[B, L, V]`` logits.

Scale (docs/scaling.md): ``model.scan_layers`` stacks the blocks (and per-layer encodings) on a
leading layer axis (:mod:`pe_research.stacking`) and runs them with ``lax.scan``, each layer's
weights gathered inside the scan body (:func:`pe_research.sharding.gather_layer`);
``model.remat`` runs each block under ``jax.checkpoint`` (``REMAT_POLICIES``). Parameters carry
logical axis names (``_names``) and the residual stream is constrained at the embedding and
between scanned blocks, both through the one rules table of :mod:`pe_research.sharding`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pe_research import backend, losses, sharding
from pe_research.attention import IMPLEMENTATIONS, attend
from pe_research.backend import activation_dtype
from pe_research.encodings.base import PositionalEncoding, PositionsWrapper
from pe_research.encodings.registry import build_encoding
from pe_research.model_size import kv_heads, resolved_dims
from pe_research.stacking import stack_modules

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Longer sequences run the MLP and the output head over chunks of this many positions, so
# their [B, L, 4D] and [B, L, V] intermediates exist for one chunk at a time (evaluation memory;
# on the CPU 2048 rows also keep the MLP's matmuls faster than 4096: docs/cpu_performance.md).
SEQUENCE_CHUNK = 2048
# Scoring (nll_and_hits) computes the output head this many vocabulary entries at a time, its
# logsumexp online over them, for a chunk of positions of at most LOGITS_PER_CHUNK float32
# logits (32 MiB: 1024 positions of an 8192-entry chunk, SEQUENCE_CHUNK of a byte vocabulary).
# On the CPU, SmolLM2's head and NLL at 2k tokens ran 1.22x faster than in one [1024, 49152]
# piece per 1024 positions (docs/cpu_performance.md).
VOCAB_CHUNK = 8192
LOGITS_PER_CHUNK = 2**23
_NORMS = {"layernorm": nnx.LayerNorm, "rmsnorm": nnx.RMSNorm}
_MLPS = ("gelu", "swiglu")
# The activations tagged with ``checkpoint_name``: the outputs of the q/k/v projection, of
# attention, of its output projection and of the MLP's two projections.
PROJECTIONS = ("qkv_proj", "attention_out", "out_proj", "mlp_up", "mlp_down")
# ``model.remat``: what a block keeps for the backward pass (None: everything, no remat).
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "save_projections": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS),
}


def _names(*names) -> dict:
  """Variable metadata: the logical axis names of a parameter's dimensions
  (:mod:`pe_research.sharding`), applied by the train step, not when the parameter is made."""
  return {"out_sharding": names, "eager_sharding": False}


def _choice(field: str, value: str, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"model.{field}={value!r} is unknown; allowed: {', '.join(allowed)}")


class Linear(nnx.Module):
  """``x W`` (+ ``b`` with ``use_bias``), ``W ~ N(0, std^2)`` float32 ``[d_in, d_out]``, ``b``
  float32 ``[d_out]`` (zeros); operands in ``dtype``, float32 accumulation
  (:func:`~pe_research.backend.linear`), output in ``activation_dtype(dtype)``. ``names``: the
  logical axes of ``d_in`` and ``d_out`` (:mod:`pe_research.sharding`)."""

  def __init__(
    self,
    d_in: int,
    d_out: int,
    *,
    std: float,
    dtype,
    rngs: nnx.Rngs,
    names: tuple[str, str],
    use_bias: bool = False,
  ):
    init = nnx.initializers.normal(std)
    self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out)), **_names(*names))
    bias = jnp.zeros((d_out,), jnp.float32)
    self.bias = nnx.Param(bias, **_names(names[1])) if use_bias else None
    self.dtype = dtype

  def __call__(self, x_BxLxD: jax.Array, out_dtype=None, columns: slice | None = None):
    """``x W + b``, or its ``columns`` (output features) only."""
    out_dtype = out_dtype or activation_dtype(self.dtype)
    kernel, bias = self.kernel[...], None if self.bias is None else self.bias[...]
    if columns is not None:
      kernel, bias = kernel[:, columns], None if bias is None else bias[columns]
    y_BxLxF = backend.linear(x_BxLxD, kernel, out_dtype, self.dtype)
    if bias is not None:
      y_BxLxF = y_BxLxF + bias.astype(y_BxLxF.dtype)
    return y_BxLxF


def over_sequence_chunks(fn, *xs_BxLxX, chunk: int | None = None):
  """``fn(*xs)`` for a position-wise ``fn``, ``chunk`` positions (default ``SEQUENCE_CHUNK``)
  at a time (lax.map).

  Same values as ``fn(*xs)``; L is padded to a multiple of the chunk and cut back after.
  """
  chunk = chunk or SEQUENCE_CHUNK
  b, length = xs_BxLxX[0].shape[:2]
  if length <= chunk:
    return fn(*xs_BxLxX)
  n = -(-length // chunk)

  def to_chunks(x_BxLxX):
    x_BxLxX = jnp.pad(x_BxLxX, ((0, 0), (0, n * chunk - length)) + ((0, 0),) * (x_BxLxX.ndim - 2))
    return jnp.moveaxis(x_BxLxX.reshape(b, n, chunk, *x_BxLxX.shape[2:]), 1, 0)

  ys_JxBxCxX = jax.lax.map(lambda xs: fn(*xs), tuple(to_chunks(x) for x in xs_BxLxX))
  from_chunks = lambda y: jnp.moveaxis(y, 0, 1).reshape(b, n * chunk, *y.shape[3:])[:, :length]
  return jax.tree.map(from_chunks, ys_JxBxCxX)


class Attention(nnx.Module):
  """Causal self-attention with H query heads and G key/value heads (G = H: multi-head;
  G < H: grouped-query, query head h reads KV head ``h // (H / G)``; G = 1: multi-query);
  the encoding rotates q/k and supplies the bias. ``[q | k | v] = x W_qkv (+ b_qkv)``."""

  def __init__(self, model_cfg, *, dtype, out_std: float, rngs: nnx.Rngs):
    self.num_heads = model_cfg.num_heads
    self.num_kv_heads = kv_heads(model_cfg)
    self.head_dim, _ = resolved_dims(model_cfg)
    d, hk = model_cfg.model_dim, self.num_heads * self.head_dim
    width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    use_bias = model_cfg.get("qkv_bias", False)
    qkv_names = ("embed", "heads")
    std = model_cfg.init_std
    self.qkv = Linear(d, width, std=std, dtype=dtype, rngs=rngs, names=qkv_names, use_bias=use_bias)
    self.out = Linear(hk, d, std=out_std, dtype=dtype, rngs=rngs, names=("heads", "embed"))
    # Strategy under a "context" mesh axis (attention.attend); runs saved before it: all_gather.
    self.context_parallel = model_cfg.get("context_parallel", "all_gather")

  def __call__(self, x_BxLxD, pos_BxL, enc: PositionalEncoding, *, impl: str, block_size: int):
    b, length, _ = x_BxLxD.shape
    h, g = self.num_heads, self.num_kv_heads
    qkv_BxLxA = checkpoint_name(self.qkv(x_BxLxD), "qkv_proj")
    qkv_BxLxAxE = qkv_BxLxA.reshape(b, length, h + 2 * g, self.head_dim)
    q_BxLxHxE, k_BxLxGxE, v_BxLxGxE = jnp.split(qkv_BxLxAxE, (h, h + g), axis=2)
    dtype = v_BxLxGxE.dtype  # activation_dtype: attend rounds its operands to the compute dtype.
    # Self-Extend, ReRoPE: the logits of pairs i - j >= W from a second rotation of q and k.
    far = enc.far_set(q_BxLxHxE, k_BxLxGxE, pos_BxL, dtype)
    y_BxLxHxE = attend(
      enc.rotate(q_BxLxHxE, pos_BxL, is_query=True).astype(dtype),
      enc.rotate(k_BxLxGxE, pos_BxL, is_query=False).astype(dtype),
      v_BxLxGxE,
      q_pos_BxL=pos_BxL,
      k_pos_BxL=pos_BxL,
      bias_fn=enc.bias if enc.has_bias else None,
      impl=impl,
      block_size=block_size,
      operand_dtype=self.qkv.dtype,
      context_strategy=self.context_parallel,
      **far,
    )
    y_BxLxHxE = checkpoint_name(y_BxLxHxE, "attention_out")
    return checkpoint_name(self.out(y_BxLxHxE.reshape(b, length, -1)), "out_proj")


class Mlp(nnx.Module):
  """``W_2 gelu(W_1 x)`` or SwiGLU ``W_2 (silu(W_g x) * W_1 x)``."""

  def __init__(self, model_cfg, *, dtype, out_std: float, rngs: nnx.Rngs):
    _, hidden = resolved_dims(model_cfg)
    self.gated = model_cfg.mlp == "swiglu"
    d = model_cfg.model_dim
    width = (2 if self.gated else 1) * hidden
    std = model_cfg.init_std
    self.up = Linear(d, width, std=std, dtype=dtype, rngs=rngs, names=("embed", "mlp"))
    self.down = Linear(hidden, d, std=out_std, dtype=dtype, rngs=rngs, names=("mlp", "embed"))

  def __call__(self, x_BxLxD):
    h_BxLxF = checkpoint_name(self.up(x_BxLxD), "mlp_up")
    if self.gated:
      gate_BxLxF, h_BxLxF = jnp.split(h_BxLxF, 2, axis=-1)
      h_BxLxF = nnx.silu(gate_BxLxF) * h_BxLxF
    else:
      h_BxLxF = nnx.gelu(h_BxLxF)
    return checkpoint_name(self.down(h_BxLxF), "mlp_down")


def _residual(x_BxLxD: jax.Array) -> jax.Array:
  """The residual stream in its layout: batch over data and fsdp, sequence over context."""
  return sharding.constrain(x_BxLxD, "batch", "length", None)


def _norm(model_cfg, dtype, rngs: nnx.Rngs) -> nnx.Module:
  """``model.norm`` over the model width, its scale (and bias) named ``embed``."""
  norm = _NORMS[model_cfg.norm]
  names = dict(scale_metadata=_names("embed"))
  if norm is nnx.LayerNorm:
    names["bias_metadata"] = _names("embed")
  eps = model_cfg.get("norm_eps", 1e-5)
  return norm(model_cfg.model_dim, epsilon=eps, dtype=dtype, rngs=rngs, **names)


class Block(nnx.Module):
  """Pre-norm residual block: ``x += attn(norm(x)); x += mlp(norm(x))``."""

  def __init__(self, model_cfg, *, dtype, rngs: nnx.Rngs):
    out_std = model_cfg.init_std / (2 * model_cfg.num_layers) ** 0.5
    self.attn_norm = _norm(model_cfg, activation_dtype(dtype), rngs)
    self.attn = Attention(model_cfg, dtype=dtype, out_std=out_std, rngs=rngs)
    self.mlp_norm = _norm(model_cfg, activation_dtype(dtype), rngs)
    self.mlp = Mlp(model_cfg, dtype=dtype, out_std=out_std, rngs=rngs)

  def __call__(self, x_BxLxD, pos_BxL, enc, *, impl: str, block_size: int, train: bool):
    x_BxLxD = x_BxLxD + self.attn(
      self.attn_norm(x_BxLxD), pos_BxL, enc, impl=impl, block_size=block_size
    )
    mlp = lambda x: self.mlp(self.mlp_norm(x))
    # Chunks only where nothing is differentiated: a training step's backward keeps every
    # chunk's intermediates anyway, and XLA:TPU kept one weight gradient per chunk
    # (docs/scaling.md).
    return x_BxLxD + (mlp(x_BxLxD) if train else over_sequence_chunks(mlp, x_BxLxD))


class Transformer(nnx.Module):
  """``Transformer(config, rngs=...)(inputs_BxL int32) -> logits float32 [B, L, V]``
  (``logits_dtype=model.activation_dtype``: as training uses them, see
  :func:`activation_dtype`).

  ``attention`` / ``attention_block`` are plain attributes (from ``config.model``); use
  :func:`with_attention` to evaluate the same parameters with another implementation.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    m = config.model
    _choice("norm", m.norm, tuple(_NORMS))
    _choice("mlp", m.mlp, _MLPS)
    _choice("attention", m.attention, IMPLEMENTATIONS)
    _choice("compute_dtype", m.compute_dtype, tuple(_DTYPES))
    if m.model_dim % m.num_heads and not m.head_dim:
      raise ValueError(f"model.model_dim={m.model_dim} must divide by model.num_heads")
    if m.num_heads % kv_heads(m):
      raise ValueError(f"model.num_kv_heads={kv_heads(m)} must divide model.num_heads")
    _choice("remat", m.get("remat", "none"), tuple(REMAT_POLICIES))
    _choice("gather_dtype", m.get("gather_dtype", "float32"), tuple(_DTYPES))
    self.dtype = _DTYPES[m.compute_dtype]
    self.scan_layers = m.get("scan_layers", False)
    self.remat = m.get("remat", "none")
    self.gather_dtype = _DTYPES[m.get("gather_dtype", "float32")]
    self.activation_dtype = activation_dtype(self.dtype)
    self.pe_name = config.pe.name
    self.attention = m.attention
    self.attention_block = m.attention_block
    # Vaswani/fairseq scale token embeddings by sqrt(D) so they are not drowned by an added PE.
    self.embed_scale = float(m.model_dim) ** 0.5 if m.get("scale_embeddings", False) else 1.0
    head_dim, _ = resolved_dims(m)
    self.embed = nnx.Embed(
      m.vocab_size,
      m.model_dim,
      embedding_init=nnx.initializers.normal(m.init_std),
      embedding_metadata=_names("vocab", "embed"),
      rngs=rngs,
    )
    num_encodings = 1 if config.pe.get("share_across_layers", True) else m.num_layers
    build = dict(num_heads=m.num_heads, head_dim=head_dim, model_dim=m.model_dim, rngs=rngs)
    encodings = [build_encoding(config.pe, **build) for _ in range(num_encodings)]
    blocks = [Block(m, dtype=self.dtype, rngs=rngs) for _ in range(m.num_layers)]
    # Stacked (model.scan_layers): one module whose arrays have a leading layer axis, made from
    # the same per-layer modules, so both layouts start from the same parameters.
    self.stacked_encodings = self.scan_layers and num_encodings > 1
    if self.stacked_encodings and isinstance(encodings[0], PositionsWrapper):
      raise ValueError(
        "model.scan_layers=True with pe.share_across_layers=False draws positions from one "
        "layer's RNG; allowed: pe.share_across_layers=True with pe.randomized/pe.pose_target_len"
      )
    if self.stacked_encodings:  # Each layer's encoding is stacked with (inside) its block.
      for block, encoding in zip(blocks, encodings, strict=True):
        block.encoding = encoding
    self.encodings = nnx.List([] if self.stacked_encodings else encodings)
    self.blocks = stack_modules(blocks) if self.scan_layers else nnx.List(blocks)
    self.final_norm = _norm(m, self.activation_dtype, rngs)
    d, v = m.model_dim, m.vocab_size
    self.unembed = (
      None
      if m.tie_embeddings
      else Linear(d, v, std=m.init_std, dtype=self.dtype, rngs=rngs, names=("embed", "vocab"))
    )

  def embed_tokens(self, inputs_BxL: jax.Array, *, train: bool = False):
    """``(x_BxLxD, pos_BxL)``: token embeddings with the absolute encoding (if any) added."""
    b, length = inputs_BxL.shape
    enc = self.first_encoding()
    if enc.max_length is not None and length > enc.max_length:
      raise ValueError(
        f"sequence length {length} exceeds {enc.max_length}, the longest pe.name="
        f"{self.pe_name!r} can represent (pe.max_len / pe.max_random_len)"
      )
    pos_BxL = enc.positions(b, length, train=train)
    x_BxLxD = enc.embed(self.embed(inputs_BxL) * self.embed_scale, pos_BxL)
    return _residual(x_BxLxD), pos_BxL

  def first_encoding(self) -> PositionalEncoding:
    """The encoding that supplies positions and the input embedding: the first layer's."""
    if not self.stacked_encodings:
      return self.encodings[0]
    graphdef, state = nnx.split(self.blocks.encoding)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[0], state))

  def project(self) -> None:
    """Every encoding's ``project`` hook (in place; elementwise, so stacked ones too)."""
    for encoding in [self.blocks.encoding] if self.stacked_encodings else self.encodings:
      encoding.project()

  def _remat(self, fn, prevent_cse: bool = True):
    """``fn`` (a pure function of one block) under ``jax.checkpoint`` with ``model.remat``'s
    policy."""
    if self.remat == "none":
      return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[self.remat], prevent_cse=prevent_cse)

  def layers(self, x_BxLxD: jax.Array, pos_BxL: jax.Array, train: bool = False) -> jax.Array:
    """The transformer blocks on embedded inputs: the residual stream ``[B, L, D]``. With
    ``model.scan_layers`` a ``lax.scan`` over the stacked blocks, each layer's weights cast to
    ``model.gather_dtype`` and gathered (FSDP) inside the scan body. ``train``: the MLP runs
    over the whole sequence (no ``SEQUENCE_CHUNK``s), as a training step differentiates it."""
    attend_kw = dict(impl=self.attention, block_size=self.attention_block, train=train)
    if self.scan_layers:
      return self._scan_blocks(x_BxLxD, pos_BxL, attend_kw)
    for i, block in enumerate(self.blocks):
      enc = self.encodings[i if len(self.encodings) > 1 else 0]
      if self.remat == "none":
        x_BxLxD = block(x_BxLxD, pos_BxL, enc, **attend_kw)
      else:
        graphdef, state = nnx.split(block)
        run = lambda state, x, g=graphdef, e=enc: nnx.merge(g, state)(x, pos_BxL, e, **attend_kw)
        x_BxLxD = self._remat(run)(state, x_BxLxD)
      x_BxLxD = _residual(x_BxLxD)
    return x_BxLxD

  def _scan_blocks(self, x_BxLxD, pos_BxL, attend_kw):
    graphdef, blocks = nnx.split(self.blocks)

    def body(x_BxLxD, layer):
      block = nnx.merge(graphdef, sharding.gather_layer(layer, self.gather_dtype))
      enc = block.encoding if self.stacked_encodings else self.encodings[0]
      x_BxLxD = block(x_BxLxD, pos_BxL, enc, **attend_kw)
      return _residual(x_BxLxD), None

    return jax.lax.scan(self._remat(body, prevent_cse=False), x_BxLxD, blocks)[0]

  def head(self, x_BxLxD: jax.Array, logits_dtype=jnp.float32) -> jax.Array:
    """Final norm and output projection of the residual stream: logits ``[B, L, V]``
    (float32, or ``logits_dtype``: training takes them in the compute dtype, see
    :func:`pe_research.losses.softmax_nll`)."""
    return self._unembed(self.final_norm(x_BxLxD), logits_dtype)

  def _unembed(self, x_BxLxD, logits_dtype, start: int = 0, size: int | None = None):
    """Logits of the normed residual stream for vocabulary entries ``start .. start+size−1``
    (default: all of them)."""
    columns = slice(start, None if size is None else start + size)
    if self.unembed is not None:
      return self.unembed(x_BxLxD, out_dtype=logits_dtype, columns=columns)
    table_VxD = self.embed.embedding[...][columns]
    return backend.linear(x_BxLxD, table_VxD, logits_dtype, self.dtype, w_transposed=True)

  def decode(self, x_BxLxD, pos_BxL, logits_dtype=jnp.float32, train: bool = False):
    """Transformer layers and output head on embedded inputs: logits ``[B, L, V]``."""
    return self.head(self.layers(x_BxLxD, pos_BxL, train), logits_dtype)

  def __call__(self, inputs_BxL: jax.Array, *, train: bool = False, logits_dtype=jnp.float32):
    x_BxLxD, pos_BxL = self.embed_tokens(inputs_BxL, train=train)
    return self.decode(x_BxLxD, pos_BxL, logits_dtype, train)

  def nll_and_hits(self, inputs_BxL: jax.Array, targets_BxL: jax.Array, *, train: bool = False):
    """``(nll_BxL, hit_BxL)``: ``-log softmax(logits)[target]`` (float32) and
    ``argmax(logits) == target``, with the logits computed a chunk of positions
    (``SEQUENCE_CHUNK``, fewer for a large vocabulary chunk: ``LOGITS_PER_CHUNK``) and a chunk
    of the vocabulary (``VOCAB_CHUNK``: ``losses.nll_and_hits_by_vocab_chunks``) at a time, so
    long evaluations never hold float32 ``[B, L, V]`` logits."""
    x_BxLxD, pos_BxL = self.embed_tokens(inputs_BxL, train=train)
    vocab = self.embed.embedding.shape[0]
    vocab_chunk = min(vocab, VOCAB_CHUNK)

    def score(x_BxCxD, targets_BxC):
      x_BxCxD = self.final_norm(x_BxCxD)
      logits = lambda start, size: self._unembed(x_BxCxD, jnp.float32, start, size)
      return losses.nll_and_hits_by_vocab_chunks(logits, vocab, vocab_chunk, targets_BxC)

    rows = 2 ** int(math.log2(LOGITS_PER_CHUNK // vocab_chunk))
    chunk = min(SEQUENCE_CHUNK, max(256, rows))
    return over_sequence_chunks(score, self.layers(x_BxLxD, pos_BxL), targets_BxL, chunk=chunk)


def with_attention(model: Transformer, impl: str, block_size: int | None = None) -> Transformer:
  """A view of ``model`` using attention ``impl``; parameters are shared, not copied."""
  _choice("attention", impl, IMPLEMENTATIONS)
  view = nnx.merge(*nnx.split(model))
  view.attention = impl
  if block_size is not None:
    view.attention_block = block_size
  return view
