"""Configs: defaults documented, variants parsed, every invalid field named in one line, and
the command line exits 2 with one line for bad configs and flags."""

import os
import re
import subprocess
import sys

import pytest

from configs import base, lm, tiny
from pe_research import config_lib
from pe_research.encodings.registry import encoding_names

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
