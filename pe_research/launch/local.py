r"""Rehearses a multi-host run on one machine: N JAX processes on CPU, talking over gloo.

  python -m pe_research.launch.local --num_processes=2 --devices_per_process=4 -- \
      --config=configs/tiny.py --workdir=/tmp/tiny_2proc

(``python pe_research/launch/local.py ...`` works too: it imports nothing from the package.)
Everything after ``--`` goes unchanged to ``python -m pe_research.main``, started in the folder
that holds ``pe_research``. Process ``i`` gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free
port>``, ``JAX_NUM_PROCESSES=N``, ``JAX_PROCESS_ID=i``, ``JAX_PLATFORMS=cpu`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=<devices_per_process>``, so ``main``
initialises ``jax.distributed`` with gloo CPU collectives and sees ``N * devices_per_process``
global devices; each process reads its own shard of every batch and Orbax writes checkpoints
through its multi-process path, exactly as on a pod. Output lines are prefixed ``[p<i>]``.

Exit code: 0 when every process exits 0; otherwise the first failure's code (``128 + signal``
for a process killed by a signal), after the other processes are stopped (SIGTERM, then SIGKILL
after ``--grace_s``). SIGTERM/SIGINT to the launcher is forwarded to every process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices: int, port: int) -> dict[str, str]:
  """The environment of process ``process_id``: the caller's, plus the distributed set-up."""
  env = dict(os.environ)
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env.update(
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    JAX_NUM_PROCESSES=str(num_processes),
    JAX_PROCESS_ID=str(process_id),
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=" ".join([*xla_flags, f"--xla_force_host_platform_device_count={devices}"]),
    PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])),
  )
  return env


def _relay(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
    out.flush()


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM to every live process, SIGKILL to those still alive after ``grace_s``."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(main_args: list[str], *, num_processes: int, devices_per_process: int, grace_s: float):
  """Runs ``python -m pe_research.main main_args`` in ``num_processes`` processes; exit code."""
  port = free_port()
  procs, relays = [], []
  for i in range(num_processes):
    p = subprocess.Popen(
      [sys.executable, "-u", "-m", "pe_research.main", *main_args],
      cwd=REPO,
      env=process_env(i, num_processes, devices_per_process, port),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      bufsize=1,
      start_new_session=True,  # A terminal Ctrl-C reaches only the launcher, which forwards it.
    )
    procs.append(p)
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      relays.append(threading.Thread(target=_relay, args=(stream, f"[p{i}] ", out), daemon=True))
      relays[-1].start()

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while None in (returncodes := [p.poll() for p in procs]):  # Polls every process.
      if any(returncodes):
        break
      time.sleep(0.05)
    code = next((_exit_code(c) for c in returncodes if c), 0)
    if None in returncodes:
      print(
        f"pe_research.launch.local: a process exited with {code}; stopping the others",
        file=sys.stderr,
      )
      _stop(procs, grace_s)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for t in relays:
    t.join(timeout=5)
  return code


def main(argv: list[str]) -> int:
  split = argv.index("--") if "--" in argv else len(argv)
  own, main_args = argv[:split], argv[split + 1 :]
  parser = argparse.ArgumentParser(
    "python -m pe_research.launch.local", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--num_processes", type=int, default=2, help="JAX processes to start.")
  parser.add_argument("--devices_per_process", type=int, default=4, help="Fake CPU devices each.")
  parser.add_argument("--grace_s", type=float, default=10.0, help="SIGTERM-to-SIGKILL delay.")
  args = parser.parse_args(own)
  for name in ("num_processes", "devices_per_process"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} is invalid; allowed: an integer >= 1")
  if not main_args:
    parser.error("no pe_research.main arguments; allowed: -- --config=FILE --workdir=DIR ...")
  return launch(
    main_args,
    num_processes=args.num_processes,
    devices_per_process=args.devices_per_process,
    grace_s=args.grace_s,
  )


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
