"""One benchmark variant's training steps, timed in a process of its own, and the interleaved
rounds that compare variants (``benchmarks/benchmark.py``).

A variant is the project's compiled train step as ``pe_research.train`` runs it
(``train.steps_per_call`` steps per call) or the same model in PyTorch, eager or under
``torch.compile`` (``benchmarks/torch_reference.py``), running as many steps per call; or one
forward causal attention call at an evaluation shape, the project's blockwise attention or
PyTorch's ``scaled_dot_product_attention``. A trainer returns ``(timed call, info)``: info
records what the variant ran with (PyTorch's version, threads and AdamW implementation).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import os
import time

import numpy as np

import pe_research.encodings  # noqa: F401  (registers every encoding family: workers import this)
from benchmarks.bench_lib import random_batch, rss_gib
from pe_research import sharding, train


def _timed(step, steps: int = 1) -> tuple[float, float, float]:
  """``(wall seconds, CPU seconds of this process, loss)`` per step of ``step()``, a call that
  runs ``steps`` training steps."""
  wall, cpu = time.perf_counter(), time.process_time()
  loss = step()
  return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps, loss


def jax_trainer(config):
  """A timed closure over the project's compiled train step as ``pe_research.train`` runs it:
  ``train.steps_per_call`` steps per call (two warm-up calls)."""
  k = config.train.steps_per_call
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = train.make_optimizer(config.train)
  graphdef, state = train.create_train_state(config, mesh, tx)
  step_fn = train.jit_train_step(graphdef, tx, schedule, state, mesh, steps_per_call=k)
  batch = sharding.global_batches(
    [random_batch(config.train.seq_len, config.train.batch_size)] * k, mesh
  )
  box = [state]

  def call() -> float:
    box[0], metrics = step_fn(box[0], batch)
    return float(np.asarray(metrics["loss"]).reshape(-1)[-1])

  call()
  call()
  return lambda: _timed(call, k), {}


def torch_trainer(config, compile_model: bool = False):
  """The same model and step in PyTorch, float32, eager or ``torch.compile``-d (three warm-up
  steps), on one thread per usable core; a call runs ``train.steps_per_call`` steps, as the
  JAX one does."""
  import torch  # Here, not at the top: evaluation subprocesses must not pay torch's memory.

  from benchmarks.torch_reference import TorchTransformer, make_train_step

  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(threads)
  m = config.model
  model = TorchTransformer(
    vocab_size=m.vocab_size,
    model_dim=m.model_dim,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    pe=config.pe.name,
  )
  train_step, optimizer = make_train_step(
    torch.compile(model) if compile_model else model, config.train
  )
  b = random_batch(config.train.seq_len, config.train.batch_size)
  inputs, targets = torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long()
  weights = torch.from_numpy(b["weights"])
  step = lambda: train_step(inputs, targets, weights)
  for _ in range(3):  # PyTorch's first steps on new shapes are slow (and compile).
    step()
  k = config.train.steps_per_call
  info = {"torch": torch.__version__, "torch_threads": threads, "torch_optimizer": optimizer}
  return lambda: _timed(lambda: [step() for _ in range(k)][-1], k), info


def _attention_inputs(spec) -> tuple[np.ndarray, ...]:
  """q ``[1, L, H, E]``, k, v ``[1, L, G, E]``, float32, the same in every process."""
  length, heads, kv_heads, dim, _ = spec
  rng = np.random.default_rng(0)
  shapes = [(1, length, h, dim) for h in (heads, kv_heads, kv_heads)]
  return tuple(rng.standard_normal(shape, np.float32) for shape in shapes)


def jax_attention(spec):
  """Forward causal grouped-query attention as evaluation runs it: the project's blockwise
  attention (``spec`` = (L, H, G, E, block)), jit-compiled, one warm-up call. The "loss" slot
  carries ``out[0, L - 1, 0, 0]``, which the PyTorch variant must reproduce."""
  import jax
  import jax.numpy as jnp

  from pe_research.attention import attend

  block = spec[4]
  q, k, v = (jnp.asarray(x) for x in _attention_inputs(spec))
  pos_BxL = jnp.arange(spec[0])[None]
  fn = jax.jit(
    lambda q, k, v: attend(
      q, k, v, q_pos_BxL=pos_BxL, k_pos_BxL=pos_BxL, impl="blockwise", block_size=block
    )
  )
  call = lambda: float(fn(q, k, v)[0, -1, 0, 0])
  call()
  return lambda: _timed(call), {}


def torch_attention(spec):
  """The same call in PyTorch: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``
  on ``[1, H, L, E]`` (its fused CPU flash kernel), one thread per usable core."""
  import torch

  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(threads)
  q, k, v = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in _attention_inputs(spec))

  def call() -> float:
    with torch.inference_mode():
      out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
      )
    return float(out[0, 0, -1, 0])

  call()
  return lambda: _timed(call), {"torch": torch.__version__, "torch_threads": threads}


TRAINERS = {
  "jax": jax_trainer,
  "torch": torch_trainer,
  "torch_compile": functools.partial(torch_trainer, compile_model=True),
  "jax_attention": jax_attention,
  "torch_attention": torch_attention,
}


def _release_free_memory() -> None:
  """Hands the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
  nothing), so that a waiting variant process holds only its live memory."""
  with contextlib.suppress(AttributeError, OSError):
    ctypes.CDLL(None).malloc_trim(0)


def _variant_worker(conn, framework: str, config) -> None:
  """Child process: builds one trainer, then runs one timed call per request on ``conn``; at
  the end sends its peak RSS in GiB. Free memory is released after the build and after each
  call (untimed): eleven processes that each kept what compiling or a step left free needed
  more than the 24 GB here at d512x8."""
  try:
    step, info = TRAINERS[framework](config)
  except Exception as e:  # The parent names the variant; a traceback here would be lost.
    conn.send(f"{type(e).__name__}: {e}".splitlines()[0])
    return
  _release_free_memory()
  conn.send(("ready", info))
  while conn.recv():
    result = step()
    _release_free_memory()
    conn.send(result)
  conn.send(rss_gib())


class VariantProcess:
  """One variant's train step in its own process, as a training run has it.

  In one process holding every variant, the JAX steps ran 15-25% slower than in a process of
  their own (d512x8: 13.6 vs 11.0 s per step; not isolated further, the kernel's share of the
  CPU time was twice as large). Two runtimes in one process also slow each other down (on 2
  cores a small PyTorch step took 100x longer after a JAX step: the other's idle thread pool).
  Calling the object runs one call (a turn) and returns ``(wall s, CPU s, loss)`` per step."""

  def __init__(self, name: str, framework: str, config):
    context = multiprocessing.get_context("spawn")
    self.name, (self.conn, child) = name, context.Pipe()
    self.process = context.Process(target=_variant_worker, args=(child, framework, config))
    self.process.start()
    reply = self._receive()
    if not (isinstance(reply, tuple) and reply[0] == "ready"):
      self.process.join()
      raise RuntimeError(f"benchmark variant {name} failed to build: {reply}")
    self.info = reply[1]

  def _receive(self):
    try:
      return self.conn.recv()
    except EOFError:  # The child died: killed for memory, or crashed in native code.
      self.process.join()
      raise RuntimeError(
        f"benchmark variant {self.name}: its process exited (code {self.process.exitcode})"
      ) from None

  def __call__(self) -> tuple[float, float, float]:
    self.conn.send(True)
    return self._receive()

  def close(self) -> float:
    """Stops the process; its peak RSS in GiB (NaN if it had already exited)."""
    if not self.process.is_alive():
      return float("nan")
    self.conn.send(False)
    peak = self._receive()
    self.process.join()
    return peak


def time_rounds(steps: dict, rounds: int, probe=lambda: None) -> tuple[dict, list]:
  """Interleaved rounds: each variant runs one step per round; wall/CPU seconds and losses,
  and ``probe()`` (e.g. a matmul's GFLOP/s) once per round after the variants. Round ``r``
  starts at variant ``r`` (rotated order), so whatever a step leaves behind for the next one
  does not always land on the same variant."""
  out = {name: {"wall": [], "cpu": [], "loss": []} for name in steps}
  names, probes = list(steps), []
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      for key, value in zip(("wall", "cpu", "loss"), steps[name](), strict=True):
        out[name][key].append(value)
    probes.append(probe())
  return out, probes
