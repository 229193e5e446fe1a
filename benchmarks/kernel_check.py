"""The Pallas attention kernel against dense attention on the device it compiles for: the first
section of ``make bench-gpu`` (the Triton form on a GPU), so one prepared command says whether
the kernel compiles and is right there before its speed is timed.

  python -m benchmarks.kernel_check  # any backend: the Triton form (interpreted off a GPU)

Per encoding (and Self-Extend, GQA, ragged L): fp32 inputs, the output and the gradients of
q, k, v and the bias parameters of ``sum(out * cotangent)``, against ``dense_attention`` at
``highest`` matmul precision (no TF32), as the largest error of each array relative to
``max(1, its largest reference value)`` (inputs are N(0, 1); a gradient that is zero in exact
arithmetic, such as that of a per-head constant bias, is compared absolutely). A kernel that
fails to compile is recorded with its one-line error and the next one still runs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from configs.base import get_config
from pe_research import backend
from pe_research.attention import dense_attention
from pe_research.encodings.registry import build_encoding
from pe_research.kernels.pallas_attention import pallas_attention

CASES = {
  "rope": dict(name="rope"),
  "alibi": dict(name="alibi"),
  "t5": dict(name="t5"),
  "kerple": dict(name="kerple"),
  "fire": dict(name="fire"),
  "self_extend": dict(name="rope", self_extend_window=100, self_extend_group=4),
}
TOLERANCE = 1e-4  # fp32 flash vs dense: reassociated sums, exp of shifted logits


def check(fields: dict, *, length=300, heads=6, kv_heads=2, head_dim=64, block=64) -> float:
  """Largest relative error of the output and every gradient, Triton form vs dense."""
  pe = get_config().pe
  pe.update(fields)
  enc = build_encoding(pe, num_heads=heads, head_dim=head_dim, model_dim=64, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, length, heads, head_dim))
  k, v = (jax.random.normal(key, (2, length, kv_heads, head_dim)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape)
  pos = jnp.arange(length)[None]
  kernel_bias = enc.kernel_bias() if enc.has_bias else None
  params = () if kernel_bias is None else kernel_bias.params
  interpret = backend.policy().interprets("triton")

  def loss(impl, q, k, v, params):
    far = None
    if enc.window is not None:
      far = tuple(enc.rotate_far(x, pos, is_query=is_q) for x, is_q in ((q, True), (k, False)))
    q, k = enc.rotate(q, pos, is_query=True), enc.rotate(k, pos, is_query=False)
    bias = None if kernel_bias is None else type(kernel_bias)(kernel_bias.fn, params)
    if impl == "pallas":
      out = pallas_attention(
        q,
        k,
        v,
        pos,
        pos,
        bias,
        block,
        far=far,
        window=enc.window,
        interpret=interpret,
        lowering="triton",
      )
    else:
      bias_fn = None if bias is None else lambda qp, kp: _dense_bias(bias, qp, kp, heads)
      out = dense_attention(q, k, v, pos, pos, bias_fn, far=far, window=enc.window)
    return jnp.sum(out * cotangent), out

  results = {}
  for impl in ("pallas", "dense"):
    with jax.default_matmul_precision("highest"):
      grad = jax.jit(jax.grad(lambda *a, impl=impl: loss(impl, *a), (0, 1, 2, 3), has_aux=True))
      grads, out = grad(q, k, v, params)
    results[impl] = [out, *jax.tree.leaves(grads)]
  return max(
    float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1.0))
    for got, want in zip(results["pallas"], results["dense"], strict=True)
  )


def _dense_bias(bias, q_pos_BxQ, k_pos_BxK, heads: int) -> jax.Array:
  """``[1, H, Q, K]`` from the kernel form itself (the rows of every head stacked), so the
  reference and the kernel read the same parameters."""
  q_Qx1, k_1xK = q_pos_BxQ[0][:, None], k_pos_BxK[0][None, :]
  rows = [
    bias.fn(q_Qx1, k_1xK, jnp.full(q_Qx1.shape, h, jnp.int32), *bias.params) for h in range(heads)
  ]
  return jnp.stack(rows)[None]


def run(names=tuple(CASES)) -> dict:
  rows = {}
  for name in names:
    start = time.perf_counter()
    try:
      error = check(CASES[name])
    except Exception as e:  # A kernel that does not compile must not lose the other checks.
      first_line = (str(e).strip().splitlines() or [""])[0][:300]
      rows[name] = {"error": f"{type(e).__name__}: {first_line}"}
    else:
      rows[name] = {"max_rel_err": error, "ok": error <= TOLERANCE}
    rows[name]["seconds"] = time.perf_counter() - start
    print(f"kernel check {name}: {rows[name]}", flush=True)
  return rows


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=",".join(CASES), help=f"Of {', '.join(CASES)}.")
  args = parser.parse_args(argv)
  names = [c for c in args.cases.split(",") if c]
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    parser.error(f"--cases: {', '.join(unknown)} not in {', '.join(CASES)}")
  return run(names)


if __name__ == "__main__":
  main()
