"""Stopping a training loop cleanly on SIGTERM or SIGINT (a preemption or Ctrl-C)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

import jax
from jax.experimental import multihost_utils


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[int], bool]]:
  """Yields ``should_stop(step)``: True once SIGTERM or SIGINT arrived, so the loop can save
  and exit cleanly (a second signal acts as usual). With several processes, JAX's preemption
  service (a SIGTERM to any process) chooses one step at which every process stops."""
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  received = []

  def on_signal(signum, frame) -> None:
    del frame
    received.append(signum)
    for sig, handler in previous.items():
      signal.signal(sig, handler)

  previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield lambda step: bool(received)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
