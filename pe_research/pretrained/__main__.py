r"""Import pretrained Llama-family checkpoints as runs, and export runs to HF folders.

  python -m pe_research.pretrained import --source=PATH --workdir=DIR
  python -m pe_research.pretrained export --workdir=DIR --out=HF_DIR \
      [--dtype=bfloat16] [--max_shard_size=5GB]

PATH is an HF model folder (config.json, model.safetensors or a sharded index, tokenizer.json)
or a .gguf file. DIR then evaluates like any run (``python -m pe_research.evaluate
--workdir=DIR``) and fine-tunes with ``--config.init_from=DIR``. Bad input exits 2 with one line.
"""

from __future__ import annotations

from absl import app, flags

from pe_research import cli
from pe_research.metrics import quiet_library_logging

_SOURCE = flags.DEFINE_string("source", None, "import: an HF model folder or a .gguf file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory written (import) or read.")
_OUT = flags.DEFINE_string("out", None, "export: the HF folder to write.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "export: weights as float32 or bfloat16.")
_MAX_SHARD_SIZE = flags.DEFINE_string(
  "max_shard_size", "5GB", "export: largest safetensors shard (5GB, 500MB, 2GiB; HF's units)."
)
COMMANDS = ("import", "export")


def _required(flag, command: str) -> str:
  if not flag.value:
    raise ValueError(f"{command} needs --{flag.name}")
  return flag.value


def main(argv: list[str]) -> None:
  quiet_library_logging()
  try:
    if len(argv) != 2 or argv[1] not in COMMANDS:
      raise ValueError(f"unexpected arguments {argv[1:]}; allowed: one of {', '.join(COMMANDS)}")
    from pe_research.pretrained import importer

    if argv[1] == "import":
      source, workdir = _required(_SOURCE, "import"), _required(_WORKDIR, "import")
      config = importer.import_checkpoint(source, workdir)
      m = config.model
      print(
        f"imported {source} -> {workdir}: {m.num_layers} layers, d={m.model_dim}, "
        f"{m.num_heads}/{m.num_kv_heads} heads, vocab {m.vocab_size}, L={config.train.seq_len}"
      )
    else:
      workdir, out = _required(_WORKDIR, "export"), _required(_OUT, "export")
      importer.export_run(workdir, out, dtype=_DTYPE.value, max_shard_size=_MAX_SHARD_SIZE.value)
      print(f"exported {workdir} -> {out} ({_DTYPE.value})")
  except ValueError as e:
    cli.exit_with_error(e)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
