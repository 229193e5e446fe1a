"""Config variants, start-up validation, and the resume compatibility check.

``validate`` is the one place that decides whether a config is valid. It is called once at
start-up; every problem raises ``ValueError`` with one line naming the field and what is
allowed, which ``main`` prints before exiting with code 2.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections

from pe_research.encodings import registry
from pe_research.encodings.rope_scaling import parse_rope_scaling
from pe_research.encodings.spec import NON_NEGATIVE, POSITIVE, Rule, in_range, one_of, require

# The rules of the model, train, data and mesh fields, checked in this order. Each pe.* field's
# rule is stated by the encoding that owns it (its SPEC; pe_research/encodings/registry.py).
_RULES: dict[str, Rule] = {
  "model.mlp": one_of("gelu", "swiglu"),
  "model.norm": one_of("layernorm", "rmsnorm"),
  "model.attention": one_of("dense", "blockwise", "xla", "pallas", "splash", "fast"),
  "model.context_parallel": one_of("all_gather", "ring"),
  "model.compute_dtype": one_of("float32", "bfloat16"),
  "model.remat": one_of("none", "full", "save_projections"),
  "model.gather_dtype": one_of("float32", "bfloat16"),
  "train.nan_policy": one_of("stop", "skip"),
  "data.eval_split": one_of("validation", "train"),
  **dict.fromkeys(
    (
      *("model.vocab_size", "model.num_layers", "model.model_dim", "model.num_heads"),
      *("model.attention_block", "model.init_std", "model.norm_eps", "data.eval_tokens"),
      *("data.train_min_len", "data.train_max_len", "data.test_min_len", "data.test_max_len"),
      *("train.seq_len", "train.batch_size", "train.steps", "train.lr", "train.log_every"),
      *("train.checkpoint_every", "train.keep_checkpoints", "train.steps_per_call", "mesh.fsdp"),
      *("train.grad_accum_steps", "mesh.context"),
    ),
    POSITIVE,
  ),
  **dict.fromkeys(
    (
      *("seed", "model.head_dim", "model.mlp_dim", "model.num_kv_heads"),
      *("train.warmup_steps", "train.weight_decay", "train.grad_clip"),
    ),
    NON_NEGATIVE,
  ),
  "train.min_lr_ratio": in_range(0.0, 1.0, low_inclusive=True, high_inclusive=True),
  "train.b1": in_range(0.0, 1.0, low_inclusive=True, high_inclusive=False),
  "train.b2": in_range(0.0, 1.0, low_inclusive=True, high_inclusive=False),
}
# A run resumes with these changed (raising train.steps extends it; pe.randomize_eval acts only at
# evaluation, and runs recorded before its default became True hold False); any other refuses.
# config.json's record of the backend policy that ran (not a config field; any may resume).
RECORDED_BACKEND = "backend"
_RESUMABLE_CHANGES = ("train.steps", "train.steps_per_call", "pe.randomize_eval")


def parse_config_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a ``--config=file.py:k=v,k2=v2`` variant string over typed ``defaults``.

  Each value is converted to its default's type; unknown keys are rejected.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config variant {item!r} is invalid; allowed keys: {', '.join(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value not in ("True", "False", "true", "false"):
        raise ValueError(f"config variant {key}={value!r} is invalid; allowed: True or False")
      parsed[key] = value.lower() == "true"
      continue
    try:
      parsed[key] = kind(value)
    except ValueError:
      allowed = f"a {kind.__name__}"
      raise ValueError(f"config variant {key}={value!r} is invalid; allowed: {allowed}") from None
  return parsed


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  section, name = field.split(".") if "." in field else (None, field)
  return config[name] if section is None else config[section][name]


def _same_type(value: Any, default: Any) -> bool:
  """``value`` may replace ``default``: same type, an int for a float, never a bool for a number."""
  if isinstance(default, bool) or isinstance(value, bool):
    return type(value) is type(default)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and math.isfinite(value)
  return type(value) is type(default)


def _validate_schema(config: ml_collections.ConfigDict, schema, prefix: str = "") -> None:
  """Every field of ``schema`` (configs/base.py), of its type (floats finite), and no other."""
  for key in config:
    if key not in schema:
      fields = ", ".join(f"{prefix}{name}" for name in schema)
      raise ValueError(f"{prefix}{key} is an unknown field; allowed: {fields}")
  for key, default in schema.items():
    field, is_section = f"{prefix}{key}", isinstance(default, ml_collections.ConfigDict)
    kind = "finite float" if isinstance(default, float) else type(default).__name__
    allowed = "a section" if is_section else f"a value of type {kind}, e.g. {default!r}"
    if key not in config:
      raise ValueError(f"{field} is missing; allowed: {allowed}")
    if is_section:
      require(isinstance(config[key], ml_collections.ConfigDict), field, config[key], allowed)
      _validate_schema(config[key], default, f"{field}.")
    else:
      require(_same_type(config[key], default), field, config[key], allowed)


def _validate_fields(config: ml_collections.ConfigDict) -> None:
  for field, rule in _RULES.items():
    require(rule.ok(_get(config, field)), field, _get(config, field), rule.allowed)


def check_rope_scaling(pe: ml_collections.ConfigDict, field: str = "pe.rope_scaling") -> None:
  """Raises ValueError (one line naming ``field``) unless ``pe.rope_scaling`` is "" or valid
  HF ``rope_scaling`` JSON for a ``pe.name`` whose spec takes it."""
  if not pe.rope_scaling:
    return
  require(
    registry.encoding_spec(pe.name).takes_rope_scaling,
    field,
    pe.rope_scaling,
    f"'' for pe.name={pe.name!r} (JSON only for pe.name in "
    f"{', '.join(registry.rope_scaling_names())})",
  )
  try:
    parse_rope_scaling(pe.rope_scaling, original_max_position_embeddings=pe.train_len)
  except ValueError as e:
    example = '\'\' or JSON such as {"rope_type": "linear", "factor": 2.0}'
    allowed = "" if "allowed" in str(e) else f"; allowed: {example}"
    raise ValueError(f"{field}{str(e).removeprefix('rope_scaling')}{allowed}") from None


def _validate_pe_fields(pe: ml_collections.ConfigDict) -> None:
  """Each ``pe.*`` field passes its owner's rule; a switch field of another family is off."""
  owned = registry.owned_fields()
  for _, field in owned:
    field.check(pe[field.name])
  for owner, field in owned:
    require(
      not field.switch or owner == pe.name or pe[field.name] == field.default,
      f"pe.{field.name}",
      pe[field.name],
      f"{field.default!r} unless pe.name={owner!r} (got {pe.name!r})",
    )


