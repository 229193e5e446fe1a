"""Configs: defaults documented, variants parsed, every invalid field named in one line (also
for 300 fuzzed invalid configs), and the command line exits 2 with one line for bad configs
and flags."""

import json
import math
import os
import random
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import base, lm, tiny
from pe_research import config_lib
from pe_research.encodings.registry import encoding_names, encoding_spec, rope_scaling_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_base_field_has_a_comment():
  with open(os.path.join(REPO, "configs", "base.py")) as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    if re.match(r"\s+config\.\w+(\.\w+)? = (?!ml_collections)", line):
      assert "#" in line or lines[i - 1].strip().startswith("#"), line


@pytest.mark.parametrize("name", encoding_names())
def test_tiny_and_lm_configs_are_valid_for_every_encoding(name):
  config_lib.validate(tiny.get_config(f"pe={name}"), device_count=8)
  config_lib.validate(lm.get_config(f"pe={name},train_len=256"), device_count=1)


def test_base_config_is_valid():
  config_lib.validate(base.get_config(), device_count=1)


def test_variant_sets_encoding_and_train_len_follows_seq_len():
  config = lm.get_config("pe=alibi,train_len=64")
  assert (config.pe.name, config.train.seq_len, config.pe.train_len) == ("alibi", 64, 64)
  config.train.seq_len = 512
  assert config.pe.train_len == 512


@pytest.mark.parametrize("arg", ["foo=1", "pe", "train_len=abc"])
def test_bad_variant_is_a_value_error(arg):
  with pytest.raises(ValueError, match="config variant"):
    lm.get_config(arg)


def _set(**fields):
  def edit(config):
    for path, value in fields.items():
      section, _, name = path.rpartition("__")
      (config[section] if section else config)[name] = value

  return edit


INVALID = [
  (_set(pe__name="bogus"), "pe.name"),
  (_set(data__name="bogus"), "data.name"),
  (_set(data__task="bogus"), "data.task"),
  (_set(pe__name="alibi", pe__rope_scaling='{"rope_type": "linear", "factor": 2}'), "rope_scal"),
  (_set(pe__rope_scaling='{"rope_type": linear'), "rope_scaling"),
  (_set(pe__rope_scaling='{"rope_type": "bogus"}'), "rope_type"),
  (_set(model__num_heads=3), "model.num_heads"),
  (_set(model__context_parallel="zigzag"), "model.context_parallel"),
  (_set(model__head_dim=7, model__num_heads=3), "model.head_dim"),
  (_set(pe__name="xpos", model__head_dim=5), "model.head_dim"),
  (_set(train__seq_len=0), "train.seq_len"),
  (_set(train__seq_len=16), "train.seq_len"),
  (_set(train__steps=-1), "train.steps"),
  (_set(train__batch_size=0), "train.batch_size"),
  (_set(train__batch_size=12), "train.batch_size"),
  (_set(train__warmup_steps=60), "train.warmup_steps"),
  (_set(train__lr=0.0), "train.lr"),
  (_set(train__b2=1.0), "train.b2"),
  (_set(pe__rotary_pct=0.0), "pe.rotary_pct"),
  (_set(model__mlp="relu"), "model.mlp"),
  (_set(model__attention="flash"), "model.attention"),
  (_set(model__compute_dtype="float16"), "model.compute_dtype"),
  (_set(train__nan_policy="ignore"), "train.nan_policy"),
  (_set(pe__kerple_variant="exp"), "pe.kerple_variant"),
  (_set(pe__name="learned", train__seq_len=256), "pe.max_len"),
  (_set(pe__name="learned", pe__randomized=True, pe__max_random_len=256), "pe.max_len"),
  (_set(pe__randomized=True, pe__max_random_len=16), "pe.max_random_len"),
  (_set(data__test_min_len=50), "data.test_min_len"),
  (_set(mesh__fsdp=3), "mesh.fsdp"),
  (_set(mesh__data=2, mesh__fsdp=2), "mesh.data"),
  (_set(init_from="/nonexistent/run"), "init_from"),
  (_set(train__grad_accum_steps=3), "train.batch_size"),  # 8 rows in 3 micro-batches
  (_set(train__grad_accum_steps=2), "train.batch_size"),  # micro-batches of 4 on 8 devices
  (_set(train__grad_accum_steps=0), "train.grad_accum_steps"),
  (_set(mesh__context=3), "mesh.fsdp"),
  (_set(mesh__context=8, train__seq_len=36), "train.seq_len"),
  (_set(model__remat="some"), "model.remat"),
  (_set(model__gather_dtype="int8"), "model.gather_dtype"),
]


