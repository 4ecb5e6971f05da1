"""Multi-process start-up. Call `initialize` before anything touches a JAX device.

* TPU pods and GPU clusters (Slurm, Open MPI, or a launcher that sets
  JAX_COORDINATOR_ADDRESS): `jax.distributed.initialize()` finds the
  coordinator, process count and id itself; mode 'auto' calls it when the
  environment variables show more than one process, mode 'on' always. A
  Cloud TPU VM slice lists its workers only in the metadata server, which
  'auto' does not query: launch/tpu_pod.sh passes 'on'. A Slurm batch script
  (sbatch, outside srun) is one process whatever SLURM_NTASKS says; only an
  srun step (SLURM_STEP_NODELIST set, as JAX's own Slurm detection needs) counts.
* CPU clusters (and anything else): pass the coordinator address, process
  count and this process's id explicitly; collectives between CPU processes
  go through gloo.

After start-up every process runs the same program on its own shard of the
data (`jax.process_index()`, `jax.process_count()`), global arrays are
assembled from process-local data (`ito_jax.sharding.put_batch`) and only
process 0 writes logs.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

MODES = ("auto", "on", "off")


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, "0"))
  except ValueError:
    return 0


def multi_process_environment() -> str | None:
  """The name of the launcher that started several processes, or None."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU (multi-host)"
  slurm_step = all(v in os.environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID",
                                              "SLURM_LOCALID"))
  if slurm_step and max(_int_env("SLURM_NTASKS"), _int_env("SLURM_STEP_NUM_TASKS")) > 1:
    return "Slurm"
  if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  return None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts the multi-process runtime when needed; returns whether it did.

  An explicit coordinator_address needs num_processes and process_id too,
  and starts the runtime in any mode but 'off'."""
  if mode not in MODES:
    raise ValueError(f"--distributed: expected one of {MODES}, got {mode!r}")
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together; got "
                     f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
  if mode == "off":
    return False
  if coordinator_address is not None:
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id must be in [0, --num_processes={num_processes}), got {process_id}")
    # CPU processes exchange collectives over gloo (the default in jax 0.10; set for older ones).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Given explicitly, JAX must not also detect a cluster: inside an srun step
    # it would restrict this process to GPU SLURM_LOCALID, while the launchers
    # run one process per host that drives all of its devices. To give each
    # process a subset, set JAX_LOCAL_DEVICE_IDS (JAX reads it either way).
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               cluster_detection_method="deactivate")
    return True
  launcher = multi_process_environment()
  if mode == "on" or launcher:
    try:
      jax.distributed.initialize()
    except ValueError as e:  # JAX found no cluster it knows in this environment
      raise ValueError(
          f"--distributed={mode}: {f'{launcher} shows several processes, but ' if launcher else ''}"
          f"jax.distributed could not find the coordinator, process count and id here ({e}). "
          "Pass --coordinator_address, --num_processes and --process_id, or --distributed=off "
          "for a single process") from e
    return True
  return False


def sum_over_processes(counts: dict[str, int]) -> dict[str, int]:
  """Adds up per-process integer counts by key; every process must call it at
  the same point. Keys may differ between processes (each names only the kinds
  it has seen), so the counts travel as JSON: one gather of their lengths,
  one of the padded bytes. A single process gets its own counts back."""
  if jax.process_count() == 1:
    return dict(counts)
  mine = np.frombuffer(json.dumps(counts, sort_keys=True).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([mine.size], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:mine.size] = mine
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # [processes, max length]
  total: dict[str, int] = {}
  for row, n in zip(gathered, lengths):
    for key, value in json.loads(row[:n].tobytes().decode()).items():
      total[key] = total.get(key, 0) + int(value)
  return dict(sorted(total.items()))
