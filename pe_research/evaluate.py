r"""Evaluates a trained run at many lengths: "how does this encoding behave beyond L?"

  python -m pe_research.evaluate --workdir=runs/rope --lengths=128,256,512,1024,2048
  python -m pe_research.evaluate --workdir=runs/rope --mode=sliding --stride=64
  python -m pe_research.evaluate --workdir=runs/rope --mode=documents  # one document per window
  python -m pe_research.evaluate --workdir=runs/rope \
      --rope_scaling='{"rope_type":"yarn","factor":8}'          # zero-shot extension
  python -m pe_research.evaluate --workdir=runs/rope \
      --overrides='{"pe.self_extend_window":64,"pe.self_extend_group":4}'   # pe.* / data.*
  python -m pe_research.evaluate --workdir=runs/rope --passkey_trials=10

Loads the newest intact checkpoint of ``DIR`` into the model of ``DIR/config.json`` (with
``--rope_scaling`` replacing ``pe.rope_scaling``: same parameters, new frequencies) and writes
into ``DIR/eval/``:

  <name>.csv/.json/.png            per length: tokens, loss (nats per token), ppl =
                                   exp(loss), bytes (UTF-8 bytes of the scored targets; EOS
                                   and specials 0), bits_per_byte = Σ NLL / ln 2 / bytes,
                                   seconds (+ accuracy for synthetic tasks); the figure is
                                   ppl against length
  <name>_per_position.csv/.png     mean NLL against position within the window
  <name>_windows.json              per length, each window's NLL sum and scored tokens inside
                                   the training length L (positions < L) and beyond it
  <name>_passkey.csv/.json/.png    passkey accuracy, length × depth (``--passkey_trials > 0``),
                                   plus the positive control's rows (``control`` true): the
                                   prompt at the training length, needle inside it (printed
                                   verdict: unless it passes, the grid is not evidence)

Defaults: lengths ``train_len · 2^k`` for k = 0..4 (synthetic tasks: the task length doubling
from ``data.train_max_len // 2`` up to ``data.test_max_len``), non-overlapping windows (sliding:
``--stride`` defaults to L // 2), the same ``data.eval_tokens`` targets at every length
(documents: ``⌈data.eval_tokens / L⌉`` windows, each the start of one document or stated series,
``data.long_windows``; rows name them in ``units`` and say in ``units_note`` when fewer exist).
Figure titles name the method briefly (``rope YaRN s=8``); the full spec is the caption.
Dense attention switches to blockwise (``eval_lib.eval_attention``) from 1024 positions on, or
when its ``B·H·L²·4`` score bytes exceed ``--dense_budget_gib``. One program is compiled per
length: ``compiles`` in the JSON counts XLA compilations from JAX's monitoring events while
scoring, ``programs`` the evaluator's cache.
Bad input (unknown mode, bad stride or JSON, rope_scaling on a model without RoPE, a learned
table too short, a missing checkpoint) exits 2 with one line.
"""

from __future__ import annotations

import functools
import json
import os

from absl import app, flags

from pe_research import cli, eval_lib, eval_report, passkey, runtime
from pe_research.data import tokenizer_of
from pe_research.data.pipeline import MODES
from pe_research.encodings.registry import rope_scaling_names
from pe_research.metrics import quiet_library_logging
from pe_research.runs import load_model

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).")
_LENGTHS = flags.DEFINE_list("lengths", [], "Evaluation lengths; default train_len·2^k, k=0..4.")
_MODE = flags.DEFINE_string("mode", "nonoverlapping", f"One of {', '.join(MODES)}.")
_STRIDE = flags.DEFINE_integer("stride", None, "Sliding stride S (scores the last S tokens).")
_ROPE_SCALING = flags.DEFINE_string(
  "rope_scaling",
  None,
  "HF rope_scaling JSON replacing the run's ('' = none); for pe.name in "
  f"{', '.join(rope_scaling_names())}.",
)
_OVERRIDES = flags.DEFINE_string(
  "overrides", None, 'JSON {"pe.<field>" or "data.<field>": value} replacing the run\'s.'
)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Token budget; default data.eval_tokens.")
_NAME = flags.DEFINE_string("name", None, "Output name under DIR/eval; default from the flags.")
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", 1, "Windows per evaluation batch; 0: eval_lib.eval_batch_size (~1024 tokens)."
)
_ATTENTION = flags.DEFINE_string("attention", "auto", "auto, dense, blockwise or xla.")
_DENSE_BUDGET = flags.DEFINE_float("dense_budget_gib", 1.0, "Dense score bytes allowed (auto).")
_PASSKEY_TRIALS = flags.DEFINE_integer("passkey_trials", 0, "Prompts per passkey cell; 0 = skip.")
_PASSKEY_DEPTHS = flags.DEFINE_string("passkey_depths", "0,0.25,0.5,0.75,1", "Needle depths.")
flags.mark_flags_as_required(["workdir"])

