"""Analytic figure: how each relative encoding scores a key at distance r (no training).

Reproduces RoFormer's Fig. 2 (Su et al. 2021, §3.4.3): for RoPE the attention score is bounded
by (max_i |h_{i+1} − h_i|) · Σ_j |S_j|, with

  S_j(r) = Σ_{k=0}^{j−1} e^{i·r·θ_k},  θ_k = base^(−2k/d),

so the relative upper bound (1/(d/2)) · Σ_{j=1}^{d/2} |S_j(r)| decays (with oscillations) as the
relative distance r grows. Beside it, the logit biases of the bias-based encodings against
distance: ALiBi (per-head slopes), the T5 bucket index, and KERPLE (log, power) and FIRE at
initialisation (seeded).

  python -m experiments.rope_decay --out=runs/demo   # ~10 s on 2 CPU cores
  python -m experiments.rope_decay --preset=cpu \
      --checkpoints=runs/demo/alibi,runs/demo/t5,runs/demo/kerple,runs/demo/fire

Presets (analytic, so cheap at any scale): smoke d=64, r ≤ 128, 4 heads; cpu d=128, r ≤ 512,
8 heads (RoFormer's d); paper d=128, r ≤ 16384, 8 heads (the ALiBi paper's longest evaluation).
``--dim``, ``--r_max`` and ``--num_heads`` override the preset.

Writes OUT/rope_decay.png, OUT/bias_vs_distance.csv (one row per distance) and OUT/REPORT.md.
With ``--checkpoints`` (trained runs of bias encodings), also the trained runs' biases for a query
at position r_max against key distance r: OUT/learned_bias.png and OUT/learned_bias_vs_distance.csv
(learned for T5, KERPLE and FIRE; ALiBi's slopes are fixed, not learned, so its curve is −m_h·r).
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from configs.base import get_config
from experiments import figure_cli
from pe_research import cli
from pe_research.encodings.alibi import alibi_slopes
from pe_research.encodings.fire import Fire
from pe_research.encodings.kerple import Kerple
from pe_research.encodings.t5 import t5_relative_position_bucket


def rope_relative_upper_bound(distance_X: np.ndarray, dim: int, base: float) -> np.ndarray:
  """(1/(d/2)) · Σ_{j=1}^{d/2} |Σ_{k<j} e^{i·r·θ_k}| for each r, float64 ``[R]``."""
  theta_R = base ** (-2.0 * np.arange(dim // 2) / dim)
  partial_sums_XxR = np.cumsum(np.exp(1j * np.outer(distance_X, theta_R)), axis=1)
  return np.abs(partial_sums_XxR).mean(axis=1)


PRESETS = {"smoke": (64, 128, 4), "cpu": (128, 512, 8), "paper": (128, 16384, 8)}  # d, r_max, H


def per_head(encoding, distance_X: np.ndarray) -> np.ndarray:
  """``encoding.bias`` for a query at r_max and keys at r_max − r: ``[R, H]``."""
  r_max = int(distance_X[-1])
  q_pos_1x1 = jnp.full((1, 1), r_max, jnp.int32)
  k_pos_1xK = jnp.asarray(r_max - distance_X, jnp.int32)[None, :]
  return np.asarray(encoding.bias(q_pos_1x1, k_pos_1xK))[0, :, 0, :].T  # [1, H, 1, R] -> [R, H]


def learned_curves(
  workdirs: list[str], distance_X: np.ndarray
) -> dict[str, tuple[str, np.ndarray]]:
  """``<workdir name>@<step>`` -> (pe.name, learned bias ``[R, H]``) from each latest checkpoint."""
  from pe_research.evaluate import load_model  # Heavy import; only with --checkpoints.

  curves = {}
  for workdir in workdirs:
    model, config, step = load_model(workdir)
    if not model.encodings[0].has_bias:
      raise ValueError(
        f"--checkpoints: {workdir} has pe.name={config.pe.name!r}, which adds no attention bias; "
        "allowed: runs of alibi, t5, kerple, fire"
      )
    label = f"{os.path.basename(os.path.normpath(workdir))}@{step}"
    curves[label] = (config.pe.name, per_head(model.encodings[0], distance_X))
  return curves


def bias_curves(distance_X: np.ndarray, num_heads: int, seed: int) -> dict[str, np.ndarray]:
  """Per-encoding curves against distance r: name -> ``[R]`` or ``[R, H]`` (query at r_max)."""
  pe = get_config().pe
  rngs = nnx.Rngs(seed)
  fire = Fire(
    num_heads,
    hidden=pe.fire_hidden,
    c_init=pe.fire_c_init,
    l_thr_init=pe.fire_l_thr_init,
    rngs=rngs,
  )
  bucket_X = t5_relative_position_bucket(
    -jnp.asarray(distance_X),
    bidirectional=False,
    num_buckets=pe.t5_num_buckets,
    max_distance=pe.t5_max_distance,
  )
  return {
    "alibi": -np.outer(distance_X, np.asarray(alibi_slopes(num_heads))),
    "t5_bucket": np.asarray(bucket_X),
    "kerple_log": per_head(Kerple(num_heads, variant="log", rngs=rngs), distance_X),
    "kerple_power": per_head(Kerple(num_heads, variant="power", rngs=rngs), distance_X),
    "fire": per_head(fire, distance_X),
  }


def write_csv(path: pathlib.Path, first_columns: dict[str, np.ndarray], curves) -> None:
  """``first_columns`` then one column per curve (``<name>_h<k>`` for per-head curves)."""
  columns = dict(first_columns)
  for name, values in curves.items():
    if values.ndim == 1:
      columns[name] = values
    else:
      columns.update({f"{name}_h{h + 1}": values[:, h] for h in range(values.shape[1])})
  with path.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in zip(*columns.values(), strict=True):
      writer.writerow([f"{float(v) + 0.0:.6g}" for v in row])  # + 0.0: no "-0".


def plot(path: pathlib.Path, distance_X, rope_X, curves, dim: int, base: float) -> None:
  fig = Figure(figsize=(15, 8))  # No pyplot: PNGs render with Agg, no display needed.
  axes = fig.subplots(2, 3)
  panels = [
    ("rope", f"RoPE relative upper bound (d={dim}, base={base:g})", "bound"),
    ("alibi", "ALiBi bias −m_h·r", "bias"),
    ("t5_bucket", "T5 bucket (causal)", "bucket index"),
    ("kerple_log", "KERPLE log at init", "bias"),
    ("kerple_power", "KERPLE power at init", "bias"),
    ("fire", "FIRE at init", "bias"),
  ]
  for ax, (name, title, ylabel) in zip(axes.flat, panels, strict=True):
    values = rope_X if name == "rope" else curves[name]
    ax.plot(distance_X, values, lw=1.2)
    ax.set(title=title, xlabel="relative distance r", ylabel=ylabel)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_learned(path: pathlib.Path, distance_X, learned) -> None:
  """One panel per trained run, one line per head."""
  fig = Figure(figsize=(5 * len(learned), 4))
  for ax, (label, (pe_name, bias_XxH)) in zip(
    fig.subplots(1, len(learned), squeeze=False).flat, learned.items(), strict=True
  ):
    ax.plot(distance_X, bias_XxH, lw=1.0)
    ylabel = "bias (fixed slopes)" if pe_name == "alibi" else "learned bias"  # ALiBi: no params.
    ax.set(title=f"{pe_name}: {label}", xlabel="relative distance r", ylabel=ylabel)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def learned_lines(distance_X, learned) -> list[str]:
  """What each trained bias looks like against distance (query at r_max)."""
  if not learned:
    return ["No `--checkpoints` given: learned biases are not drawn (see the module docstring)."]
  lines = ["## Learned biases (`learned_bias.png`, `learned_bias_vs_distance.csv`)", ""]
  r_max = int(distance_X[-1])
  for label, (pe_name, bias_XxH) in learned.items():
    mean_X = bias_XxH.mean(axis=1)
    falling = int(np.sum(np.all(np.diff(bias_XxH, axis=0) <= 1e-6, axis=0)))
    heads = bias_XxH.shape[1]
    near_far = mean_X[0] > mean_X[-1]
    verdict = (
      "a recency bias in every head, as ALiBi imposes"
      if falling == heads
      else "nearer keys favoured on average, but not monotonically"
      if near_far
      else "no recency bias on average"
    )
    kind = "alibi (fixed slopes, not learned)" if pe_name == "alibi" else pe_name
    lines.append(
      f"- {label}, {kind}: head-mean bias {mean_X[0]:.3g} at r=0, {mean_X[min(64, r_max)]:.3g} "
      f"at r={min(64, r_max)}, {mean_X[-1]:.3g} at r={r_max}; {falling} of {heads} "
      f"heads never increase with distance ({verdict})."
    )
  return lines


def write_report(path: pathlib.Path, distance_X, rope_X, curves, learned, args) -> None:
  at = {r: float(rope_X[r]) for r in (0, 10, 100, int(distance_X[-1]))}
  tail = rope_X[len(rope_X) // 2 :]
  pe = get_config().pe
  saturated = int(np.argmax(curves["t5_bucket"] == pe.t5_num_buckets - 1))
  kerple = ("kerple_log", "kerple_power")
  kerple_drops = all(np.all(np.diff(curves[k], axis=0) <= 0) for k in kerple)
  lines = [
    "# Relative encodings against distance (analytic, no training)",
    "",
    "`rope_decay.png`: RoFormer Fig. 2, the RoPE relative upper bound "
    "(1/(d/2))·Σ_j |S_j(r)|, S_j(r) = Σ_{k<j} e^{i r θ_k}, "
    f"d = {args.dim}, base = {args.base:g}, r = 0..{args.r_max}; "
    f"ALiBi biases for {args.num_heads} heads; the causal T5 bucket index "
    f"({pe.t5_num_buckets} buckets, max distance {pe.t5_max_distance}); KERPLE (log, power) "
    f"and FIRE biases at initialisation (seed {args.seed}, query at position {args.r_max}). "
    "All numbers are in `bias_vs_distance.csv`.",
    "",
    "## Checks",
    f"- RoPE bound: r=0 {at[0]:.2f} (closed form (d/2 + 1)/2 = {(args.dim // 2 + 1) / 2:.2f}), "
    f"r=10 {at[10]:.2f}, r=100 {at[100]:.2f}, r={args.r_max} {at[args.r_max]:.2f}; "
    f"the bound at r=100 is {at[0] / at[100]:.1f}x smaller than at r=0, and the mean over "
    f"r ≥ {int(distance_X[len(rope_X) // 2])} is {tail.mean():.2f}: "
    + ("it decays, as in RoFormer." if at[100] < at[0] / 2 else "NO DECAY: check the code."),
    f"- ALiBi: linear in r; slopes {', '.join(f'{m:.4g}' for m in alibi_slopes(args.num_heads))}.",
    f"- T5: exact buckets up to r = {pe.t5_num_buckets // 2 - 1}, logarithmic after, "
    f"saturated at bucket {pe.t5_num_buckets - 1} from r = {saturated}.",
    "- KERPLE (log and power) at init is "
    + ("monotone non-increasing in r for every head." if kerple_drops else "NOT monotone."),
    "",
    *learned_lines(distance_X, learned),
  ]
  path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  figure_cli.add_common_flags(parser, "rope_decay")
  parser.add_argument("--dim", type=int, default=None, help="RoPE rotary dim d (RoFormer: 128).")
  parser.add_argument("--base", type=float, default=10000.0, help="RoPE base b.")
  parser.add_argument("--r_max", type=int, default=None, help="Largest relative distance.")
  parser.add_argument("--num_heads", type=int, default=None, help="Heads for the bias curves.")
  parser.add_argument("--seed", type=int, default=0, help="Init seed for KERPLE and FIRE.")
  parser.add_argument("--checkpoints", default="", help="Comma-separated workdirs of bias runs.")
  args = parser.parse_args(argv)
  for field, value in zip(("dim", "r_max", "num_heads"), PRESETS[args.preset], strict=True):
    if getattr(args, field) is None:
      setattr(args, field, value)
  if args.dim < 2 or args.dim % 2:
    parser.error(f"--dim={args.dim} must be a positive even number")
  if args.r_max < 100:
    parser.error(f"--r_max={args.r_max} must be >= 100 (the report compares r=0 and r=100)")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  out = pathlib.Path(figure_cli.out_dir(args, "rope_decay"))
  distance_X = np.arange(args.r_max + 1)
  rope_X = rope_relative_upper_bound(distance_X, args.dim, args.base)
  curves = bias_curves(distance_X, args.num_heads, args.seed)
  write_csv(out / "bias_vs_distance.csv", {"distance": distance_X, "rope_bound": rope_X}, curves)
  plot(out / "rope_decay.png", distance_X, rope_X, curves, args.dim, args.base)
  learned = learned_curves(list(filter(None, args.checkpoints.split(","))), distance_X)
  if learned:
    columns = {label: bias_XxH for label, (_, bias_XxH) in learned.items()}
    write_csv(out / "learned_bias_vs_distance.csv", {"distance": distance_X}, columns)
    plot_learned(out / "learned_bias.png", distance_X, learned)
  write_report(out / "REPORT.md", distance_X, rope_X, curves, learned, args)
  print(f"wrote {out}/rope_decay.png, bias_vs_distance.csv, REPORT.md")


if __name__ == "__main__":
  cli.exit_on_value_error(main)
