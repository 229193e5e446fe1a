"""The presets and zero-shot methods of ``experiments/pretrained_extension.py``: what each scale
evaluates, and which method is one config value (``pe.rope_scaling`` or a ``pe.*`` field)."""

from __future__ import annotations

import dataclasses

_L = "original_max_position_embeddings"


@dataclasses.dataclass(frozen=True)
class Preset:
  factor: int  # s: the target context is s·L.
  methods: tuple[str, ...]  # Zero-shot methods evaluated (labels of ZERO_SHOT).
  lengths: tuple[int, ...]  # Every zero-shot method, first text kind.
  base_lengths: tuple[int, ...]  # Also for "none" (every text kind): the reference at/below L.
  windows: int  # Windows per length up to L; one window beyond L.
  long_lengths: tuple[int, ...]  # Only long_methods and the fine-tuned models (first text kind).
  long_methods: tuple[str, ...]
  sliding_lengths: tuple[int, ...]  # Also sliding windows with stride 256 (first text kind).
  stride: int
  self_extend: tuple[int, int]  # (W, G)
  rerope_window: int
  niah_lengths: tuple[int, ...]
  niah_depths: tuple[float, ...]
  niah_trials: int
  niah_methods: tuple[str, ...]
  other_methods: tuple[str, ...]  # Text kinds after the first: these methods ...
  other_lengths: tuple[int, ...]  # ... at these lengths.
  ft_methods: tuple[str, ...]
  ft_steps: int
  ft_seq_len: int  # PI/YaRN fine-tuning window.
  pose_seq_len: int  # PoSE's training window (L in the paper), positions over s·L.
  data: dict  # text kind -> data overrides (first kind: the long lengths and fine-tuning)


ZERO_SHOT = (
  "none",
  "PI",
  "NTK",
  "dynamic NTK",
  "YaRN",
  "Llama-3",
  "Self-Extend",
  "log-n",
  "ReRoPE",
)
_TEXTS = {"python": {"data.name": "pystdlib"}, "prose": {"data.name": "sotu"}}
PRESETS = {
  "smoke": Preset(
    factor=4,
    methods=ZERO_SHOT,
    lengths=(32, 128),
    base_lengths=(64,),
    windows=2,
    long_lengths=(256,),
    long_methods=("YaRN", "Self-Extend"),
    sliding_lengths=(64,),
    stride=16,
    self_extend=(16, 4),
    rerope_window=32,
    niah_lengths=(256,),
    niah_depths=(0.0, 1.0),
    niah_trials=1,
    niah_methods=("none", "YaRN"),
    other_methods=(),
    other_lengths=(),
    ft_methods=("PI", "YaRN", "PoSE"),
    ft_steps=2,
    ft_seq_len=128,
    pose_seq_len=64,
    data={"text": {}},
  ),
  # Measured here (AMD EPYC Zen 4, 2 cores), one SmolLM2 window: 2k 6 s, 8k 53 s, 12k ~100 s,
  # 32k 11.5 min (attention at ~65 GFLOP/s). The budget (60 min) buys every method at 16k
  # with the base at 8k, the shorter lengths by sliding windows at 2k, Self-Extend at 32k,
  # the prose at 12k for three methods and a small NIAH grid; fine-tunes are `cpu-ft`.
  "cpu": Preset(
    factor=4,
    methods=ZERO_SHOT,
    lengths=(16384,),
    base_lengths=(8192,),
    windows=1,
    long_lengths=(32768,),
    long_methods=("Self-Extend",),
    sliding_lengths=(2048,),
    stride=256,
    self_extend=(1024, 8),
    rerope_window=4096,
    niah_lengths=(2048, 12288),
    niah_depths=(0.5,),
    niah_trials=1,
    niah_methods=("none", "YaRN", "Self-Extend"),
    other_methods=("none", "YaRN", "Self-Extend"),
    other_lengths=(12288,),
    ft_methods=(),
    ft_steps=0,
    ft_seq_len=0,
    pose_seq_len=0,
    data=_TEXTS,
  ),
  # The fine-tunes that do not fit beside `cpu`: 10 steps of 2,048 tokens each (a step ~22 s
  # here, the first ~90 s with compilation; peak RSS ~11 GB), PoSE on the same 2,048-token
  # window with positions over s·L. The zero-shot rows it shows are `cpu`'s cached ones.
  "cpu-ft": Preset(
    factor=4,
    methods=("none", "PI", "YaRN"),
    lengths=(16384,),
    base_lengths=(8192,),
    windows=1,
    long_lengths=(),
    long_methods=(),
    sliding_lengths=(2048,),
    stride=256,
    self_extend=(1024, 8),
    rerope_window=4096,
    niah_lengths=(),
    niah_depths=(),
    niah_trials=0,
    niah_methods=(),
    other_methods=(),
    other_lengths=(),
    ft_methods=("PI", "YaRN", "PoSE"),
    ft_steps=10,
    ft_seq_len=2048,
    pose_seq_len=2048,
    data={"python": _TEXTS["python"]},
  ),
  "paper": Preset(
    factor=4,
    methods=ZERO_SHOT,
    lengths=(1024, 2048, 4096, 8192, 16384, 32768),
    base_lengths=(),
    windows=16,
    long_lengths=(65536,),
    long_methods=ZERO_SHOT,
    sliding_lengths=(1024, 2048, 4096, 8192),
    stride=256,
    self_extend=(1024, 8),
    rerope_window=4096,
    niah_lengths=(2048, 8192, 16384, 32768),
    niah_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    niah_trials=10,
    niah_methods=ZERO_SHOT,
    other_methods=ZERO_SHOT,
    other_lengths=(1024, 2048, 4096, 8192, 16384, 32768),
    ft_methods=("PI", "YaRN", "PoSE"),
    ft_steps=400,
    ft_seq_len=32768,
    pose_seq_len=8192,
    data=_TEXTS,
  ),
}


