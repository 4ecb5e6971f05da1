"""The benchmark command refuses flags it cannot use before compiling anything."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # each test starts python processes


@pytest.mark.parametrize("flags,message", [
    (["--steps=-1"], "--steps=-1: must be >= 0"),
    (["--steps=0", "--fusion_overhead"], "--steps=0 compiles only, but --fusion_overhead time steps"),
    (["--ot", "--ot_batch_sizes=256,x"], "--ot_batch_sizes=256,x: expected a comma-separated list"),
])
def test_bad_flags_fail_before_compiling(flags, message):
  out = subprocess.run([sys.executable, "-m", "ito_jax.bench", "--config=configs/tiny_cpu.py", *flags],
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
  assert "compile_s" not in out.stdout  # nothing was compiled
