"""The registry and the specs: every family module is listed, every pe.* field has one owner
with a comment and a valid default, configs/base.py is built from the specs, and each spec's
facts (rotary width, longest length, rope_scaling) are what the built encoding does."""

import importlib
import pkgutil

import pytest
from flax import nnx

import pe_research.encodings
from configs import base
from pe_research.encodings.registry import (
  FAMILIES,
  WRAPPERS,
  build_encoding,
  encoding_names,
  encoding_spec,
  owned_fields,
  pe_fields,
)
from pe_research.encodings.rope_scaling import RopeScaling

SHARED_FIELDS = {"name", "share_across_layers", "train_len"}  # Stated in configs/base.py.
HEAD_DIM = 8


def test_every_module_with_a_spec_is_in_the_registry():
  listed = [spec for spec, _ in FAMILIES.values()] + list(WRAPPERS)
  for info in pkgutil.iter_modules(pe_research.encodings.__path__):
    module = importlib.import_module(f"pe_research.encodings.{info.name}")
    if hasattr(module, "SPEC"):
      assert any(module.SPEC is spec for spec in listed), info.name


def test_every_field_has_one_owner_a_one_line_comment_and_a_valid_default():
  names = [field.name for field in pe_fields()]
  assert len(names) == len(set(names)) and not set(names) & SHARED_FIELDS
  for owner, field in owned_fields():
    assert field.comment and "\n" not in field.comment, field.name
    field.check(field.default)
    assert owner is not None or not field.switch, field.name  # A switch belongs to a family.


def test_base_config_pe_is_the_spec_fields_plus_the_shared_ones():
  pe, fields = base.get_config().pe, {field.name: field for field in pe_fields()}
  assert set(pe) == set(fields) | SHARED_FIELDS
  for name, field in fields.items():
    assert pe[name] == field.default and type(pe[name]) is type(field.default), name


def _build(name, **overrides):
  pe = base.get_config().pe
  pe.update(dict(name=name, train_len=16, **overrides))
  return pe, build_encoding(pe, num_heads=2, head_dim=HEAD_DIM, model_dim=16, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", encoding_names())
def test_spec_facts_are_what_the_built_encoding_does(name):
  spec = encoding_spec(name)
  pe, encoding = _build(name, max_len=64)
  assert encoding.max_length == spec.max_length(pe)
  assert (spec.rotary_dim is not None) == hasattr(encoding, "rotary_dim")
  if spec.rotary_dim is not None:
    for pct in (1.0, 0.5, 0.25):
      pe, encoding = _build(name, rotary_pct=pct)
      assert encoding.rotary_dim == spec.rotary_dim(HEAD_DIM, pe) == int(HEAD_DIM * pct)
  if spec.takes_rope_scaling:
    _, encoding = _build(name, rope_scaling='{"rope_type": "yarn", "factor": 2.0}')
    assert encoding.scaling == RopeScaling("yarn", factor=2.0, original_max_position_embeddings=16)