def same_as_none(label: str, n: int, preset: Preset, train_len: int) -> bool:
  """Whether ``label`` on windows of ``n`` tokens is the base model by construction (tested):
  dynamic NTK and log-n change nothing up to L, Self-Extend and ReRoPE nothing up to their W."""
  limit = {
    "dynamic NTK": train_len,
    "log-n": train_len,
    "Self-Extend": preset.self_extend[0],
    "ReRoPE": preset.rerope_window,
  }.get(label)
  return label == "none" or (limit is not None and n <= limit)


def zero_shot_methods(preset: Preset, train_len: int) -> dict[str, tuple[dict | None, dict]]:
  """Label -> (rope_scaling or None, pe overrides) extending ``train_len`` by the factor."""
  s, (window, group) = float(preset.factor), preset.self_extend
  return {
    "none": (None, {}),
    "PI": ({"rope_type": "linear", "factor": s}, {}),
    "NTK": ({"rope_type": "ntk", "factor": s}, {}),
    "dynamic NTK": ({"rope_type": "dynamic", "factor": s, _L: train_len}, {}),
    "YaRN": ({"rope_type": "yarn", "factor": s, _L: train_len}, {}),
    "Llama-3": (
      {"rope_type": "llama3", "factor": s, _L: train_len}
      | {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
      {},
    ),
    "Self-Extend": (None, {"pe.self_extend_window": window, "pe.self_extend_group": group}),
    "log-n": (None, {"pe.logn_len": train_len}),
    "ReRoPE": (None, {"pe.rerope_window": preset.rerope_window}),
  }


def subset(preset: Preset, methods: str, lengths: str) -> Preset:
  """The preset restricted to ``methods`` (zero-shot labels; fine-tunes are "PI (ft)"...) and
  with ``lengths`` in place of its lengths (a quick look; the report says what ran)."""
  if methods:
    chosen = [m.strip() for m in methods.split(",")]
    known = (*ZERO_SHOT, *(f"{m} (ft)" for m in ("PI", "YaRN", "PoSE")))
    if unknown := [m for m in chosen if m not in known]:
      raise ValueError(f"--methods: {', '.join(unknown)} unknown; allowed: {', '.join(known)}")
    keep = lambda names: tuple(m for m in names if m in chosen)  # noqa: E731
    ft = tuple(m for m in preset.ft_methods if f"{m} (ft)" in chosen)
    preset = dataclasses.replace(
      preset,
      methods=keep(preset.methods),
      long_methods=keep(preset.long_methods),
      niah_methods=keep(preset.niah_methods),
      other_methods=keep(preset.other_methods),
      ft_methods=ft,
    )
  if lengths:
    try:
      values = tuple(sorted(int(n) for n in lengths.split(",")))
    except ValueError:
      raise ValueError(f"--lengths={lengths!r} must be comma-separated integers") from None
    preset = dataclasses.replace(preset, lengths=values)
  return preset
