"""Process set-up (``pe_research.runtime``): worker processes get one XLA thread, and bf16 on a
CPU without bf16 dot instructions is named as slow."""

import pytest

from pe_research import runtime


def test_one_thread_per_process_leaves_a_worker_one_xla_thread(monkeypatch):
  """A process started after ``one_thread_per_process`` runs XLA on one thread: its CPU
  client's task pool ("XLAEigen") has one thread, not one per core."""
  import subprocess
  import sys

  monkeypatch.delenv("PJRT_NPROC", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  child = (
    "import glob, jax, jax.numpy as jnp\n"
    "jax.block_until_ready(jax.jit(lambda x: x @ x)(jnp.ones((256, 256))))\n"
    "names = [open(p).read().strip() for p in glob.glob('/proc/self/task/*/comm')]\n"
    "print(sum('XLAEigen' in n for n in names))\n"
  )
  count = lambda: int(subprocess.check_output([sys.executable, "-c", child], text=True).split()[-1])
  runtime.one_thread_per_process()
  assert count() == 1


@pytest.mark.parametrize(
  "dtype,platform,isa,warns",
  [
    ("bfloat16", "cpu", {"avx2", "fma"}, True),  # Zen 3: no bf16 dot instructions
    ("bfloat16", "cpu", {"avx2", "avx512f", "avx512_bf16"}, False),  # Zen 4
    ("bfloat16", "cpu", {"avx2", "amx_bf16"}, False),  # Sapphire Rapids
    ("float32", "cpu", {"avx2"}, False),
    ("bfloat16", "gpu", {"avx2"}, False),
    ("bfloat16", "cpu", set(), False),  # flags unknown: say nothing rather than guess
  ],
)
def test_bf16_on_a_cpu_without_bf16_dots_says_so(dtype, platform, isa, warns):
  message = runtime.slow_dtype_message(dtype, platform, frozenset(isa))
  assert (message is not None) == warns
  if warns:
    assert "model.compute_dtype='bfloat16'" in message and "\n" not in message


def test_cpu_isa_flags_reads_the_first_cores_flags(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nflags\t\t: fpu\n")
  assert runtime.cpu_isa_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
  assert runtime.cpu_isa_flags(str(tmp_path / "missing")) == frozenset()
