"""The `tokenizer.json` text of a GGUF file's byte-level BPE vocabulary.

A GGUF holds no tokenizer.json: llama.cpp stores the tokens (`tokenizer.ggml.tokens`), merges,
token kinds, special ids and a pre-tokenizer name (`tokenizer.ggml.pre`). This rebuilds the JSON
that `tokenizers.Tokenizer.from_str` loads, splitting text as llama.cpp does for that name
(llama-vocab.cpp), which is also how the model's original tokenizer.json split it.
"""

import json

import gguf

_BYTE_LEVEL = {
  "type": "ByteLevel",
  "add_prefix_space": False,
  "trim_offsets": True,
  "use_regex": True,
}
_LLAMA3_REGEX = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(regex: str) -> list[dict]:
  """Split on `regex`, then spell bytes (ByteLevel without its own GPT-2 regex)."""
  split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
  return [split, {**_BYTE_LEVEL, "use_regex": False}]


# Pre-tokenizer families: how text is split before BPE; `ignore_merges` takes a whole split piece
# that is in the vocabulary as one token; `add_bos` is the default when the file does not say.
_GPT2 = {"pre_tokenizers": [_BYTE_LEVEL], "ignore_merges": False, "add_bos": False}
_STARCODER = {  # every digit alone, then GPT-2's regex
  "pre_tokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
  "ignore_merges": False,
  "add_bos": False,
}
_LLAMA3 = {
  "pre_tokenizers": _split_then_bytes(_LLAMA3_REGEX),
  "ignore_merges": True,
  "add_bos": True,
}
_QWEN2 = {
  "pre_tokenizers": _split_then_bytes(_QWEN2_REGEX),
  "ignore_merges": False,
  "add_bos": False,
}
_FAMILIES = {
  **dict.fromkeys(("gpt-2", "mpt", "olmo"), _GPT2),
  **dict.fromkeys(("smollm", "starcoder", "refact"), _STARCODER),
  **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _LLAMA3),
  **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
}


def tokenizer_json(metadata: dict) -> str:
  """tokenizer.json text (BPE over byte-spelled tokens) from a GGUF file's metadata values."""
  model = metadata.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"tokenizer.ggml.model={model!r} is not supported; allowed: 'gpt2' (BPE)")
  pre = metadata.get("tokenizer.ggml.pre")
  if pre not in _FAMILIES:
    raise ValueError(
      f"tokenizer.ggml.pre={pre!r} is not supported; allowed: {', '.join(_FAMILIES)}"
    )
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
    if key not in metadata:
      raise ValueError(f"GGUF field {key} is missing")
  family = _FAMILIES[pre]
  tokens = metadata["tokenizer.ggml.tokens"]
  kinds = metadata.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
  alphabet = _byte_alphabet()
  spelled = set(alphabet)
  vocab = {
    token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode()): i
    for i, token in enumerate(tokens)
  }
  # Control tokens (<|im_end|>) are special; user-defined ones (<think>) are matched whole but
  # not special. A byte-level token outside the alphabet is a mislabel: adding it would grow
  # the vocabulary past the model's, so it stays an ordinary token.
  added = [
    _added_token(i, token, special=kind == gguf.TokenType.CONTROL)
    for i, (token, kind) in enumerate(zip(tokens, kinds, strict=True))
    if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED) and set(token) <= spelled
  ]
  ends = {}  # "bos"/"eos" -> token id, for the ends the tokenizer adds
  for end, default in (("bos", family["add_bos"]), ("eos", False)):
    if metadata.get(f"tokenizer.ggml.add_{end}_token", default):
      key = f"tokenizer.ggml.{end}_token_id"
      if key not in metadata:
        raise ValueError(f"GGUF field {key} is missing (tokenizer.ggml.add_{end}_token is true)")
      ends[end] = metadata[key]
  tokenizer = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": added,
    "normalizer": None,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": family["pre_tokenizers"]},
    "post_processor": _post_processor(ends, tokens),
    "decoder": {**_BYTE_LEVEL, "add_prefix_space": True},
    "model": {
      "type": "BPE",
      "dropout": None,
      "unk_token": None,
      "continuing_subword_prefix": None,
      "end_of_word_suffix": None,
      "fuse_unk": False,
      "byte_fallback": False,
      "ignore_merges": family["ignore_merges"],
      "vocab": vocab,
      "merges": [merge.split(" ") for merge in metadata["tokenizer.ggml.merges"]],
    },
  }
  return json.dumps(tokenizer, ensure_ascii=False)


def _byte_alphabet() -> list[str]:
  """GPT-2's spelling of each byte: printable Latin-1 as itself, the rest as chr(256 + k)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  others = [b for b in range(256) if b not in printable]
  spelling = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}
  return [spelling[b] for b in range(256)]


def _added_token(token_id: int, content: str, special: bool) -> dict:
  return {
    "id": token_id,
    "content": content,
    "single_word": False,
    "lstrip": False,
    "rstrip": False,
    "normalized": False,
    "special": special,
  }


def _post_processor(ends: dict[str, int], tokens: list[str]) -> dict | None:
  """TemplateProcessing `[bos] $A [eos]` (pair: the same around $B), or None when adding none."""
  if not ends:
    return None

  def around(sequence: str, type_id: int) -> list[dict]:
    token = {
      end: [{"SpecialToken": {"id": tokens[i], "type_id": type_id}}] for end, i in ends.items()
    }
    return [
      *token.get("bos", []),
      {"Sequence": {"id": sequence, "type_id": type_id}},
      *token.get("eos", []),
    ]

  return {
    "type": "TemplateProcessing",
    "single": around("A", 0),
    "pair": around("A", 0) + around("B", 1),
    "special_tokens": {
      tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in ends.values()
    },
  }
