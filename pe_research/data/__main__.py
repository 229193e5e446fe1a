"""Command line: prepare a corpus, or show a few decoded examples and the split's size.

python -m pe_research.data prepare --dataset=pystdlib --data_dir=data/tfds
python -m pe_research.data prepare --dataset=local_text --local_dir=my_texts
python -m pe_research.data show --dataset=pystdlib --split=validation --n=2
python -m pe_research.data show --dataset=pystdlib --tokenizer=smollm2/tokenizer.json
python -m pe_research.data show --dataset=synthetic --task=addition --split=validation
python -m pe_research.data units --dataset=sotu --tokenizer=T.json --lengths=8192,16384 --count=8
  (the long-context windows of each length: one document or stated series each, long_windows)
"""

from __future__ import annotations

import argparse
import sys
import time

import ml_collections
import numpy as np

from pe_research.data import synthetic
from pe_research.data.documents import PackedStream, dataset_names, open_documents, prepare
from pe_research.data.long_windows import long_windows
from pe_research.data.tokenizer import ByteTokenizer, make_tokenizer


def _parse(argv) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m pe_research.data", description=__doc__)
  parser.add_argument("command", choices=("prepare", "show", "units"))
  parser.add_argument("--dataset", default="pystdlib", help=", ".join(dataset_names()))
  parser.add_argument("--data_dir", default="data/tfds")
  parser.add_argument("--local_dir", default="", help="text folder of local_text")
  parser.add_argument("--split", default="validation", choices=("train", "validation"))
  parser.add_argument("--tokenizer", default="bytes", help="'bytes' or a tokenizer.json path")
  parser.add_argument("--n", type=int, default=2, help="examples to show")
  parser.add_argument("--chars", type=int, default=400, help="characters shown per document")
  parser.add_argument("--task", default="copy", help=", ".join(synthetic.task_names()))
  parser.add_argument("--min_len", type=int, default=21, help="synthetic task lengths (low)")
  parser.add_argument("--max_len", type=int, default=80, help="synthetic task lengths (high)")
  parser.add_argument("--lengths", default="8192,16384", help="units: window lengths")
  parser.add_argument("--count", type=int, default=8, help="units: windows wanted per length")
  return parser.parse_args(argv)


def _show_synthetic(args, tokenizer: ByteTokenizer) -> None:
  rng = np.random.default_rng(0)
  for i in range(args.n):
    n = int(rng.integers(args.min_len, args.max_len + 1))
    example = synthetic.make_example(args.task, n, rng)
    seq = np.append(example["inputs"][:1], example["targets"])
    answer = seq[1:][example["weights"] > 0]
    print(f"--- {args.task} example {i}, task length {n}, {len(seq) - 1} positions ---")
    print(f"sequence: {tokenizer.decode(seq)}\nscored:   {tokenizer.decode(answer)}")
  sizes = [synthetic.sequence_length(args.task, n) for n in (args.min_len, args.max_len)]
  print(
    f"task {args.task}: lengths {args.min_len}..{args.max_len} -> {sizes[0]}..{sizes[1]} "
    "tokens per example (generated, unlimited)"
  )


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  data_cfg = ml_collections.ConfigDict(
    {
      "name": args.dataset,
      "data_dir": args.data_dir,
      "local_dir": args.local_dir,
      "auto_prepare": True,
      "task": args.task,
    }
  )
  try:
    if args.command == "prepare":
      start = time.perf_counter()
      path = prepare(data_cfg)
      print(
        f"{args.dataset} ready at {path or '(generated on the fly)'} "
        f"({time.perf_counter() - start:.1f}s)"
      )
      return 0
    if args.dataset == "synthetic":
      _show_synthetic(args, ByteTokenizer())
      return 0
    tokenizer = make_tokenizer(args.tokenizer)
    if args.command == "units":
      for length in (int(n) for n in args.lengths.split(",")):
        found = long_windows(data_cfg, tokenizer, length, args.count, args.split)
        print(f"{args.dataset} {args.split} length {length}: {found.available} units long enough")
        print(f"  chosen: {', '.join(found.units)}" + (f"\n  {found.note}" if found.note else ""))
      print(f"units: {found.rule}")
      return 0
    docs = open_documents(data_cfg, args.split, tokenizer)
    for k in range(min(args.n, len(docs))):
      text = tokenizer.decode(docs[k])
      print(f"--- document {k}: {docs.lengths[k]} tokens ---\n{text[: args.chars]}")
    print(
      f"{args.dataset} {args.split}: {len(docs)} documents, "
      f"{PackedStream(docs).num_tokens} tokens (documents joined with EOS)"
    )
    return 0
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
