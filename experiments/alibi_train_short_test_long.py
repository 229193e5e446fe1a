r"""ALiBi paper Fig. 1 / Tables 2–3: train at L, evaluate at up to 30× L, eight encodings.

  python -m experiments.alibi_train_short_test_long --preset=cpu  # ~21 min after make demo
  python -m experiments.alibi_train_short_test_long --preset=paper --print_commands

Trains sinusoidal, RoPE, T5 bias, ALiBi, NoPE, KERPLE, FIRE and xPos models of one preset
(``experiments/lm_presets.py``; cpu reuses `make demo`'s runs) and evaluates each on the same
validation bytes at every length, non-overlapping (every token scored once, ppl = exp(mean
NLL)) and with a sliding window (stride S: each window scores its last S tokens). Both
protocols score the same target bytes (one token budget, ``Preset.max_tokens``, from the start
of the validation stream), so they differ only in the context each byte is scored with. Writes
``OUT/results.csv``, ``OUT/ppl_vs_length.png``, ``OUT/sliding.png`` and ``OUT/REPORT.md``,
which checks the published shapes (sinusoidal explodes past L, in both protocols; RoPE degrades
steadily, T5 improves a little then degrades, ALiBi stays flat) and the ordering at the longest
length.
The paper used WikiText-103 (not in TFDS); the paper preset trains on PG-19 bytes.
The cpu preset scores 262,144 bytes per length in both protocols (sliding at stride 64); the
paper preset's stride-1 sliding scores 262,144 bytes too: one window per byte at each length.
"""

from __future__ import annotations

import dataclasses
import os
import time

from experiments import figure_cli, figure_report, lm_presets
from pe_research import cli, eval_report, stats
from pe_research.launch import grid, sweep

NAME = "alibi_train_short_test_long"
ALL = ("sinusoidal", "rope", "t5", "alibi", "nope", "kerple", "fire", "xpos")
PAPER_ORDER = ("alibi", "t5", "rope", "sinusoidal")  # Best to worst at 30× L (Table 2).
# Press et al. 2022, WikiText-103, L=512, non-overlapping: L_valid -> ppl (None: OOM).
PUBLISHED = {
  "sinusoidal": {512: 20.05, 1012: 43.54, 1512: 76.23, 3512: 178.97, 12512: 373.17, 15512: 406.01},
  "rope": {512: 20.07, 1012: 21.37, 1512: 25.99, 3512: 35.54, 12512: 69.70, 15512: 79.25},
  "t5": {512: 19.65, 1012: 18.79, 1512: 18.91, 3512: 22.91, 12512: 64.94, 15512: None},
  "alibi": {512: 19.73, 1012: 18.73, 1512: 18.52, 3512: 18.40, 12512: 18.31, 15512: 18.31},
}
PUBLISHED_SLIDING = {  # Stride 1, trained at 512: L_valid 512 / 1024 / 3072.
  "sinusoidal": (18.35, 204.42, 360.12),
  "t5": (17.92, 18.51, 30.77),
  "alibi": (17.98, 17.92, 18.3),
}


@dataclasses.dataclass(frozen=True)
class Preset:
  encodings: tuple[str, ...]
  lengths: tuple[int, ...]  # Non-overlapping evaluation lengths; the first is L.
  max_tokens: int  # Bytes scored per length, the same bytes in both protocols.
  sliding_lengths: tuple[int, ...]  # The first is L, the second 2L.
  stride: int
  batch_size: int


PRESETS = {
  "smoke": Preset(("sinusoidal", "rope", "alibi"), (32, 64, 512), 512, (32, 64), 8, 4),
  "cpu": Preset(ALL, tuple(128 * 2**k for k in range(6)), 262_144, (128, 256, 512), 64, 4),
  "paper": Preset(
    ALL, (512, 1012, 1512, 2512, 3512, 6512, 12512, 15512), 262_144, (512, 1024, 3072), 1, 16
  ),
}


def requests(preset: Preset) -> dict[str, dict]:
  """Evaluation name -> ``sweep.evaluate`` arguments of the two protocols. One token budget:
  both score the targets ``s[1..max_tokens]`` of the validation stream at every length."""
  common = {"max_tokens": preset.max_tokens, "batch_size": preset.batch_size}
  return {
    "fig1": {"lengths": preset.lengths, **common},
    f"fig1_sliding_s{preset.stride}": {
      **{"lengths": preset.sliding_lengths, "mode": "sliding", "stride": preset.stride},
      **common,
    },
  }


def ratio(rows: list[dict], at: int) -> float:
  """ppl at row ``at`` over ppl at the first (training) length."""
  return rows[at]["ppl"] / rows[0]["ppl"]


