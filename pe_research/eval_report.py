"""Evaluation outputs: what ``pe_research.evaluate`` found (:class:`EvalResult`) and the only
writer of its files (:func:`write_results`): CSV + JSON tables and the figures (PNG, no pyplot
state).

The plotting functions take plain curves so experiments can overlay several runs, e.g.
``plot_curves(path, {"rope": (lengths, ppl), "alibi": (...)}, ...)``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from pe_research.encodings.rope_scaling import short_label

# (xs, ys) or (xs, ys, lo, hi): a curve, optionally with its interval band.
Curve = tuple[Sequence[float], ...]


@dataclasses.dataclass(frozen=True)
class PasskeyResult:
  """The passkey grid: rows ``length, depth, trials, accuracy(_lo, _hi), control`` (the
  positive control's rows last, ``control`` true) and the accuracy ``[lengths, depths]``."""

  rows: list[dict[str, Any]]
  accuracy_grid: np.ndarray
  lengths: list[int]
  depths: Sequence[float]


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """One evaluation of one run: ``rows`` (``eval_lib.lm_sweep``'s, one per length),
  ``per_position`` (length -> ``(nll_sum_L, weight_sum_L)``), ``per_window`` (length ->
  ``{"nll_WxR", "weight_WxR"}``: each window's sums inside / beyond ``train_len``) and the
  passkey grid if asked."""

  name: str
  workdir: str
  step: int
  pe: str
  rope_scaling: str  # The run's pe.rope_scaling as evaluated ("" = none).
  overrides: dict[str, Any]
  train_len: int
  mode: str
  synthetic: bool
  rows: list[dict[str, Any]]
  per_position: dict[int, tuple[np.ndarray, np.ndarray]]
  compiles: int  # XLA compilations measured while scoring (JAX monitoring events).
  programs: int  # Programs in the evaluator's cache.
  passkey: PasskeyResult | None = None
  per_window: dict[int, dict[str, list]] = dataclasses.field(default_factory=dict)
  split: int = 0  # Where per_window's regions divide (the run's or its base model's L).

  @property
  def lengths(self) -> list[int]:
    return [r["length"] for r in self.rows]

  @property
  def label(self) -> str:
    """The run in a few words, for titles and legends: ``rope``, ``rope YaRN s=4``."""
    return self.pe + (f" {short_label(self.rope_scaling)}" if self.rope_scaling else "")

  @property
  def caption(self) -> str:
    """What the title leaves out: the rope_scaling spec and the evaluation's overrides."""
    parts = [f"rope_scaling={self.rope_scaling}"] if self.rope_scaling else []
    return "; ".join(parts + [f"{k}={v}" for k, v in sorted(self.overrides.items())])

  def meta(self) -> dict[str, Any]:
    """The run and request: the header of every JSON table."""
    return {
      "name": self.name,
      "workdir": self.workdir,
      "step": self.step,
      "pe": self.pe,
      "rope_scaling": self.rope_scaling,
      "overrides": self.overrides,
      "train_len": self.train_len,
      "mode": self.mode,
    }

  def compile_counts(self) -> dict[str, Any]:
    return {
      "compiles": self.compiles,
      "compiles_per_eval_length": self.compiles / len(self.rows),
      "programs": self.programs,
    }

  def summary(self) -> dict[str, Any]:
    """The content of ``<name>.json``: ``meta``, ``compile_counts`` and ``rows``."""
    return self.meta() | self.compile_counts() | {"rows": self.rows}


def write_results(
  result: EvalResult, out_dir: str, *, extra: Mapping[str, Any] | None = None
) -> None:
  """Writes ``out_dir/<name>.csv/.json/.png``, ``<name>_per_position.csv/.json/.png``,
  ``<name>_windows.json`` (each window's NLL and tokens inside / beyond L, per length) and,
  with a passkey grid, ``<name>_passkey.csv/.json/.png`` (see ``pe_research.evaluate``).
  ``extra`` keys follow ``rows`` in ``<name>.json`` (the sweep's cache key)."""
  stem = os.path.join(out_dir, result.name)
  title = f"{result.workdir}: {result.label}, {result.mode}"
  caption = result.caption
  position_rows = [r for n in result.lengths for r in per_position_rows(n, *result.per_position[n])]
  write_table(f"{stem}_per_position", position_rows, result.meta())
  with open(f"{stem}_windows.json", "w") as f:
    windows = {str(n): v for n, v in result.per_window.items()}
    regions = {"split": result.split, "regions": ["inside", "beyond"], "lengths": windows}
    json.dump(result.meta() | regions, f)
  plot_per_position(
    f"{stem}_per_position.png",
    result.per_position,
    title=title,
    train_len=result.train_len,
    caption=caption,
  )
  if result.passkey is not None:
    write_table(f"{stem}_passkey", result.passkey.rows, result.meta())
    plot_grid(
      f"{stem}_passkey.png",
      result.passkey.accuracy_grid,
      lengths=result.passkey.lengths,
      depths=result.passkey.depths,
      title=f"passkey accuracy: {result.label}",
      caption=caption,
    )
  key = "accuracy" if result.synthetic else "ppl"
  plot_curves(
    f"{stem}.png",
    {result.label: (result.lengths, [r[key] for r in result.rows])},
    ylabel="exact-match accuracy" if result.synthetic else "perplexity",
    title=title,
    train_len=result.train_len,
    logy=not result.synthetic,
    caption=caption,
  )
  write_table(stem, result.rows, result.meta() | result.compile_counts(), extra)


def write_table(
  stem: str,
  rows: Sequence[Mapping[str, Any]],
  meta: Mapping[str, Any],
  extra: Mapping[str, Any] | None = None,
) -> None:
  """Writes ``stem.csv`` (one line per row) and ``stem.json``
  (``{**meta, "rows": rows, **extra}``)."""
  os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
  with open(f"{stem}.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(f"{stem}.json", "w") as f:
    json.dump({**meta, "rows": list(rows), **(extra or {})}, f, indent=2, allow_nan=True)
    f.write("\n")


def _save(fig: Figure, ax, path: str, title: str, caption: str) -> None:
  """Saves with ``title`` wrapped to the figure's width and ``caption`` (the details a title
  leaves out) in small grey type below the axes."""
  inches = fig.get_figwidth()
  ax.set_title(textwrap.fill(title, max(20, int(inches * 8))))  # ~8 characters of 12 pt/inch.
  bottom = 0.0
  if caption:
    text = textwrap.fill(caption, int(inches * 14))  # 7 pt type.
    fig.text(0.01, 0.01, text, fontsize=7, color="dimgray", ha="left", va="bottom")
    bottom = (text.count("\n") + 1) * 7 * 1.3 / 72 / fig.get_figheight() + 0.02
  fig.tight_layout(rect=(0, bottom, 1, 1))
  fig.savefig(path, dpi=120)


def _finish(
  fig: Figure, ax, path: str, train_len: int | None, title: str, caption: str = ""
) -> None:
  if train_len:
    ax.axvline(train_len, color="gray", linestyle="--", linewidth=1, label=f"train_len={train_len}")
  ax.grid(True, which="both", alpha=0.3)
  if len(ax.get_legend_handles_labels()[1]) > 4:  # Many curves: legend beside the axes.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
  else:
    ax.legend(fontsize=8)
  _save(fig, ax, path, title, caption)


def plot_curves(
  path: str,
  curves: Mapping[str, Curve],
  *,
  ylabel: str,
  title: str,
  train_len: int | None = None,
  logy: bool = True,
  caption: str = "",
) -> None:
  """One line per curve against evaluation length (log₂ x axis); non-finite y is dropped. A
  curve ``(xs, ys, lo, hi)`` also draws its interval as a band; ``caption`` goes below."""
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
  _finish(fig, ax, path, train_len, title, caption)


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
  caption: str = "",
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
  _finish(fig, ax, path, train_len, title, caption)


def plot_grid(
  path: str,
  accuracy_grid: np.ndarray,
  *,
  lengths: Sequence[int],
  depths: Sequence[float],
  title: str,
  caption: str = "",
) -> None:
  """Heat map of accuracy (0..1) with lengths as rows and needle depths as columns."""
  fig = Figure(figsize=(max(4.0, 1.2 + 0.9 * len(depths)), max(2.8, 1.2 + 0.5 * len(lengths))))
  ax = fig.subplots()
  image = ax.imshow(accuracy_grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
  ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
  ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
  for (i, j), value in np.ndenumerate(accuracy_grid):
    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
  ax.set_xlabel("needle depth")
  ax.set_ylabel("evaluation length")
  fig.colorbar(image, ax=ax, label="accuracy")
  _save(fig, ax, path, title, caption)
