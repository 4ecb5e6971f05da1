"""A seconds-long ITO training run as a subprocess, for checkpoint, export and
serving tests: fusion head on, 16 steps, a checkpoint every 4, metrics every
step. Every process is bounded in time and ended by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS, EVERY = 16, 4
TIMEOUT = 300  # seconds for any one process (a loaded 2-core machine compiles slowly)
TIMING_KEYS = ("examples_per_sec", "steps_per_sec")  # the only fields that may differ between runs

OVERRIDES = dict(
    total_steps=TOTAL_STEPS, log_every_steps=1, eval_every_steps=1000,
    checkpoint_every_steps=EVERY, keep_checkpoints=2, batch_size=16,
    **{"optim.warmup_steps": 2, "model.embed_dim": 32,
       "model.image.width": 32, "model.image.depth": 1, "model.image.num_heads": 2,
       "model.text.width": 32, "model.text.depth": 1, "model.text.num_heads": 2,
       "model.text.vocab_size": 256, "model.fusion.width": 32, "model.fusion.num_heads": 2,
       "data.num_train": 256, "data.num_eval": 64, "eval.batch_size": 64})


def config(data_dir: str, **extra):
  """The same config in-process (for abstract models and restores); `extra`
  overrides more fields, by dotted name as train_args takes them."""
  from configs import ito_tiny_cpu
  c = ito_tiny_cpu.get_config()
  for key, value in {**OVERRIDES, "data.data_dir": data_dir, **extra}.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def train_args(workdir: str, data_dir: str, **extra) -> list[str]:
  flags = {**OVERRIDES, "data.data_dir": data_dir, **extra}
  return ["--config=configs/ito_tiny_cpu.py", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in flags.items())]


def env(cache_dir: str, devices: int = 1, **extra) -> dict:
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
           JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="2")
  e.update({k: str(v) for k, v in extra.items()})
  return e


def start(argv: list[str], env_: dict, log_path: str, harness: bool = False) -> subprocess.Popen:
  entry = [os.path.join(ROOT, "tests", "train_harness.py")] if harness else ["-m", "ito_jax.main"]
  with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
    return subprocess.Popen([sys.executable, *entry, *argv], cwd=ROOT, env=env_,
                            stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> int:
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise


def run(argv, env_, log_path, **kw) -> int:
  return finish(start(argv, env_, log_path, **kw))


def wait_until(proc: subprocess.Popen, predicate, what: str, timeout: float = TIMEOUT) -> None:
  """Polls `predicate` until true; fails if the process exits or time runs out."""
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process exited ({proc.returncode}) before {what}")
    if time.monotonic() > deadline:
      proc.kill()
      proc.wait()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
  os.kill(proc.pid, sig)
  finish(proc, 60)


def records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in lines]


def logged_steps(workdir: str) -> list[int]:
  return [r["step"] for r in records(workdir) if "loss" in r]


def checkpoints(workdir: str) -> list[str]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(os.listdir(d)) if os.path.isdir(d) else []


def final_checkpoints(workdir: str) -> list[int]:
  return sorted(int(n) for n in checkpoints(workdir) if n.isdigit())


def resumed_from(log_path: str) -> int | None:
  with open(log_path) as f:
    for line in f:
      if "resuming from checkpoint step" in line:
        return int(line.split("resuming from checkpoint step")[1].split()[0])
  return None
