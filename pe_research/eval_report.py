"""Evaluation outputs: CSV + JSON tables and the figures (PNG, no pyplot state).

The plotting functions take plain curves so experiments can overlay several runs, e.g.
``plot_curves(path, {"rope": (lengths, ppl), "alibi": (...)}, ...)``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

# (xs, ys) or (xs, ys, lo, hi): a curve, optionally with its interval band.
Curve = tuple[Sequence[float], ...]


def write_table(stem: str, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
  """Writes ``stem.csv`` (one line per row) and ``stem.json`` (``{**meta, "rows": rows}``)."""
  os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
  with open(f"{stem}.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(f"{stem}.json", "w") as f:
    json.dump({**meta, "rows": list(rows)}, f, indent=2, allow_nan=True)
    f.write("\n")


def _finish(fig: Figure, ax, path: str, train_len: int | None, title: str) -> None:
  if train_len:
    ax.axvline(train_len, color="gray", linestyle="--", linewidth=1, label=f"train_len={train_len}")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  if len(ax.get_legend_handles_labels()[1]) > 4:  # Many curves: legend beside the axes.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
  else:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_curves(
  path: str,
  curves: Mapping[str, Curve],
  *,
  ylabel: str,
  title: str,
  train_len: int | None = None,
  logy: bool = True,
) -> None:
  """One line per curve against evaluation length (log₂ x axis); non-finite y is dropped. A
  curve ``(xs, ys, lo, hi)`` also draws its interval as a band."""
  fig = Figure(figsize=(8.5 if len(curves) > 3 else 7, 4.5))
  ax = fig.subplots()
  colors = matplotlib.colormaps["tab10" if len(curves) <= 10 else "tab20"].colors
  for i, (label, (xs, ys, *band)) in enumerate(curves.items()):
    keep = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    color = colors[i % len(colors)]  # The default cycle repeats after 10 curves.
    ax.plot([x for x, _ in keep], [y for _, y in keep], marker="o", label=label, color=color)
    if band:
      spans = [(x, a, b) for x, a, b in zip(xs, *band, strict=True) if math.isfinite(a + b)]
      x_s, lo_s, hi_s = zip(*spans, strict=True) if spans else ((), (), ())
      ax.fill_between(x_s, lo_s, hi_s, color=color, alpha=0.18, linewidth=0)
  ax.set_xscale("log", base=2)
  if logy:
    ax.set_yscale("log")
  ax.set_xlabel("evaluation length (tokens)")
  ax.set_ylabel(ylabel)
  _finish(fig, ax, path, train_len, title)


def per_position_rows(
  length: int, nll_sum_L: np.ndarray, weight_sum_L: np.ndarray
) -> list[dict[str, Any]]:
  """Mean NLL at each window position that scored at least one token."""
  return [
    {"length": length, "position": p, "tokens": int(w), "loss": float(s / w)}
    for p, (s, w) in enumerate(zip(nll_sum_L, weight_sum_L, strict=True))
    if w > 0
  ]


def plot_per_position(
  path: str,
  per_length: Mapping[int, tuple[np.ndarray, np.ndarray]],
  *,
  title: str,
  train_len: int | None = None,
  bins: int = 64,
) -> None:
  """Mean NLL against position within the window, one line per length.

  Positions are pooled into at most ``bins`` log-spaced bins per length (Σ nll / Σ weight per
  bin; the first positions stay single) so long windows with few tokens per position stay
  readable on the log x axis.
  """
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for length, (nll_sum_L, weight_sum_L) in sorted(per_length.items()):
    edges = np.unique(np.round(np.geomspace(1, length + 1, bins + 1)).astype(int)) - 1
    nll = np.add.reduceat(nll_sum_L, edges[:-1])
    weight = np.add.reduceat(weight_sum_L, edges[:-1])
    keep = weight > 0
    centers = (edges[:-1] + edges[1:] - 1) / 2
    ax.plot(centers[keep] + 1, nll[keep] / weight[keep], label=f"L={length}")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("position in window (1-based)")
  ax.set_ylabel("mean NLL (nats)")
  _finish(fig, ax, path, train_len, title)


def plot_grid(
  path: str,
  grid_LxD: np.ndarray,
  *,
  lengths: Sequence[int],
  depths: Sequence[float],
  title: str,
) -> None:
  """Heat map of accuracy (0..1) with lengths as rows and needle depths as columns."""
  fig = Figure(figsize=(1.2 + 0.9 * len(depths), 1.2 + 0.5 * len(lengths)))
  ax = fig.subplots()
  image = ax.imshow(grid_LxD, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
  ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
  ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
  for (i, j), value in np.ndenumerate(grid_LxD):
    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
  ax.set_xlabel("needle depth")
  ax.set_ylabel("evaluation length")
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label="accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