@pytest.mark.parametrize(("edit", "field"), INVALID)
def test_invalid_config_is_one_line_value_error_naming_the_field(edit, field):
  config = tiny.get_config()
  edit(config)
  with pytest.raises(ValueError, match=re.escape(field)) as error:
    config_lib.validate(config, device_count=8)
  assert "\n" not in str(error.value) and "allowed" in str(error.value)


def _main(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "pe_research.main", *flags],
    cwd=REPO, capture_output=True, text=True,
  )  # fmt: skip


@pytest.mark.parametrize(
  ("flags", "field"),
  [
    (("--config=configs/tiny.py", "--config.model.num_heads=3"), "model.num_heads"),
    (("--config=configs/tiny.py", "--config.train.bogus=1"), "bogus"),
    (("--config=configs/tiny.py", "--config.train.steps=abc"), "train.steps"),
    (("--config=configs/tiny.py:pe=bogus",), "pe.name"),
  ],
)
def test_command_line_error_exits_2_with_one_line(flags, field, tmp_path):
  result = _main(*flags, f"--workdir={tmp_path}")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and field in lines[0] and "allowed" in lines[0], lines
  assert not os.listdir(tmp_path)


# Config fuzzing: each mutation edits a plain-dict config and returns (fields it touched,
# fields an error may name). Mutations touching disjoint fields are combined.
_POSITIVE_FLOATS = ("model.init_std", "pe.rope_base", "pe.fire_c_init", "train.lr")
_POSITIVE_INTS = ("model.num_layers", "model.attention_block", "pe.t5_num_buckets", "train.steps")
_POSITIVE_INTS += ("train.batch_size", "train.log_every", "train.keep_checkpoints", "mesh.fsdp")
_POSITIVE_INTS += (
  "data.eval_tokens",
  "data.train_max_len",
  "pe.max_random_len",
  "train.steps_per_call",
)


def _put(config: dict, field: str, value) -> None:
  *sections, name = field.split(".")
  for section in sections:
    config = config[section]
  config[name] = value


def _at(config: dict, field: str):
  for key in field.split("."):
    config = config[key]
  return config


def _leaves(config: dict, prefix: str = "") -> list[str]:
  fields = []
  for key, value in config.items():
    fields += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
  return fields


def _non_positive(c, rng):
  field = rng.choice(_POSITIVE_FLOATS + _POSITIVE_INTS)
  bad = [0, -rng.randint(1, 10**6)]
  bad += [-rng.random(), math.nan, -math.inf, math.inf] if field in _POSITIVE_FLOATS else [0.5]
  _put(c, field, rng.choice(bad))
  return {field}, {field}


def _out_of_range(c, rng):
  field, bad = rng.choice(
    [
      ("pe.rotary_pct", [0.0, -0.5, 1.0 + rng.random()]),
      ("train.min_lr_ratio", [-rng.random(), 1.5]),
      ("train.b2", [1.0, 2.0, -0.1]),
      ("train.weight_decay", [-0.1]),
      ("model.mlp_dim", [-rng.randint(1, 99)]),
      ("seed", [-1]),
    ]
  )
  _put(c, field, rng.choice(bad))
  return {field}, {field}


def _unknown_choice(c, rng):
  field = rng.choice(["pe.name", "data.name", "data.task", "model.mlp", "model.norm"])
  field = rng.choice([field, "model.attention", "train.nan_policy", "pe.kerple_variant"])
  _put(c, field, rng.choice(["", "bogus", "ROPE", "relu", "flash", "ignore", "exp"]))
  return {field}, {field}


def _wrong_type(c, rng):
  field = rng.choice(_leaves(c))
  bad = {
    bool: ["yes", 1, None],
    str: [None, [1], 1, True],
    float: [None, "0.5", True, [0.5], math.nan, math.inf],
    int: [None, "12", True, 1.5, {"a": 1}],
  }[type(_at(c, field))]
  _put(c, field, rng.choice(bad))
  return {field}, {field}


