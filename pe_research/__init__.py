"""pe_research: positional encodings for decoder-only transformers in JAX/Flax NNX.

Shape suffixes, one alphabet for the whole package. A suffix is read as the shape: ``x_BxLxD``
has shape ``[B, L, D]``; a digit is a literal size (``scale_BxLx1x1``, ``qkv_3xBxHxLxE``).
Docstrings write shapes with the same letters (``[B, L, H, E]``); formulas keep their papers'
symbols. Each letter has one meaning:

  B   batch
  L   sequence length (positions)
  Q   query positions   } only where queries meet keys: attention and the logit biases
  K   key positions     } (``logits_BxHxQxK``, ``k_pos_BxK``)
  H   attention (query) heads
  G   key/value heads (grouped-query attention, G divides H)
  Y   query heads per key/value head, H / G
  A   heads of the fused q/k/v projection, H + 2G
  M   folded query rows of grouped attention, L·Y (row l·Y + y: head g·Y + y at position l)
  D   model width
  E   head width (per-head dim)
  F   MLP width (the model's MLP, FIRE's position MLP)
  V   vocabulary
  R   frequencies: rotary or sinusoidal pairs of dims; R2 = 2R, the dims they cover
  S   stride
  N   flattened rows: B·L, or any axes flattened into one (a token stream, lookup indices)
  P   key positions of a flash-attention block (the block size)
  T   query rows of a flash-attention block, P·Y
  J   block or chunk index of arrays stacked per block or chunk
  C   positions of a sequence chunk
  Z   rows of a lookup table (T5 buckets, learned positions)
  W   evaluation windows (scored rows)
  U   units of an interval (bootstrap units, seeds)
  I   bootstrap resamples
  X   any other axes, possibly none (``x_BxHxLxX``, ``angle_XxR``)
"""
