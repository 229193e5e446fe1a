"""experiments/pretrained_extension.py: the smoke preset end to end on a tiny imported random
Llama, and its verdict logic on made-up rows that should pass and rows that should fail."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers", reason="builds the tiny HF model (requirements-dev)")

from tiny_llama import hf_model, save  # noqa: E402

from experiments import extension_report, pretrained_extension  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ppl(values: dict[int, float], width: float = 0.05) -> dict[int, tuple]:
  return {n: (p, p * (1 - width), p * (1 + width)) for n, p in values.items()}


def test_findings_confirm_only_separated_shapes():
  published = {
    "none": _ppl({32: 10.0, 64: 9.0, 128: 40.0}),
    "PI": _ppl({32: 12.0, 64: 11.0, 128: 10.0}),
    "YaRN": _ppl({32: 10.0, 64: 9.0, 128: 9.5, 256: 9.4}),
    "Self-Extend": _ppl({32: 10.0, 64: 9.0, 128: 9.2, 256: 9.1}),
  }
  lines = extension_report.findings(published, 64, 4, {})
  assert all("**matches**" in line for line in lines), lines
  contrary = {
    "none": _ppl({32: 10.0, 64: 9.0, 128: 9.5}),  # does not explode
    "PI": _ppl({32: 8.0, 64: 7.0, 128: 7.0}),  # better than the base inside L
    "YaRN": _ppl({32: 10.0, 64: 9.0, 128: 30.0, 256: 60.0}),  # explodes
    "Self-Extend": _ppl({32: 10.0, 64: 9.0, 128: 9.5, 256: 10.6}, width=0.3),  # overlaps 1.2x
  }
  lines = extension_report.findings(contrary, 64, 4, {})
  assert sum("**does NOT match**" in line for line in lines) == 3, lines
  assert any("Self-Extend" in line and "**not separated**" in line for line in lines), lines


def test_positive_control_decides_whether_the_grid_is_evidence():
  ppl = {"none": _ppl({32: 10.0, 64: 9.0})}
  fail = {"none": [{"length": 32, "depth": 0.0, "accuracy": 0.0}]}
  ok = {"none": [{"length": 32, "depth": 0.0, "accuracy": 1.0}]}
  assert "grid not evidence" in extension_report.findings(ppl, 64, 4, fail)[-1]
  assert "the grid is evidence" in extension_report.findings(ppl, 64, 4, ok)[-1]


@pytest.mark.slow
def test_smoke_preset_runs_every_method_and_writes_outputs(tmp_path):
  from pe_research.pretrained import importer

  workdir = tmp_path / "run"
  importer.import_checkpoint(save(hf_model(), tmp_path / "hf"), str(workdir))
  for split, source in (("train", "model.py"), ("validation", "attention.py")):
    os.makedirs(tmp_path / "text" / split)
    shutil.copy(os.path.join(REPO, "pe_research", source), tmp_path / "text" / split / "a.txt")
  data = {"data.name": "local_text", "data.local_dir": str(tmp_path / "text")}
  data["data.data_dir"] = str(tmp_path / "tfds")
  config = json.loads((workdir / "config.json").read_text())
  config["data"] |= {key.split(".")[1]: value for key, value in data.items()}
  (workdir / "config.json").write_text(json.dumps(config))
  out = tmp_path / "out"
  args = ["--preset=smoke", f"--workdir={workdir}", f"--out={out}"]
  pretrained_extension.main([*args, f"--data={json.dumps({'text': data})}"])
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  methods = {r["method"] for r in rows}
  assert methods >= {*pretrained_extension.ZERO_SHOT, "PI (ft)", "YaRN (ft)", "PoSE (ft)"}
  assert all(float(r["ppl_lo"]) <= float(r["ppl"]) <= float(r["ppl_hi"]) for r in rows)
  assert all(r["train_loss"] for r in rows if r["fine_tuned"] == "True")
  report = (out / "REPORT.md").read_text()
  assert "Does the published shape appear?" in report and "Needle in a haystack" in report
  assert (out / "text.png").is_file() and (out / "niah.csv").is_file()


def _eval_file(path, losses, tokens=None):
  tokens = np.ones(len(losses)) if tokens is None else tokens
  pairs = enumerate(zip(losses, tokens, strict=True))
  rows = [{"position": i, "tokens": t, "loss": x} for i, (x, t) in pairs]
  with open(str(path) + "_per_position.json", "w") as f:
    json.dump({"rows": rows}, f)
  return str(path)


def test_paired_ratio_cancels_the_texts_difficulty(tmp_path):
  rng = np.random.default_rng(0)
  base = rng.gamma(2.0, 1.0, 4096)  # a text whose per-token loss varies a lot
  a = _eval_file(tmp_path / "a", base + 0.05)  # 5% worse in ppl on every token
  b = _eval_file(tmp_path / "b", base)
  read = extension_report.per_position
  ratio, lo, hi = extension_report.paired_ratio(read(a), read(b))
  assert ratio == pytest.approx(np.exp(0.05)) and 1 < lo <= ratio <= hi
  # Better on some stretches, worse on others, equal on average: tied (the interval spans 1).
  mixed = _eval_file(tmp_path / "m", base + 0.1 * rng.choice([-1.0, 1.0], 4096).repeat(1))
  ratio, lo, hi = extension_report.paired_ratio(read(mixed), read(b))
  assert lo < 1 < hi, (ratio, lo, hi)
  # Different scored tokens: no pairing.
  other = _eval_file(tmp_path / "o", base, tokens=np.full(4096, 2.0))
  assert extension_report.paired_ratio(read(other), read(b)) is None


def test_paired_to_base_skips_copies_and_drives_the_pi_verdict(tmp_path):
  base = np.linspace(1.0, 2.0, 512)
  rows = [
    {"text": "t", "method": "none", "length": 64, "mode": "sliding"},
    {"text": "t", "method": "PI", "length": 64, "mode": "sliding"},
    {"text": "t", "method": "log-n", "length": 64, "mode": "sliding", "same_as": "none"},
  ]
  rows[0]["eval"] = rows[2]["eval"] = _eval_file(tmp_path / "none", base)
  for shift, expect in ((0.1, "**matches**"), (-0.1, "**does NOT match**"), (0.0, "**not")):
    rows[1]["eval"] = _eval_file(tmp_path / f"pi{shift}", base + shift)
    paired = extension_report.paired_to_base(rows, "t")
    assert set(paired) == {("PI", 64, "sliding")}
    line = extension_report.findings({"none": _ppl({64: 9.0})}, 64, 4, {}, paired)[0]
    assert "PI zero-shot hurts inside L" in line and expect in line, line


def test_same_as_none_only_where_the_method_cannot_act():
  preset = pretrained_extension.PRESETS["cpu"]
  same = pretrained_extension.same_as_none
  assert same("none", 8192, preset, 8192)
  assert same("dynamic NTK", 8192, preset, 8192) and not same("dynamic NTK", 8193, preset, 8192)
  assert same("log-n", 2048, preset, 8192) and not same("log-n", 16384, preset, 8192)
  assert same("ReRoPE", 4096, preset, 8192) and not same("ReRoPE", 8192, preset, 8192)
  assert same("Self-Extend", 1024, preset, 8192) and not same("Self-Extend", 2048, preset, 8192)
  assert not any(same(m, 2048, preset, 8192) for m in ("PI", "NTK", "YaRN", "Llama-3"))
