"""Peak host memory of importing an HF folder: every tensor read at once (the importer before
streaming) against the streaming import (a tensor at a time), each in a fresh process.

  python -m benchmarks.import_memory --out=docs/benchmarks/import_memory

A synthetic Llama folder (random bf16 weights, Llama-2's proportions at a smaller width: MHA,
F = 2.75 D, untied, the embedding smaller than a layer; about 0.9 GB as float32) is written in
several shards + index. Each mode runs in its own process and reports its resident memory
before the import (VmRSS, after importing JAX and the package) and its peak (VmHWM):

  whole_dict      every tensor read as float32 into one dict, converted, then put on the device
                  (the importer before streaming: ``read_hf_folder`` + ``params_from_hf``)
  streaming       ``params_from_hf(SafetensorsFolder)``: read a tensor at a time, each of ours
                  put on the (CPU) device as it is built. On a CPU the device IS host memory,
                  so the placed model counts in the peak.
  streaming_host  the same, each placed tensor freed at once: the host's own working set, what
                  a host sees when the device memory is an accelerator's
  import          ``import_checkpoint`` (streaming, then the Orbax checkpoint written)

The report gives peak - before against the model's float32 bytes and its largest layer's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks import bench_lib
from pe_research import runtime

MODES = ("whole_dict", "streaming", "streaming_host", "import")
HF_CONFIG = {
  "model_type": "llama",
  "architectures": ["LlamaForCausalLM"],
  "vocab_size": 8192,
  "hidden_size": 1024,
  "intermediate_size": 2816,
  "num_hidden_layers": 16,
  "num_attention_heads": 16,
  "num_key_value_heads": 16,
  "rms_norm_eps": 1e-5,
  "max_position_embeddings": 4096,
  "tie_word_embeddings": False,
}


def _model_cfg():
  from pe_research.pretrained import convert

  return convert.config_from_hf(HF_CONFIG, tokenizer="bytes").model


def write_folder(path: str, max_shard_size: str) -> None:
  """The synthetic folder: config.json, bf16 shards + index, a tokenizer.json of one token
  (end-of-text)."""
  from tokenizers import Tokenizer, models

  from pe_research.pretrained import layout, shards

  os.makedirs(path)
  specs = layout.hf_specs(_model_cfg())
  shapes = {name: shape for name, (shape, _) in specs.items()}
  rng = np.random.default_rng(0)
  tensors = ((name, rng.standard_normal(shape, np.float32)) for name, shape in shapes.items())
  files = shards.write_shards(path, shapes, tensors, "bfloat16", max_shard_size)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(HF_CONFIG, f)
  with open(os.path.join(path, "tokenizer.json"), "w") as f:
    eot = "<|endoftext|>"
    f.write(Tokenizer(models.WordLevel({eot: 0}, unk_token=eot)).to_str())
  print(f"wrote {len(files)} shards to {path}", flush=True)


def _sizes() -> dict:
  """float32 bytes of the model, of its largest layer and of its largest tensor of ours."""
  from pe_research.pretrained import layout

  per_layer: dict = {}
  total = largest = 0
  for entry in layout.entries(_model_cfg()):
    nbytes = 4 * int(np.prod(entry.shape))
    total, largest = total + nbytes, max(largest, nbytes)
    if entry.path[0] == "blocks":
      per_layer[entry.path[1]] = per_layer.get(entry.path[1], 0) + nbytes
  return {"model": total, "largest_layer": max(per_layer.values()), "largest_tensor": largest}


def run_mode(mode: str, folder: str) -> dict:
  """One measurement (call in a fresh process)."""
  import jax
  import jax.numpy as jnp

  from pe_research.pretrained import convert, hf_folder, importer

  config = convert.config_from_hf(HF_CONFIG, tokenizer="bytes")
  jax.block_until_ready(jnp.zeros(()))
  before = bench_lib.rss_gib(peak=False)
  if mode == "whole_dict":
    params = convert.params_from_hf(hf_folder.read_hf_folder(folder)[1], config)
    params = jax.block_until_ready(jax.tree.map(jnp.asarray, params))
  elif mode == "streaming":
    tensors = hf_folder.SafetensorsFolder(folder)
    params = convert.params_from_hf(tensors, config, importer.placer(config))
    jax.block_until_ready(params)
  elif mode == "streaming_host":
    place = importer.placer(config)

    def place_and_free(path, x):
      place(path, x).delete()

    convert.params_from_hf(hf_folder.SafetensorsFolder(folder), config, place_and_free)
  else:
    workdir = tempfile.mkdtemp()
    os.rmdir(workdir)
    importer.import_checkpoint(folder, workdir)
  return {"mode": mode, "before_gib": before, "peak_gib": bench_lib.rss_gib(peak=True)}


def _measure(mode: str, folder: str) -> dict:
  command = [
    sys.executable,
    "-m",
    "benchmarks.import_memory",
    f"--mode={mode}",
    f"--folder={folder}",
  ]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{mode} failed: {result.stderr[-2000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/benchmarks/import_memory")
  parser.add_argument("--mode", choices=MODES, help="internal: one measurement")
  parser.add_argument("--folder", help="internal: the synthetic folder")
  parser.add_argument("--max_shard_size", default="100MB")
  parser.add_argument("--repeats", type=int, default=3, help="runs per mode, interleaved")
  args = parser.parse_args()
  if args.mode:
    print(json.dumps(run_mode(args.mode, args.folder)))
    return
  sizes = _sizes()
  gib = {key: value / 2**30 for key, value in sizes.items()}
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "hf")
    write_folder(folder, args.max_shard_size)
    shard_files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    rows = [_measure(mode, folder) for _ in range(args.repeats) for mode in MODES]
  lines = [
    "# Peak host memory of importing an HF folder (each run a fresh process)",
    "",
    f"Machine: {json.dumps(runtime.machine())}",
    f"Synthetic Llama folder: {json.dumps(HF_CONFIG)}; bf16 in {len(shard_files)} shards.",
    f"float32 sizes: model {gib['model']:.3f} GiB, largest layer {gib['largest_layer']:.3f} GiB, "
    f"largest tensor of ours {gib['largest_tensor']:.3f} GiB.",
    f"peak - before: median [min, max] of {args.repeats} runs per mode.",
    "",
    "| mode | RSS before (GiB) | peak - before (GiB) | / largest layer | / model |",
    "|---|---|---|---|---|",
  ]
  for mode in MODES:
    runs = [row for row in rows if row["mode"] == mode]
    deltas = np.array([row["peak_gib"] - row["before_gib"] for row in runs])
    median, low, high = np.median(deltas), deltas.min(), deltas.max()
    lines.append(
      f"| {mode} | {np.median([row['before_gib'] for row in runs]):.3f} "
      f"| {median:.3f} [{low:.3f}, {high:.3f}] "
      f"| {median / gib['largest_layer']:.2f}x [{low / gib['largest_layer']:.2f}, "
      f"{high / gib['largest_layer']:.2f}] | {median / gib['model']:.2f}x |"
    )
  host = np.array([r["peak_gib"] - r["before_gib"] for r in rows if r["mode"] == "streaming_host"])
  below = int((host < 2 * gib["largest_layer"]).sum())
  lines += [
    "",
    f"streaming_host stayed below 2x the largest layer in {below} of {len(host)} runs (its peak "
    "includes the CPU device's own copy of the tensor being placed, which an accelerator holds "
    "in device memory). On a CPU the placed model itself is host memory (streaming, import).",
  ]
  results = {"machine": runtime.machine(), "hf_config": HF_CONFIG, "sizes": sizes, "rows": rows}
  bench_lib.write_results(args.out, results, lines)


if __name__ == "__main__":
  main()