ATTENTION_CHOICES = ("auto", "dense", "blockwise", "xla")


def default_lengths(config) -> list[int]:
  """``train_len · 2^k`` (k = 0..4); synthetic: task lengths doubling up to test_max_len."""
  if config.data.name != "synthetic":
    return [config.train.seq_len * 2**k for k in range(5)]
  lengths, n = [], max(1, config.data.train_max_len // 2)
  while n < config.data.test_max_len:
    lengths.append(n)
    n *= 2
  return [*lengths, config.data.test_max_len]


def parse_lengths(items: list[str]) -> list[int]:
  try:
    lengths = [int(x) for x in items]
  except ValueError:
    raise ValueError(f"--lengths={','.join(items)!r} must be integers >= 1") from None
  if not lengths or min(lengths) < 1:
    raise ValueError(f"--lengths={','.join(items)!r} must be integers >= 1")
  return sorted(set(lengths))


def check_request(model, lengths, *, mode, stride, attention, synthetic: bool) -> None:
  """Rejects a bad request before anything is evaluated (one-line ValueError)."""
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
  if attention not in ATTENTION_CHOICES:
    allowed = ", ".join(ATTENTION_CHOICES)
    raise ValueError(f"--attention={attention!r} is unknown; allowed: {allowed}")
  if stride is not None:
    if mode != "sliding":
      raise ValueError(f"--stride={stride} needs --mode=sliding (non-overlapping has S = L)")
    if not 1 <= stride <= min(lengths):
      raise ValueError(f"--stride={stride} must lie in [1, {min(lengths)}] (the shortest length)")
  if synthetic and mode != "nonoverlapping":
    raise ValueError("--mode=sliding does not apply to synthetic tasks; allowed: nonoverlapping")
  limit = model.first_encoding().max_length
  if limit is not None and not synthetic and max(lengths) > limit:
    raise ValueError(
      f"--lengths: {max(lengths)} exceeds {limit}, the longest pe.name={model.pe_name!r} can "
      f"represent (pe.max_len / pe.max_random_len); allowed: lengths <= {limit}"
    )


def default_name(
  mode: str, stride: int | None, rope_scaling: str | None, overrides: dict | None = None
) -> str:
  """E.g. ``nonoverlapping``, ``sliding_s64``, ``nonoverlapping_yarn8``,
  ``nonoverlapping_pe.self_extend_window64``."""
  name = mode + (f"_s{stride}" if stride else "")
  if rope_scaling is not None:
    spec = json.loads(rope_scaling) if rope_scaling else {}
    name += f"_{spec.get('rope_type', 'none')}{spec.get('factor', '')}" if spec else "_noscaling"
  for key, value in sorted((overrides or {}).items()):
    name += f"_{key}{value}"
  return name


def evaluate(
  workdir: str,
  *,
  lengths: list[int] | None = None,
  mode: str = "nonoverlapping",
  stride: int | None = None,
  rope_scaling: str | None = None,
  overrides: dict | None = None,
  max_tokens: int | None = None,
  name: str | None = None,
  batch_size: int = 1,
  attention: str = "auto",
  dense_budget_gib: float = 1.0,
  passkey_trials: int = 0,
  passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
  split: int | None = None,
) -> eval_report.EvalResult:
  """Evaluates the run in ``workdir`` (see the module docstring); writes nothing
  (``eval_report.write_results`` does). ``split``: where the per-window regions divide
  (default the run's training length; a fine-tuned run passes its base model's)."""
  if batch_size < 0 or (max_tokens is not None and max_tokens < 1) or passkey_trials < 0:
    raise ValueError(
      "--batch_size must be >= 0 (0: eval_lib.eval_batch_size), --max_tokens >= 1 and "
      "--passkey_trials >= 0"
    )
  model, config, step = load_model(workdir, rope_scaling=rope_scaling, overrides=overrides)
  synthetic = config.data.name == "synthetic"
  lengths = lengths or default_lengths(config)
  check_request(model, lengths, mode=mode, stride=stride, attention=attention, synthetic=synthetic)
  encode = tokenizer_of(config.data).encode
  passkey_lengths = [n for n in lengths if n >= passkey.min_length(encode)]
  if passkey_trials and not synthetic and not passkey_lengths:
    raise ValueError(f"--passkey_trials needs a --lengths entry >= {passkey.min_length(encode)}")
  evaluator = eval_lib.Evaluator(
    model, attention=attention, dense_budget_bytes=int(dense_budget_gib * 2**30)
  )
  train_len = config.data.train_max_len if synthetic else config.train.seq_len
  rows, per_position, per_window = eval_lib.lm_sweep(
    evaluator,
    config,
    lengths,
    mode=mode,
    stride=stride,
    max_tokens=max_tokens,
    batch_size=batch_size,
    split=split or train_len,
  )
  passkey_result = None
  if passkey_trials and not synthetic:
    score_passkeys = functools.partial(
      eval_lib.passkey_sweep, evaluator, trials=passkey_trials, batch_size=batch_size, encode=encode
    )
    pk_rows, accuracy_grid = score_passkeys(passkey_lengths, passkey_depths)
    header = passkey.control_header(encode, train_len)
    control_rows = (
      [] if header is None else score_passkeys([train_len], passkey_depths, header=header)[0]
    )
    print(f"passkey: {passkey.control_verdict(control_rows, train_len)}", flush=True)
    pk_rows = [r | {"control": False} for r in pk_rows] + [
      r | {"control": True} for r in control_rows
    ]
    passkey_result = eval_report.PasskeyResult(
      pk_rows, accuracy_grid, passkey_lengths, passkey_depths
    )
  return eval_report.EvalResult(
    name=name or default_name(mode, stride, rope_scaling, overrides),
    workdir=workdir,
    step=step,
    pe=config.pe.name,
    rope_scaling=config.pe.rope_scaling,
    overrides=overrides or {},
    train_len=train_len,
    mode=mode,
    synthetic=synthetic,
    rows=rows,
    per_position=per_position,
    per_window=per_window,
    split=split or train_len,
    compiles=evaluator.backend_compiles,
    programs=evaluator.num_compiles,
    passkey=passkey_result,
  )


def _parse_json_object(text: str | None, flag: str) -> dict | None:
  if text is None:
    return None
  try:
    value = json.loads(text)
  except ValueError:
    value = None
  if not isinstance(value, dict):
    raise ValueError(f'{flag}={text!r} is invalid; allowed: a JSON object such as {{"a": 1}}')
  return value


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.exit_with_error(ValueError(f"unexpected arguments {argv[1:]}; allowed: flags only"))
  runtime.use_low_memory_schedule()
  quiet_library_logging()
  try:
    result = evaluate(
      _WORKDIR.value,
      lengths=parse_lengths(_LENGTHS.value) if _LENGTHS.value else None,
      mode=_MODE.value,
      stride=_STRIDE.value,
      rope_scaling=_ROPE_SCALING.value,
      overrides=_parse_json_object(_OVERRIDES.value, "--overrides"),
      max_tokens=_MAX_TOKENS.value,
      name=_NAME.value,
      batch_size=_BATCH_SIZE.value,
      attention=_ATTENTION.value,
      dense_budget_gib=_DENSE_BUDGET.value,
      passkey_trials=_PASSKEY_TRIALS.value,
      passkey_depths=passkey.parse_depths(_PASSKEY_DEPTHS.value),
    )
    eval_report.write_results(result, os.path.join(_WORKDIR.value, "eval"))
  except ValueError as e:
    cli.exit_with_error(e)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