def _validate_model(config: ml_collections.ConfigDict) -> None:
  """The model's shape, then the encoding: each question goes to the spec of ``pe.name`` (and
  of each positions wrapper)."""
  model, pe, train = config.model, config.pe, config.train
  names = registry.encoding_names()
  require(pe.name in names, "pe.name", pe.name, ", ".join(names))
  _validate_pe_fields(pe)
  if model.head_dim == 0:
    require(
      model.model_dim % model.num_heads == 0,
      "model.num_heads",
      model.num_heads,
      f"a divisor of model.model_dim={model.model_dim} (or set model.head_dim)",
    )
  require(
    model.num_heads % (model.num_kv_heads or model.num_heads) == 0,
    "model.num_kv_heads",
    model.num_kv_heads,
    f"0 or a divisor of model.num_heads={model.num_heads}",
  )
  family = registry.encoding_spec(pe.name)
  if family.rotary_dim is not None:
    family.rotary_dim(model.head_dim or model.model_dim // model.num_heads, pe)
  check_rope_scaling(pe)
  for spec in (family, *registry.WRAPPERS):
    spec.validate(pe, model, train)
  limit = family.max_length(pe)
  longest = max(train.seq_len, *(wrapper.train_span(pe) for wrapper in registry.WRAPPERS))
  require(
    limit is None or longest <= limit,
    f"pe.{family.length_field}",
    limit,
    f"a length >= {longest}, the span of the training positions, for pe.name={pe.name!r}",
  )


def _validate_tokenizer(config: ml_collections.ConfigDict) -> None:
  """``data.tokenizer`` loads, is bytes for synthetic tasks, and fits ``model.vocab_size``."""
  from pe_research.data import make_tokenizer

  spec = config.data.tokenizer
  require(
    spec == "bytes" or config.data.name != "synthetic",
    "data.tokenizer",
    spec,
    "'bytes' when data.name='synthetic' (synthetic tasks are byte tasks)",
  )
  require(
    spec == "bytes" or os.path.isfile(spec),
    "data.tokenizer",
    spec,
    "'bytes' or the path of an existing tokenizer.json",
  )
  try:
    vocab_size = make_tokenizer(spec).vocab_size
  except ValueError as e:
    reason = " ".join(str(e).split())
    raise ValueError(
      f"data.tokenizer={spec!r} is invalid; allowed: 'bytes' or a tokenizer.json that loads "
      f"({reason})"
    ) from None
  require(
    vocab_size <= config.model.vocab_size,
    "model.vocab_size",
    config.model.vocab_size,
    f"a size >= {vocab_size}, the vocabulary of data.tokenizer={spec!r}",
  )


def _validate_data(config: ml_collections.ConfigDict) -> None:
  from pe_research.data import dataset_names, task_names

  data = config.data
  require(data.name in dataset_names(), "data.name", data.name, ", ".join(dataset_names()))
  require(data.task in task_names(), "data.task", data.task, ", ".join(task_names()))
  _validate_tokenizer(config)
  require(
    data.train_min_len <= data.train_max_len,
    "data.train_min_len",
    data.train_min_len,
    f"a length <= data.train_max_len={data.train_max_len}",
  )
  require(
    data.test_min_len <= data.test_max_len,
    "data.test_min_len",
    data.test_min_len,
    f"a length <= data.test_max_len={data.test_max_len}",
  )
  if data.name == "synthetic":
    from pe_research.data.synthetic import sequence_length

    needed = sequence_length(data.task, data.train_max_len)
    require(
      config.train.seq_len >= needed,
      "train.seq_len",
      config.train.seq_len,
      f">= {needed}, the length of a {data.task} example of data.train_max_len="
      f"{data.train_max_len}",
    )


def _validate_train(config: ml_collections.ConfigDict, device_count: int) -> None:
  train, mesh = config.train, config.mesh
  require(
    train.warmup_steps < train.steps,
    "train.warmup_steps",
    train.warmup_steps,
    f"a step count < train.steps={train.steps}",
  )
  require(
    mesh.data == -1 or mesh.data > 0, "mesh.data", mesh.data, "-1 (all devices) or a size > 0"
  )
  data_size = device_count // (mesh.fsdp * mesh.context) if mesh.data == -1 else mesh.data
  require(
    data_size * mesh.fsdp * mesh.context == device_count,
    "mesh.fsdp" if mesh.data == -1 else "mesh.data",
    mesh.fsdp if mesh.data == -1 else mesh.data,
    f"sizes with mesh.data * mesh.fsdp * mesh.context == {device_count} devices",
  )
  require(
    train.seq_len % mesh.context == 0,
    "train.seq_len",
    train.seq_len,
    f"a multiple of mesh.context={mesh.context}",
  )
  require(
    train.batch_size % train.grad_accum_steps == 0,
    "train.batch_size",
    train.batch_size,
    f"a multiple of train.grad_accum_steps={train.grad_accum_steps}",
  )
  batch_devices = data_size * mesh.fsdp
  require(
    train.batch_size // train.grad_accum_steps % batch_devices == 0,
    "train.batch_size",
    train.batch_size,
    f"train.grad_accum_steps={train.grad_accum_steps} micro-batches, each a multiple of "
    f"mesh.data * mesh.fsdp = {batch_devices}",
  )
  if config.init_from:
    require(
      os.path.isdir(config.init_from),
      "init_from",
      config.init_from,
      "'' or the workdir of an earlier run",
    )


def validate(config: ml_collections.ConfigDict, *, device_count: int) -> None:
  """Raises ValueError (one line: field and allowed values) for the first invalid field.

  ``device_count`` is the global number of devices (the batch is split over all of them).
  """
  from configs import base  # The schema: every field with its default (and so its type).

  _validate_schema(config, base.get_config())
  _validate_fields(config)
  _validate_model(config)
  _validate_data(config)
  _validate_train(config, device_count)


def config_from_saved(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """A run's saved ``config.json`` over ``configs/base.py``: fields added since the run was
  written take their defaults, unknown saved fields are dropped, and ``pe.train_len`` stays a
  reference to ``train.seq_len``."""
  from configs import base

  def copy(values: dict[str, Any], into: ml_collections.ConfigDict) -> None:
    for key, value in values.items():
      if key not in into or key == "train_len":
        continue
      if isinstance(into[key], ml_collections.ConfigDict):
        copy(value, into[key])
      else:
        into[key] = value

  config = base.get_config()
  copy(saved, config)
  return config


# Sections an evaluation may change without touching the parameters: how positions are encoded
# and which text is scored.
EVAL_SECTIONS = ("pe", "data")


def override_for_eval(config: ml_collections.ConfigDict, overrides: dict[str, Any], flag: str):
  """Sets ``config.<section>.<field> = value`` for each dotted key of ``overrides`` (sections in
  ``EVAL_SECTIONS``; each value of its default's type), then re-validates the model and data
  fields; errors name ``flag``."""
  from configs import base

  defaults = base.get_config()
  for key, value in overrides.items():
    section, _, field = key.partition(".")
    if section not in EVAL_SECTIONS or field not in defaults[section] or field == "train_len":
      raise ValueError(
        f"{flag}: {key!r} cannot change at evaluation; allowed: pe.<field> or data.<field> of "
        "configs/base.py"
      )
    require(_same_type(value, defaults[section][field]), f"{flag} {key}", value, "its type")
    config[section][field] = value
  _validate_model(config)
  _validate_data(config)


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The resolved config as plain JSON-compatible Python values (references followed)."""
  return json.loads(config.to_json())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check_resumable(saved: dict[str, Any], config: ml_collections.ConfigDict, workdir: str):
  """Raises ValueError naming the fields where ``config`` differs from a workdir's config.

  Only ``train.steps`` (raising it extends a run), ``train.steps_per_call`` (how steps are
  grouped into calls) and ``pe.randomize_eval`` (evaluation only) may differ. A field added to
  configs/base.py after the run started is no difference while it keeps its default.
  """
  from configs import base

  defaults = _flatten(config_to_dict(base.get_config()))
  saved = {key: value for key, value in saved.items() if key != RECORDED_BACKEND}
  old, new = _flatten(saved), _flatten(config_to_dict(config))
  old |= {key: defaults[key] for key in defaults.keys() - old.keys()}
  changed = [
    f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    for key in sorted(old.keys() | new.keys())
    if old.get(key) != new.get(key) and key not in _RESUMABLE_CHANGES
  ]
  if changed:
    raise ValueError(
      f"workdir {workdir} holds a run with a different config ({'; '.join(changed)}); "
      f"allowed: the same config (only {', '.join(_RESUMABLE_CHANGES)} may change), a new "
      "--workdir, or --overwrite (renames the old run to DIR.old-<time>)"
    )
