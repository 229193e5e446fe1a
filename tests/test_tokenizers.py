"""HF tokenizers through the data pipeline, bits per byte over UTF-8 bytes, BPE passkey prompts."""

import math
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from configs import tiny
from pe_research import config_lib, eval_lib, passkey
from pe_research.data import ByteTokenizer, make_eval_batches, make_tokenizer, make_train_iterator
from pe_research.data.tokenizer import HFTokenizer, byte_level_alphabet

WORDS = "the pass key is grass green sky blue sun yellow here we go there and back again café naïve"
TEXT = "The pass key is 71432. Héllo wörld — naïve café 🙂\n\tend"


def _sentences(rng: np.random.Generator, count: int) -> list[str]:
  words = WORDS.split()
  return [
    " ".join(rng.choice(words, rng.integers(3, 12))).capitalize() + f" {rng.integers(10**5)}."
    for _ in range(count)
  ]


def _train_bpe(path, digits: bool) -> str:
  """A byte-level BPE like GPT-2's (``digits=False``) or SmolLM2's (one token per digit)."""
  tokenizer = Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.pre_tokenizer = (
    pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if digits
    else byte_level
  )
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=600,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  texts = _sentences(np.random.default_rng(0), 2000) + [passkey.HEADER, passkey.FILLER * 3]
  texts += [passkey.needle(k) for k in range(10_000, 10_300)]
  tokenizer.train_from_iterator(texts, trainer)
  tokenizer.save(str(path))
  return str(path)


