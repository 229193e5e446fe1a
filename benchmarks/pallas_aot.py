"""Compile the Pallas attention kernel for a TPU topology on this host (no TPU needed).

  PYTHONPATH=/work/.tpu-site python -m benchmarks.pallas_aot --lengths=8192,65536,131072

Needs libtpu (``make tpu-aot-deps``, /work/.tpu-site/README.txt) in its own process. For each
encoding and length: attention of one sequence per chip (``--heads`` query heads of
``--head_dim``, ``--kv_heads`` KV heads, bf16) under ``jax.shard_map`` over the chips of
``--topology`` (Mosaic kernels compile only there), forward and forward+backward (gradients of
q, k, v and of the encoding's parameters), through ``attention.attend(impl="pallas")`` with the
TPU backend policy. Prints a markdown table of ``memory_analysis()`` per chip and compile times;
docs/pallas_attention.md has the figures.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import topologies
from jax.sharding import PartitionSpec as P

from pe_research import backend
from pe_research.attention import attend
from pe_research.encodings.alibi import ALiBi
from pe_research.encodings.fire import Fire
from pe_research.encodings.kerple import Kerple
from pe_research.encodings.rope import RoPE
from pe_research.encodings.t5 import T5RelativeBias

MIB = 1 << 20


def encodings(heads: int, head_dim: int) -> dict:
  rngs = nnx.Rngs(0)
  return {
    "alibi": ALiBi(heads),
    "t5": T5RelativeBias(
      heads, num_buckets=32, max_distance=128, bidirectional=False, init_std=0.03, rngs=rngs
    ),
    "fire": Fire(heads, hidden=32, c_init=0.1, l_thr_init=512.0, rngs=rngs),
    "rope": RoPE(head_dim),
    "kerple_log": Kerple(heads, variant="log", rngs=rngs),
    "kerple_power": Kerple(heads, variant="power", rngs=rngs),
    "self_extend": RoPE(head_dim, self_extend_window=1024, self_extend_group=8, logn_len=4096),
    "rerope": RoPE(head_dim, rerope_window=1024),
  }


def attention_loss(graphdef, state, q, k, v, impl: str, block: int):
  """``sum(attend(rotate(q), rotate(k), v))`` of one shard (its rows of the batch)."""
  enc = nnx.merge(graphdef, state)
  pos = jnp.arange(q.shape[1], dtype=jnp.int32)[None]
  far = enc.far_set(q, k, pos)
  out = attend(
    enc.rotate(q, pos, is_query=True),
    enc.rotate(k, pos, is_query=False),
    v,
    q_pos_BxL=pos,
    k_pos_BxL=pos,
    bias_fn=enc.bias if enc.has_bias else None,
    impl=impl,
    block_size=block,
    **far,
  )
  return out, jnp.sum(out.astype(jnp.float32))


def compile_one(mesh, enc, length: int, args, backward: bool):
  """The compiled executable of the forward (or forward and backward) pass, and seconds."""
  graphdef, state = nnx.split(enc)
  batch = mesh.devices.size

  def sharded(state, q, k, v):
    return jax.shard_map(
      lambda s, q, k, v: attention_loss(graphdef, s, q, k, v, args.impl, args.block),
      mesh=mesh,
      in_specs=(P(), P("data"), P("data"), P("data")),
      out_specs=(P("data"), P()),
      check_vma=False,
    )(state, q, k, v)

  def step(state, q, k, v):
    if not backward:
      return sharded(state, q, k, v)[0]
    loss = lambda *xs: jnp.sum(sharded(*xs)[1])
    return jax.grad(loss, argnums=(0, 1, 2, 3))(state, q, k, v)

  rep = jax.sharding.NamedSharding(mesh, P())
  shard = jax.sharding.NamedSharding(mesh, P("data"))
  structs = [
    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state),
    jax.ShapeDtypeStruct((batch, length, args.heads, args.head_dim), jnp.bfloat16, sharding=shard),
    *[
      jax.ShapeDtypeStruct(
        (batch, length, args.kv_heads, args.head_dim), jnp.bfloat16, sharding=shard
      )
    ]
    * 2,
  ]
  start = time.perf_counter()
  compiled = jax.jit(step).lower(*structs).compile()
  return compiled, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--lengths", default="8192,65536,131072")
  parser.add_argument("--encodings", default="alibi,t5,fire,rope")
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=128)
  parser.add_argument("--block", type=int, default=256)
  parser.add_argument("--impl", default="pallas", help="attention (xla: the dense comparison)")
  args = parser.parse_args()

  topology = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
  devices = np.asarray(topology.devices)
  mesh = jax.sharding.Mesh(devices.reshape(-1), ("data",))
  backend.set_policy(backend.Policy.for_platform("tpu", cores=1, local_devices=devices.size))
  print(
    f"{args.topology} ({devices.size} chips, {devices.flat[0].device_kind}), one sequence per "
    f"chip, H={args.heads} G={args.kv_heads} E={args.head_dim} bf16, {args.impl} attention, "
    f"block {args.block}\n"
  )
  print("| encoding | tokens | pass | temp MiB | arguments MiB | output MiB | compile s |")
  print("|---|---:|---|---:|---:|---:|---:|")
  encs = encodings(args.heads, args.head_dim)
  for name in args.encodings.split(","):
    for length in (int(x) for x in args.lengths.split(",")):
      for backward in (False, True):
        try:
          compiled, seconds = compile_one(mesh, encs[name], length, args, backward)
        except jax.errors.JaxRuntimeError as e:  # RESOURCE_EXHAUSTED: does not fit the chip
          print(f"| {name} | {length} | {'fwd+bwd' if backward else 'fwd'} | {str(e)[:90]} |")
          continue
        mem = compiled.memory_analysis()
        print(
          f"| {name} | {length} | {'fwd+bwd' if backward else 'fwd'} | "
          f"{mem.temp_size_in_bytes / MIB:.1f} | {mem.argument_size_in_bytes / MIB:.1f} | "
          f"{mem.output_size_in_bytes / MIB:.1f} | {seconds:.1f} |",
          flush=True,
        )


if __name__ == "__main__":
  main()