def tri_verdict(ok: bool | None) -> str:
  return figure_report.NO_VERDICT if ok is None else figure_report.verdict(ok)


def sinusoidal_line(res: dict[str, list[dict]], sliding: dict[str, list[dict]]) -> str:
  """Does sinusoidal explode right past L (ppl at the second length > 1.5 ppl(L), intervals
  separated)? Checked in both protocols; a verdict either way only when both agree."""
  protocols = {"non-overlapping": res.get("sinusoidal"), "sliding": sliding.get("sinusoidal")}
  measured = {k: rows for k, rows in protocols.items() if rows}
  text = "; ".join(
    f"{k} ppl({rows[1]['length']})/ppl(L) = {ratio(rows, 1):.2f}" for k, rows in measured.items()
  )
  explodes = {figure_report.exceeds(rows[1], rows[0], 1.5) for rows in measured.values()}
  if len(measured) < len(protocols):
    verdict = "**measured in one protocol only: no verdict**"
  elif None in explodes:
    verdict = figure_report.NO_VERDICT
  elif len(explodes) > 1:
    verdict = "**the protocols disagree: no verdict**"
  else:
    no = "does NOT explode in either protocol: does NOT match the paper"
    verdict = figure_report.verdict(explodes == {True}, no=no)
  return f"- Sinusoidal explodes right past L: {text} (paper: 2.17 and 11.1) — {verdict}"


def ranking_line(res: dict[str, list[dict]]) -> str:
  """The paper's order at the longest length, checked pair by adjacent pair with intervals."""
  expected = [pe for pe in PAPER_ORDER if pe in res]
  intervals = {pe: figure_report.interval(res[pe][-1]) for pe in expected}
  pairs = [
    figure_report.exceeds(res[b][-1], res[a][-1])
    for a, b in zip(expected, expected[1:], strict=False)
  ]
  ok = False if False in pairs else (True if all(pairs) else None)
  return (
    f"- Ranking at the longest length (best first; `<` separated, `~` tied): "
    f"{stats.rank(intervals)[0]}; paper: {' < '.join(expected)} — {tri_verdict(ok)}"
  )


def findings(res: dict[str, list[dict]], sliding: dict[str, list[dict]]) -> list[str]:
  """Sentences checking the published shapes against these rows (``ppl`` and its 95% interval
  ``ppl_lo``/``ppl_hi``): each shape is claimed or denied only where the intervals separate."""
  rope = res["rope"]
  drops = [figure_report.exceeds(b, a) is False for a, b in zip(rope[1:], rope[2:], strict=False)]
  rope_up = figure_report.exceeds(rope[-1], rope[0], 1.15)
  rope_ok = False if rope_up is False or any(drops) else rope_up
  alibi_max = max(ratio(res["alibi"], i) for i in range(len(res["alibi"])))
  lines = [
    sinusoidal_line(res, sliding),
    f"- RoPE degrades steadily: ppl(max)/ppl(L) = {ratio(rope, -1):.2f} (paper 3.95 at 30×), "
    f"{'a separated drop' if any(drops) else 'no separated drop'} from 2L on — "
    + tri_verdict(rope_ok),
    f"- ALiBi stays flat: largest ppl/ppl(L) = {alibi_max:.2f} (paper 1.00; 0.93 at 30×) — "
    + tri_verdict(figure_report.stays_flat(res["alibi"], 1.05)),
  ]
  if "t5" in res:
    t5 = res["t5"]
    early = [figure_report.exceeds(r, t5[0]) for r in t5[1:3]]
    low = min(t5, key=lambda r: r["ppl"])
    improves, degrades = False in early, figure_report.exceeds(t5[-1], low) is True
    shape = True if improves and degrades else (False if all(early) else None)
    lines.append(
      "- T5 improves a little then degrades: ppl/ppl(L) = "
      + ", ".join(f"{ratio(t5, i):.2f}" for i in range(len(t5)))
      + " (paper 0.96 at 2×, 3.3 at 24×) — "
      + tri_verdict(shape)
    )
  lines.append(ranking_line(res))
  extra = [pe for pe in res if pe not in PAPER_ORDER]
  if extra:
    lines.append(
      "- Not in the ALiBi paper (ppl(max)/ppl(L)): "
      + ", ".join(f"{pe} {ratio(res[pe], -1):.2f}" for pe in extra)
    )
  at_l = {pe: figure_report.exceeds(sliding[pe][0], res[pe][0]) for pe in sliding}
  below = sum(v is False for v in at_l.values())
  above = sum(v is True for v in at_l.values())
  helps = False if above else (True if below == len(at_l) else None)
  alibi_slide = ratio(sliding["alibi"], -1)
  lines += [
    f"- Sliding window at L scores below non-overlapping at L (more context per token): "
    f"separated below for {below}, above for {above}, tied for {len(at_l) - below - above} of "
    f"{len(at_l)} encodings (paper: all below) — " + tri_verdict(helps),
    f"- Sliding, ALiBi at the longest sliding length / at L = {alibi_slide:.2f} (paper 1.02) — "
    + tri_verdict(figure_report.stays_flat(sliding["alibi"], 1.05)),
  ]
  return lines


