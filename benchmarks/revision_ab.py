"""Training step time of two source trees (e.g. two git revisions) in one run: same-run A/B.

  git worktree add /tmp/old <revision>
  python -m benchmarks.revision_ab --old=/tmp/old --new=. --encodings=nope,rope,alibi --rounds=7

Each (tree, encoding) trains in its own process, importing the package from its tree
(``PYTHONPATH``), on the d256x4 benchmark model (T=256, B=16, blockwise attention, 128-blocks,
8 steps per call; ``benchmarks/bench_variants.jax_trainer`` or, in trees before the
benchmarks/ folder, ``experiments/bench_variants``). Once all are built they are timed in
interleaved rounds (one turn of ``--calls`` calls each; old and new swap order every round).
Prints and writes, per encoding, the median step time of each tree and the median new/old
ratio of the per-round times with its range; "within noise" unless the range clears 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks.bench_report import ratio_stats

WORKER = r"""
import json, os, statistics, sys
root, pe, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, root)
os.chdir(root)
if os.path.isdir(os.path.join(root, "benchmarks")):
  from benchmarks import bench_lib, bench_variants
else:
  from experiments import bench_lib, bench_variants
import pe_research
here = os.path.realpath(pe_research.__file__)
assert here.startswith(os.path.realpath(root)), f"imported {here}, not from {root}"
config = bench_lib.model_config(256, 4, 256, 16, pe, attention="blockwise", attention_block=128)
config.train.steps_per_call = 8
timed = bench_variants.jax_trainer(config)
timed = timed[0] if isinstance(timed, tuple) else timed
print("ready", flush=True)
for _ in sys.stdin:
  print(json.dumps(statistics.median(timed()[0] for _ in range(calls))), flush=True)
"""


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--old", required=True, help="Source tree A (a git worktree).")
  parser.add_argument("--new", default=".", help="Source tree B.")
  parser.add_argument("--encodings", default="nope,rope,alibi,t5", help="Comma-separated pe.name.")
  parser.add_argument("--rounds", type=int, default=7, help="Interleaved rounds.")
  parser.add_argument("--calls", type=int, default=3, help="Timed calls per turn (median).")
  parser.add_argument("--out", default="runs/revision_ab.json", help="Results JSON.")
  args = parser.parse_args(argv)
  trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
  for name, tree in trees.items():
    if not os.path.isdir(os.path.join(tree, "pe_research")):
      parser.error(f"--{name}={tree}: not a pe_research source tree (no pe_research/ folder)")
  encodings = args.encodings.split(",")
  workers = {}
  try:
    for pe in encodings:
      for name, tree in trees.items():
        cmd = [sys.executable, "-c", WORKER, tree, pe, str(args.calls)]
        env = dict(os.environ, PYTHONPATH=tree)
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if p.stdout.readline().strip() != "ready":
          raise SystemExit(f"{name} tree, pe.name={pe}: the trainer failed to build (see above)")
        workers[pe, name] = p
    times = {key: [] for key in workers}
    for r in range(args.rounds):
      for pe in encodings:
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
          p = workers[pe, name]
          p.stdin.write("go\n")
          p.stdin.flush()
          times[pe, name].append(json.loads(p.stdout.readline()))
  finally:
    for p in workers.values():
      p.stdin.close()
      p.wait()
  results = {}
  for pe in encodings:
    ratio = ratio_stats(times[pe, "new"], times[pe, "old"], above="slower", below="faster")
    results[pe] = {
      "old_ms": 1e3 * statistics.median(times[pe, "old"]),
      "new_ms": 1e3 * statistics.median(times[pe, "new"]),
      "new_over_old": ratio,
    }
    r = results[pe]
    print(
      f"{pe:11s} old {r['old_ms']:.1f} ms/step, new {r['new_ms']:.1f}; new/old "
      f"{ratio['median']:.3f} [{ratio['lo']:.3f}, {ratio['hi']:.3f}] over {args.rounds} rounds: "
      f"{ratio['verdict']}",
      flush=True,
    )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"trees": trees, "rounds": args.rounds, "results": results}, f, indent=1)
  return results


if __name__ == "__main__":
  main()