def _unknown_field(c, rng):
  section = rng.choice(["", "model.", "train.", "pe.", "data.", "mesh."])
  field = section + rng.choice(["learning_rate", "heads", "rope_theta", "bogus", "dropout"])
  _put(c, field, 1)
  return {field}, {field}


def _missing_field(c, rng):
  field = rng.choice(_leaves(c))
  *sections, name = field.split(".")
  del (_at(c, ".".join(sections)) if sections else c)[name]
  return {field}, {field}


ROTARY = [name for name in encoding_names() if encoding_spec(name).rotary_dim is not None]
NO_ROPE_SCALING = sorted(set(encoding_names()) - set(rope_scaling_names()))


def _relation(c, rng):
  rotary = rng.choice(ROTARY)
  cases = [
    ({"model.num_heads": rng.choice([3, 5, 6, 7, 9, 33])}, "model.num_heads"),
    ({"pe.name": rotary, "model.head_dim": rng.randrange(1, 64, 2)}, "model.head_dim"),
    (
      {
        "pe.name": rng.choice(NO_ROPE_SCALING),
        "pe.rope_scaling": '{"rope_type": "linear", "factor": 2.0}',
      },
      "pe.rope_scaling",
    ),
    (
      {
        "pe.name": rng.choice(rope_scaling_names()),
        "pe.rope_scaling": rng.choice(["{", "yarn", "[1]", '{"factor": 2}']),
      },
      "pe.rope_scaling",
    ),
    (
      {"pe.name": "learned", "pe.randomized": False, "train.seq_len": 128 + rng.randint(1, 99)},
      "pe.max_len",
    ),
    ({"pe.randomized": True, "pe.max_random_len": rng.randint(1, 31)}, "pe.max_random_len"),
    ({"train.warmup_steps": 60 + rng.randint(0, 9)}, "train.warmup_steps"),
    ({"train.batch_size": 8 * rng.randint(1, 4) + rng.randint(1, 7)}, "train.batch_size"),
    ({"data.train_min_len": rng.randint(11, 40)}, "data.train_min_len"),
    ({"data.test_min_len": rng.randint(41, 99)}, "data.test_min_len"),
    ({"train.seq_len": rng.randint(1, 21)}, "train.seq_len"),
    ({"mesh.fsdp": rng.choice([3, 5, 16])}, "mesh.fsdp"),
    ({"mesh.data": rng.choice([2, 3, 16])}, "mesh.data"),
    ({"init_from": "/nonexistent/run"}, "init_from"),
  ]
  edits, field = rng.choice(cases)
  for name, value in edits.items():
    _put(c, name, value)
  touched = {*edits, "model.head_dim", "model.model_dim", "pe.rotary_pct", "pe.max_len"}
  touched |= {"data.train_max_len", "data.test_max_len", "train.steps", "mesh.data", "mesh.fsdp"}
  return touched, {field}


MUTATIONS = [_non_positive, _out_of_range, _unknown_choice, _wrong_type, _unknown_field]
MUTATIONS += [_missing_field, _relation, _relation]


def test_fuzzed_invalid_configs_are_one_line_value_errors_naming_a_bad_field():
  rng = random.Random(7)
  for trial in range(300):
    config = config_lib.config_to_dict(tiny.get_config(f"pe={rng.choice(encoding_names())}"))
    config_lib.validate(ml_collections.ConfigDict(config), device_count=8)
    touched, named, applied = set(), set(), []
    for mutation in rng.sample(MUTATIONS, rng.randint(1, 3)):
      trial_config = json.loads(json.dumps(config))
      fields, names = mutation(trial_config, rng)
      if not fields & touched:
        config, touched, named = trial_config, touched | fields, named | names
        applied.append(sorted(names))
    with pytest.raises(ValueError) as error:
      config_lib.validate(ml_collections.ConfigDict(config), device_count=8)
    message = str(error.value)
    assert "\n" not in message and "; allowed: " in message, (trial, applied, message)
    assert any(message.startswith((f"{f}=", f"{f} ", f"{f}.")) for f in named), (
      trial,
      applied,
      message,
    )
