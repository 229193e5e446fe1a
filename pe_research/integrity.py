"""Integrity of checkpoints: a file of sizes and CRC32s per checkpoint, the newest intact
checkpoint of a workdir, and damaged newer ones moved aside.

``DIR/checkpoints/<step>/integrity.json`` maps every file of the checkpoint's items to
``[bytes, CRC32]``; it is written before Orbax renames a finished save into place, so a
checkpoint without it, or with a file of another size or checksum, is damaged (cut short,
truncated afterwards, deleted in part, or bit-flipped). Damaged checkpoints newer than the
newest intact one are moved to ``DIR/checkpoints_damaged/<step>``, never deleted.
"""

from __future__ import annotations

import json
import os
import zlib

from absl import logging

INTEGRITY_FILE = "integrity.json"
DAMAGED_DIR = "checkpoints_damaged"


class WorkdirError(ValueError):
  """The workdir cannot be used as it is: no intact checkpoint, not writable, or disk full."""


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def seal(step_dir: str) -> None:
  """Writes ``step_dir/integrity.json``: ``{relative path: [bytes, CRC32]}`` of every file of
  the items (Orbax's own top-level files are rewritten after the rename, and not needed)."""
  files = {}
  for root, _, names in os.walk(step_dir):
    for name in names if root != step_dir else ():
      path = os.path.join(root, name)
      files[os.path.relpath(path, step_dir)] = [os.path.getsize(path), _crc32(path)]
  with open(os.path.join(step_dir, INTEGRITY_FILE), "w") as f:
    json.dump(files, f)


def damage(step_dir: str) -> str | None:
  """``None`` if the checkpoint in ``step_dir`` is intact, else the first problem found."""
  try:
    with open(os.path.join(step_dir, INTEGRITY_FILE)) as f:
      files = dict(json.load(f))
  except (OSError, ValueError, TypeError):
    return f"{INTEGRITY_FILE} is missing or unreadable"
  for name, (size, crc) in sorted(files.items()):
    path = os.path.join(step_dir, name)
    if not os.path.isfile(path):
      return f"{name} is missing"
    if os.path.getsize(path) != size:
      return f"{name} has {os.path.getsize(path)} bytes, {size} were written"
    if _crc32(path) != crc:
      return f"{name} fails its CRC32 check"
  return None


def newest_intact(workdir: str) -> tuple[int | None, list[str]]:
  """``(step, damaged)``: the newest intact checkpoint (None if there is no checkpoint) and
  one description per newer, damaged checkpoint. Raises WorkdirError if none is intact."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  damaged = []
  for step in sorted((int(n) for n in names if n.isdigit()), reverse=True):
    problem = damage(os.path.join(directory, str(step)))
    if problem is None:
      return step, damaged
    damaged.append(f"step {step} ({problem})")
  if damaged:
    raise WorkdirError(
      f"{workdir}: no intact checkpoint: {'; '.join(damaged)}; allowed: restore the files, "
      "or --overwrite to start afresh (the old run is moved aside)"
    )
  return None, damaged


def unused_path(path: str) -> str:
  """``path``, or ``path.1``, ``path.2``, ... whichever does not exist yet."""
  candidate, n = path, 0
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}.{n}"
  return candidate


def quarantine(workdir: str) -> None:
  """Moves damaged checkpoints newer than the newest intact one to ``DIR/checkpoints_damaged``."""
  step, damaged = newest_intact(workdir)
  if not damaged:
    return
  for name in os.listdir(os.path.join(workdir, "checkpoints")):
    if name.isdigit() and int(name) > step:
      target = unused_path(os.path.join(workdir, DAMAGED_DIR, name))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(os.path.join(workdir, "checkpoints", name), target)
  logging.warning(
    "%s: damaged checkpoint %s, moved to %s/; resuming from step %d",
    *(workdir, "; ".join(damaged), os.path.join(workdir, DAMAGED_DIR), step),
  )
