"""Run a Python script in a subprocess with 8 fake CPU devices (XLA reads the device count when
its CPU backend starts, so it cannot change inside the test process)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_env(devices: int = 8) -> dict[str, str]:
  """The environment's ``XLA_FLAGS`` (the suite's, conftest.py) with ``devices`` CPU devices."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return {"XLA_FLAGS": flags.strip()}


def run(script: str, *args: str, devices: int = 8) -> str:
  """The script's standard output; fails the test with its standard error if it fails."""
  env = dict(os.environ, **xla_env(devices), PYTHONPATH=REPO)
  result = subprocess.run(
    [sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def run_json(script: str, *args: str) -> dict:
  """The JSON object the script prints on its last line."""
  return json.loads(run(script, *args).strip().splitlines()[-1])
