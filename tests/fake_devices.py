"""Run a Python script in a subprocess with 8 fake CPU devices (XLA reads the device count when
its CPU backend starts, so it cannot change inside the test process)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_env(devices: int = 8, flags: str | None = None) -> dict[str, str]:
  """``flags`` (default: the environment's ``XLA_FLAGS``, the suite's, conftest.py) with
  ``devices`` CPU devices."""
  flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
  return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def run(script: str, *args: str, devices: int = 8, flags: str | None = None) -> str:
  """The script's standard output; fails the test with its standard error if it fails."""
  env = dict(os.environ, **xla_env(devices, flags), PYTHONPATH=REPO)
  result = subprocess.run(
    [sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def run_json(script: str, *args: str, **kwargs) -> dict:
  """The JSON object the script prints on its last line (``kwargs``: :func:`run`'s)."""
  return json.loads(run(script, *args, **kwargs).strip().splitlines()[-1])
