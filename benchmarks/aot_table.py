"""The docs/scaling.md table: the YaRN 7B × 65,536-token step with each memory lever on and off,
AOT-compiled for a TPU v5e-256 (``--topology=v5e:16x16``, libtpu) and for 8 H100s (8 fake CPU
devices: an approximation), one ``python -m pe_research.dry_run`` process per row, in turn.

  PYTHONPATH=.tpu-site python -m benchmarks.aot_table --out=runs/aot_table [--rows=NAME,...]

A row whose JSON is already in OUT is not compiled again (delete it to re-measure). Prints the
markdown table (also OUT/table.md): per device argument, temp, output − alias (the new state
is written in place of the donated one), total, the verdict (a TPU compile that runs out of
memory gives only its temporaries' GiB, from XLA's message), the compile time, and each row's
flags (its command is ``python -m pe_research.dry_run RECIPE FLAGS``). The layer loop
(``model.scan_layers=False``: 32 unrolled blocks) is compiled for the H100s only: for the v5e
topology XLA:TPU's compile of it passed 13 GB of host memory within a minute (killed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

RECIPE = "configs/recipes/yarn_llama2_7b_64k.py"
V5E = f"--config={RECIPE} --topology=v5e:16x16"
H100 = f"--config={RECIPE}:target=h100x8 --devices=8 --chip=h100"
# name -> (flags after the recipe, what the row changes). The recipe itself: scan_layers with
# per-layer gathers in bf16, remat=full, ring context parallelism; v5e: fsdp=32 × context=8 and
# 2 accumulated micro-batches, H100: fsdp=4 × context=2 and 16.
ROWS = {
  "v5e_recipe": (V5E, "the recipe"),
  "v5e_gather_fp32": (f"{V5E} --config.model.gather_dtype=float32", "gather in fp32"),
  "v5e_all_gather": (f"{V5E} --config.model.context_parallel=all_gather", "all_gather strategy"),
  "v5e_context4": (
    f"{V5E} --config.mesh.fsdp=64 --config.mesh.context=4 --config.train.grad_accum_steps=1",
    "context 4 (fsdp 64, no accumulation)",
  ),
  "v5e_context16": (
    f"{V5E} --config.mesh.fsdp=16 --config.mesh.context=16 --config.train.grad_accum_steps=4",
    "context 16 (fsdp 16, 4 micro-batches)",
  ),
  "v5e_context1": (
    f"{V5E} --config.mesh.fsdp=64 --config.mesh.context=1 --config.train.grad_accum_steps=1",
    "context 1 (fsdp 64 × data 4)",
  ),
  "v5e_remat_none": (f"{V5E} --config.model.remat=none", "remat none"),
  "h100_recipe": (H100, "the recipe"),
  "h100_gather_fp32": (f"{H100} --config.model.gather_dtype=float32", "gather in fp32"),
  "h100_all_gather": (
    f"{H100} --config.model.context_parallel=all_gather",
    "all_gather strategy",
  ),
  "h100_context1": (
    f"{H100} --config.mesh.fsdp=8 --config.mesh.context=1 --config.train.grad_accum_steps=8",
    "context 1 (fsdp 8, 8 micro-batches)",
  ),
  "h100_remat_none": (f"{H100} --config.model.remat=none", "remat none"),
  "h100_no_accum": (f"{H100} --config.train.grad_accum_steps=1", "no accumulation"),
  "h100_whole_gather": (
    f"{H100} --config.model.scan_layers=False --config.model.gather_dtype=float32",
    "whole-model gather (layer loop)",
  ),
}


def _gib(n: int) -> str:
  return f"{n / 1024**3:.2f}"


def run_row(name: str, out: str) -> dict:
  path = os.path.join(out, f"{name}.json")
  if not os.path.exists(path):
    flags = ROWS[name][0].split()
    cmd = ["nice", "-n", "5", sys.executable, "-m", "pe_research.dry_run", *flags, f"--out={path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
      return {"failed": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
  with open(path) as f:
    return json.load(f)


def table_row(name: str, r: dict) -> str:
  flags, what = ROWS[name]
  flags = flags.replace(V5E, "").replace(H100, "").strip() or "(none)"
  target = "v5e-256" if name.startswith("v5e") else "8 × H100 (approx.)"
  if "failed" in r:
    return f"| {target} | {what} | | | | | {r['failed']} | | `{flags}` |"
  d = r["per_device"]
  if "error" in d:  # XLA:TPU names the temporaries' bytes: "... HLO temporaries (25.10G) ...".
    temp = re.search(r"temporaries \(([\d.]+)G\)", d["error"])
    cells = f"| | {temp.group(1) + ' (XLA)' if temp else ''} | | | {r['verdict']}"
  else:
    cells = (
      f"| {_gib(d['argument_bytes'])} | {_gib(d['temp_bytes'])} "
      f"| {_gib(d['output_bytes'] - d['alias_bytes'])} | **{_gib(d['total_bytes'])}** "
      f"| {r['verdict']}"
    )
  seconds = d["lower_seconds"] + d["compile_seconds"]
  return f"| {target} | {what} {cells} | {seconds:.0f} s | `{flags}` |"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/aot_table")
  parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated names of ROWS")
  args = parser.parse_args()
  names = args.rows.split(",")
  unknown = sorted(set(names) - set(ROWS))
  if unknown:
    parser.error(f"--rows: unknown {unknown}; allowed: {', '.join(ROWS)}")
  os.makedirs(args.out, exist_ok=True)
  lines = [
    "| target | lever changed | argument GiB | temp GiB | output − alias GiB | total GiB "
    "| verdict | compile | flags |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for name in names:
    lines.append(table_row(name, run_row(name, args.out)))
    print(lines[-1], flush=True)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
