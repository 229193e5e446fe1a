"""Safetensors weights written one tensor at a time, split into HF's shards.

  write_shards(out, shapes, tensors, dtype, max_shard_size) -> file names written

The shards are planned from the tensors' shapes before any data is written, so each file's
header (names, dtypes, shapes, byte offsets) comes first and the tensors are then streamed into
it in order: host memory holds one tensor. One shard is ``model.safetensors``; several are
``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json``
(``{"metadata": {"total_size"}, "weight_map": {name: file}}``), as ``save_pretrained`` writes.
A tensor larger than the shard size gets a shard of its own, as in transformers.

Safetensors layout: 8 bytes little-endian header length n, n bytes of JSON header (padded with
spaces to a multiple of 8), then the tensors' bytes at their ``data_offsets``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DTYPES = {
  "float32": ("F32", np.dtype(np.float32)),
  "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16)),
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_OLD_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def parse_size(text: str | int, field: str = "--max_shard_size") -> int:
  """Bytes of ``"5GB"``, ``"500MB"``, ``"2GiB"`` or an integer (decimal units as HF's)."""
  match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(text))
  unit = match and match.group(2).upper()
  if not match or unit not in _UNITS or int(match.group(1)) < 1:
    raise ValueError(f"{field}={text!r} is invalid; allowed: a size such as 5GB, 500MB or 2GiB")
  return int(match.group(1)) * _UNITS[unit]


def options(dtype: str, max_shard_size: str | int) -> tuple[str, np.dtype, int]:
  """``(safetensors dtype code, numpy dtype, shard bytes)``; one-line errors for bad values."""
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r} is invalid; allowed: {' or '.join(DTYPES)}")
  return (*DTYPES[dtype], parse_size(max_shard_size))


def plan(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
  """The tensor names of each shard, in order: a shard is closed when the next tensor would
  take it over ``max_bytes``."""
  shards: list[list[str]] = [[]]
  size = 0
  for name, shape in shapes.items():
    nbytes = math.prod(shape) * itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def _header(names: list[str], shapes: dict, code: str, itemsize: int) -> bytes:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name in names:
    end = offset + math.prod(shapes[name]) * itemsize
    header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, end]}
    offset = end
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return struct.pack("<Q", len(text)) + text


def write_shards(
  out: str,
  shapes: dict[str, tuple[int, ...]],
  tensors: Iterable[tuple[str, np.ndarray]],
  dtype: str = "float32",
  max_shard_size: str | int = "5GB",
) -> list[str]:
  """Writes ``tensors`` (``(name, array)`` in the order of ``shapes``) into ``out`` as
  ``dtype``; removes weights of an earlier export there first. Returns the files written."""
  code, np_dtype, max_bytes = options(dtype, max_shard_size)
  shards = plan(shapes, np_dtype.itemsize, max_bytes)
  for name in os.listdir(out):
    if _OLD_WEIGHTS.fullmatch(name):
      os.remove(os.path.join(out, name))
  files = (
    [WEIGHTS]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  stream = iter(tensors)
  for file, names in zip(files, shards, strict=True):
    with open(os.path.join(out, file), "wb") as f:
      f.write(_header(names, shapes, code, np_dtype.itemsize))
      for expected in names:
        name, x = next(stream)
        x = np.ascontiguousarray(x, np_dtype)
        if name != expected or x.shape != tuple(shapes[name]):
          raise RuntimeError(f"tensor {name} {list(x.shape)} came where {expected} was planned")
        f.write(x.reshape(-1).view(np.uint8))
  if len(files) > 1:
    total = sum(math.prod(s) for s in shapes.values()) * np_dtype.itemsize
    weight_map = {name: file for file, names in zip(files, shards, strict=True) for name in names}
    with open(os.path.join(out, WEIGHTS_INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files