_CSV_COLUMNS = ("mode", "stride", "length", "tokens", "loss", "ppl", "ppl_lo", "ppl_hi", "windows")


def write_outputs(out, preset, res, sliding, wall: float, args) -> None:
  rows = [
    {"encoding": pe, **{k: r.get(k) for k in _CSV_COLUMNS}}
    for table in (res, sliding)
    for pe, pe_rows in table.items()
    for r in pe_rows
  ]
  figure_report.write_csv(os.path.join(out, "results.csv"), rows)
  L = preset.lengths[0]
  for file, table, kind in (("ppl_vs_length", res, "non-overlapping"), ("sliding", sliding, "")):
    eval_report.plot_curves(
      os.path.join(out, f"{file}.png"),
      figure_report.ppl_curves(table),
      ylabel="validation perplexity (bytes)",
      title=f"Train at L={L}, test long ({kind or f'sliding, stride {preset.stride}'})",
      train_len=L,
    )
  published = [[pe, *PUBLISHED[pe].values()] for pe in PAPER_ORDER[::-1]]
  text = [
    f"# Train short, test long — ALiBi paper Fig. 1 (preset `{args.preset}`)",
    "",
    f"Byte-level LMs ({lm_presets.PRESETS[args.preset].config_file}) trained at L={L}; the "
    f"same {preset.max_tokens} validation bytes scored at every length, in both protocols "
    f"(non-overlapping and sliding windows). Runs: `{args.runs}`. "
    f"Wall time of this invocation: {wall / 60:.1f} min.",
    "",
    "![non-overlapping](ppl_vs_length.png) ![sliding](sliding.png)",
    "",
    "## Non-overlapping perplexity",
    *figure_report.ppl_table("encoding", res),
    "",
    f"## Sliding window, stride {preset.stride} (the same {preset.max_tokens} bytes per length)",
    *figure_report.ppl_table("encoding", sliding),
    "",
    "## Published (WikiText-103, word-level, L=512, non-overlapping)",
    *figure_report.markdown_table(["encoding", *PUBLISHED["alibi"]], published),
    "",
    "Sliding, stride 1, at 512 / 1024 / 3072: "
    + "; ".join(f"{pe} {'/'.join(map(str, v))}" for pe, v in PUBLISHED_SLIDING.items()),
    "",
    "Our perplexities are per byte (PG-19 or Python source), the paper's per word: compare the",
    "shapes (ratios to the ppl at L) and orderings, not the values.",
  ]
  figure_report.write_report(out, text, findings(res, sliding))


def main(argv: list[str] | None = None) -> None:
  args = figure_cli.parse_experiment_args(
    __doc__, NAME, argv, lambda preset: lm_presets.PRESETS[preset].runs
  )
  start, preset = time.time(), PRESETS[args.preset]
  overrides = grid.parse_overrides(args.set)
  runs = [lm_presets.lm_run(args.preset, pe, args.runs, overrides) for pe in preset.encodings]
  out = figure_cli.run_or_print(runs, args, NAME)
  if out is None:
    return
  res, sliding = {}, {}
  (fig1, nonoverlapping), (fig1_sliding, sliding_request) = requests(preset).items()
  for pe, run in zip(preset.encodings, runs, strict=True):
    print(f"== {pe}: evaluate at {preset.lengths}, sliding at {preset.sliding_lengths}", flush=True)
    res[pe] = sweep.evaluate(run.workdir, fig1, **nonoverlapping)["rows"]
    if pe in ("sinusoidal", "rope", "t5", "alibi"):  # The paper's sliding table.
      sliding[pe] = sweep.evaluate(run.workdir, fig1_sliding, **sliding_request)["rows"]
  write_outputs(out, preset, res, sliding, time.time() - start, args)
  print(f"wrote {out}/REPORT.md, results.csv, ppl_vs_length.png, sliding.png", flush=True)


if __name__ == "__main__":
  cli.exit_on_value_error(main)