@pytest.fixture(scope="module")
def bpe_paths(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bpe")
  return {
    style: _train_bpe(tmp / f"{style}.json", style == "digits") for style in ("gpt2", "digits")
  }


@pytest.fixture(scope="module")
def bpe(bpe_paths):
  return make_tokenizer(bpe_paths["gpt2"])


@pytest.fixture(scope="module")
def config(tmp_path_factory, bpe_paths, bpe):
  """tiny.py on a local_text corpus of sentences (20 train, 8 validation documents) with BPE."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(1)
  for split, count in (("train", 20), ("validation", 8)):
    (root / split).mkdir()
    for i in range(count):
      (root / split / f"doc{i}.txt").write_text("\n".join(_sentences(rng, int(rng.integers(2, 9)))))
  config = tiny.get_config()
  config.data.name = "local_text"
  config.data.local_dir = str(root)
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.data.tokenizer = bpe_paths["gpt2"]
  config.model.vocab_size = bpe.vocab_size
  return config


def test_bpe_round_trips_text_and_takes_eos_from_its_specials(bpe, bpe_paths):
  ids = bpe.encode(TEXT)
  assert ids.dtype == np.int32 and len(ids) < len(TEXT.encode())  # Merges apply.
  assert bpe.decode(ids) == TEXT and bpe.decode(bpe.encode(TEXT.encode())) == TEXT
  assert bpe.eos_id == bpe.pad_id == bpe.bos_id == 0 and bpe.vocab_size == 600
  assert bpe.decode([bpe.eos_id]) == "<|endoftext|>"
  assert make_tokenizer(bpe_paths["gpt2"]) is bpe  # Cached: opened documents are reused.
  other = make_tokenizer(bpe_paths["digits"])
  assert re.fullmatch(r"hf600-[0-9a-f]{12}", bpe.name) and other.name != bpe.name
  with pytest.raises(ValueError, match="no separator id"):
    _ = bpe.sep_id


def test_utf8_bytes_per_token_sums_to_the_utf8_length_of_the_text(bpe):
  assert set(byte_level_alphabet()) == set(pre_tokenizers.ByteLevel.alphabet())
  assert byte_level_alphabet()["Ġ"] == ord(" ")
  for tokenizer in (bpe, ByteTokenizer()):
    bytes_V = tokenizer.utf8_bytes_per_token()
    assert bytes_V.shape == (tokenizer.vocab_size,) and bytes_V[tokenizer.eos_id] == 0
    assert bytes_V[tokenizer.encode(TEXT)].sum() == len(TEXT.encode())
  np.testing.assert_array_equal(ByteTokenizer().utf8_bytes_per_token(), [1] * 256 + [0] * 4)


@pytest.mark.parametrize("mode,stride", [("nonoverlapping", None), ("sliding", 8)])
def test_bpe_eval_windows_score_the_same_targets_at_every_length(config, bpe, mode, stride):
  budget, scored = 150, {}
  for length in (16, 40, 64):
    batches = make_eval_batches(
      config, length=length, mode=mode, stride=stride, max_tokens=budget, batch_size=2
    )
    scored[length] = [t for b in batches for t in b["targets"][b["weights"] > 0].tolist()]
  assert len(scored[16]) == budget and scored[16] == scored[40] == scored[64]
  assert bpe.eos_id in scored[16] and max(scored[16]) >= 256  # EOS between documents, merges
  batch = next(make_train_iterator(config))
  assert batch["inputs"].shape == (8, 32) and batch["inputs"].max() < bpe.vocab_size


class _HalfNatPerToken(eval_lib.Evaluator):
  """A made-up scorer: NLL = 0.5 nats on every weighted target, no model."""

  def __init__(self):
    self.attention = "dense"

  def score(self, batch):
    w_BxL = batch["weights"].astype(np.float64)
    stats = {"nll_sum_L": 0.5 * w_BxL.sum(0), "weight_sum_L": w_BxL.sum(0)}
    per_row = {"nll_sum_B": 0.5 * w_BxL.sum(1), "scored_B": w_BxL.sum(1)}
    return stats | per_row | {"exact_B": w_BxL.sum(1) > 0}, 0.0


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_bits_per_byte_is_nll_over_ln2_over_the_scored_utf8_bytes(bpe, tokenizer):
  tok = bpe if tokenizer == "bpe" else ByteTokenizer()
  targets = np.concatenate([tok.encode(TEXT), [tok.eos_id], tok.encode("naïve")])
  weights = np.ones(len(targets), np.float32)
  weights[:3] = 0.0  # Unscored targets count no bytes.
  batch = {"inputs": targets, "targets": targets, "weights": weights}
  bytes_V = tok.utf8_bytes_per_token()
  totals = _HalfNatPerToken().score_all(
    [{k: v[None] for k, v in batch.items()}], batch_size=2, desc="", bytes_per_token_V=bytes_V
  )
  row = totals.lm_row()
  expected_bytes = len(TEXT.encode()) + len("naïve".encode()) - bytes_V[targets[:3]].sum()
  assert row["bytes"] == expected_bytes and row["tokens"] == len(targets) - 3
  assert row["loss"] == pytest.approx(0.5)
  assert row["bits_per_byte"] == pytest.approx(0.5 * row["tokens"] / math.log(2) / expected_bytes)


@pytest.mark.parametrize("style", ["gpt2", "digits"])
@pytest.mark.parametrize("length,depth", [(180, 0.0), (250, 0.5), (333, 1.0)])
def test_bpe_passkey_prompt_has_exact_length_and_in_context_answer_tokens(
  bpe_paths, style, length, depth
):
  tok = make_tokenizer(bpe_paths[style])
  for key in (71432, 10023, 99999):
    example = passkey.make_example(length, depth, key, tok.encode)
    answer = example.tokens[example.answer_start :]
    assert len(example.tokens) == length + 1
    assert tok.decode(answer).strip() == str(key)
    text = tok.decode(example.tokens)
    assert text.startswith(passkey.HEADER) and text.endswith(passkey.QUESTION + str(key))
    # The answer is what the tokenizer makes of the key at the end of the whole prompt.
    np.testing.assert_array_equal(tok.encode(text)[-len(answer) :], answer)
    row = example.as_batch_row()
    np.testing.assert_array_equal(row["targets"][row["weights"] > 0], answer)
    assert tok.decode(example.tokens[example.needle_start :]).startswith(passkey.needle(key))


def _set_tokenizer(config, spec: str, **fields) -> None:
  config.data.tokenizer = spec
  for dotted, value in fields.items():
    section, name = dotted.split("__")
    config[section][name] = value


@pytest.mark.parametrize(
  "case,message",
  [
    ("missing", "data.tokenizer='{missing}' is invalid; allowed: 'bytes' or the path of an"),
    ("not_json", "data.tokenizer='{not_json}' is invalid; allowed: 'bytes' or a tokenizer.json"),
    ("too_big", "model.vocab_size=260 is invalid; allowed: a size >= 600, the vocabulary of "),
    ("synthetic", "data.tokenizer='{gpt2}' is invalid; allowed: 'bytes' when data.name='synth"),
  ],
)
def test_config_validation_rejects_bad_tokenizers_in_one_line(
  config, bpe_paths, tmp_path, case, message
):
  config = config.copy_and_resolve_references()
  paths = {"missing": str(tmp_path / "none.json"), "not_json": str(tmp_path / "x.json")}
  (tmp_path / "x.json").write_text("{not json")
  paths |= bpe_paths
  spec = {"too_big": bpe_paths["gpt2"], "synthetic": bpe_paths["gpt2"]}.get(case, paths.get(case))
  fields = {"too_big": {"model__vocab_size": 260}, "synthetic": {"data__name": "synthetic"}}
  _set_tokenizer(config, spec, **fields.get(case, {}))
  with pytest.raises(ValueError) as error:
    config_lib.validate(config, device_count=8)
  assert "\n" not in str(error.value)
  assert str(error.value).startswith(message.format(**paths)), str(error.value)


def test_config_with_a_bpe_tokenizer_is_valid_and_bytes_is_the_default(config):
  config_lib.validate(config, device_count=8)
  assert tiny.get_config().data.tokenizer == "bytes"
  assert isinstance(make_tokenizer("bytes"), ByteTokenizer)
  assert isinstance(make_tokenizer(config.data.tokenizer), HFTokenizer)
