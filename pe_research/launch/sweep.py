"""Train a config in a workdir unless it is finished; evaluate a run unless that is cached.

Every experiment script (and ``make demo``) goes through these two functions, so re-running an
experiment reuses every finished training run and every identical evaluation:

  train_run(config, workdir)       validate, record DIR/config.json, train to train.steps
                                   (skipped when the latest checkpoint already reached it)
  evaluate(workdir, name, ...)     DIR/eval/<name>.json via pe_research.evaluate.evaluate and
                                   eval_report.write_results, recomputed only when the request
                                   or the checkpoint changed
  over_seeds(rows_by_seed, key)    one row per length: the mean over seeds of ``key`` with a
                                   95% Student-t interval across seeds (stats.seed_interval)

A workdir holding a different config is refused (``workdirs.record_config``): two
experiments share a run only when their configs are identical.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import ml_collections

import pe_research
from pe_research import checkpoint, config_lib, eval_report, stats, workdirs
from pe_research import evaluate as evaluate_lib


@functools.cache
def code_version() -> str:
  """A hash of the ``pe_research`` package's Python sources."""
  root = os.path.dirname(os.path.abspath(pe_research.__file__))
  digest = hashlib.sha256()
  for folder, _, files in sorted(os.walk(root)):
    for name in sorted(f for f in files if f.endswith(".py")):
      with open(os.path.join(folder, name), "rb") as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()[:16]


def is_finished(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """True when ``workdir`` holds this config trained to ``train.steps`` (raises on a clash)."""
  workdirs.record_config(workdir, config, write=False)
  step = checkpoint.latest_intact_step(workdir)
  return step is not None and step >= config.train.steps


def train_run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains (or resumes, or skips when finished) ``config`` in ``workdir``; exits (code 1)
  when a signal stopped the training early, so a sweep stops with it."""
  config_lib.validate(config, device_count=jax.device_count())
  if is_finished(config, workdir):
    return
  from pe_research import train  # Heavy import; keeps `--help` fast.

  workdirs.prepare_workdir(workdir, config, overwrite=False)
  train.train(config, workdir)
  if not is_finished(config, workdir):  # SIGTERM/SIGINT: train saved and stopped early.
    raise SystemExit(f"{workdir}: stopped before train.steps by a signal; rerun to resume")


def evaluate(
  workdir: str,
  name: str,
  *,
  lengths: list[int],
  max_tokens: int,
  rope_scaling: dict | None = None,
  overrides: dict | None = None,
  mode: str = "nonoverlapping",
  stride: int | None = None,
  batch_size: int = 1,
  passkey_trials: int = 0,
  split: int | None = None,
) -> dict:
  """The summary of ``workdir/eval/<name>.json`` (``rows``, and ``passkey`` rows when
  ``passkey_trials > 0``), computed unless one exists for the same request and checkpoint.

  ``rope_scaling`` (a dict in HF vocabulary) and ``overrides`` (``pe.*``/``data.*`` fields)
  replace the run's at evaluation only (zero-shot). The request includes :func:`code_version`,
  so an evaluation computed by other code (an encoding fixed since) is not reused. ``split``:
  where the per-window regions divide (``pe_research.evaluate``; default the run's L).
  """
  request = {
    "step": checkpoint.latest_intact_step(workdir),
    "lengths": list(lengths),
    "max_tokens": max_tokens,
    "rope_scaling": rope_scaling,
    "overrides": overrides or {},
    "mode": mode,
    "stride": stride,
    "passkey_trials": passkey_trials,
    "split": split,
    "code": code_version(),
  }
  path = os.path.join(workdir, "eval", f"{name}.json")
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("request") == request:
      return cached
  result = evaluate_lib.evaluate(
    workdir,
    lengths=list(lengths),
    rope_scaling=json.dumps(rope_scaling) if rope_scaling else None,
    overrides=overrides,
    mode=mode,
    stride=stride,
    max_tokens=max_tokens,
    name=name,
    batch_size=batch_size,
    passkey_trials=passkey_trials,
    split=split,
  )
  cache = {"passkey": result.passkey.rows} if result.passkey else {}
  cache["request"] = request
  eval_report.write_results(result, os.path.join(workdir, "eval"), extra=cache)
  return result.summary() | cache


def over_seeds(rows_by_seed: dict[int, list[dict]], key: str = "ppl") -> list[dict]:
  """Evaluation rows of the same lengths from runs that differ only in their seed, combined:
  per length ``key`` (mean over seeds), ``{key}_lo``/``{key}_hi`` (95% Student-t interval
  across seeds), ``seeds`` and the per-seed values ``{key}_by_seed``."""
  if not rows_by_seed:
    raise ValueError("over_seeds needs rows from at least one seed")
  seeds = sorted(rows_by_seed)
  lengths = [r["length"] for r in rows_by_seed[seeds[0]]]
  for seed in seeds:
    if [r["length"] for r in rows_by_seed[seed]] != lengths:
      raise ValueError(f"seed {seed} was evaluated at other lengths than seed {seeds[0]}")
  combined = []
  for i, length in enumerate(lengths):
    values = [rows_by_seed[seed][i][key] for seed in seeds]
    mean, lo, hi = stats.seed_interval(values)
    combined.append(
      {"length": length, key: mean, f"{key}_lo": lo, f"{key}_hi": hi, "seeds": len(seeds)}
      | {f"{key}_by_seed": dict(zip(seeds, values, strict=True))}
    )
  return combined
