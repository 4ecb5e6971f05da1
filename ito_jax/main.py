"""Command-line entry point.

  python -m ito_jax.main --config=configs/tiny_cpu.py --workdir=DIR [--config.FIELD=VALUE ...]
  python -m ito_jax.main export --workdir=DIR   # encoder-only DIR/export from the latest checkpoint

Training resumes from DIR/checkpoints when it holds any; SIGTERM saves a
checkpoint and exits with status 0 (rerun the same command to continue).

Several processes (one per host) run the same command. Slurm srun steps, Open
MPI, JAX_COORDINATOR_ADDRESS and multi-host TPU environments that set
TPU_WORKER_HOSTNAMES are detected; a Cloud TPU VM slice started by hand needs
--distributed=on (launch/tpu_pod.sh passes it); a CPU cluster names its coordinator:

  python -m ito_jax.main --config=... --workdir=DIR \
      --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
"""

from __future__ import annotations

import os

import jax
from absl import app, flags
from ml_collections import config_flags

from ito_jax import cli, distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, tokenizer, metrics and checkpoints.")
flags.mark_flag_as_required("workdir")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process start-up: auto (when the explicit flags below or a Slurm srun step / "
    "Open MPI / JAX_COORDINATOR_ADDRESS / TPU_WORKER_HOSTNAMES environment say so; a Cloud "
    "TPU VM slice lists its workers only in its metadata server: pass on), on (always "
    "jax.distributed.initialize), off (single process).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator (CPU clusters).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (CPU clusters).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")

MODES = ("train", "export")


def format_table(metrics: dict) -> str:
  """The headline figures as a two-column table."""
  rows = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
  width = max(len(k) for k, _ in rows)
  lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
  lines += [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows]
  return "\n".join(lines)


def main(argv):
  mode = argv[1] if len(argv) > 1 else "train"
  if mode not in MODES or len(argv) > 2:
    raise app.UsageError(f"usage: python -m ito_jax.main [{'|'.join(MODES)}] --workdir=DIR; got {argv[1:]}")
  if mode == "export":
    from ito_jax import export

    print(f"Encoder-only export written to {export.export_checkpoint(_WORKDIR.value)}")
    return
  if _CONFIG.value is None:
    raise app.UsageError("--config is required for training")
  # Before anything touches a device: the device list depends on it.
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  from ito_jax import train

  metrics = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() != 0:
    return
  if metrics.get("preempted"):
    print(f"\nPreempted: checkpoint of step {metrics['step']} saved in "
          f"{os.path.join(_WORKDIR.value, 'checkpoints')}; rerun the same command to resume.")
    return
  config = _CONFIG.value
  held_out = (config.data.eval_source if config.data.eval_source
              else f"{config.eval.split} split")
  print(f"\nHeld-out evaluation ({held_out}), {os.path.join(_WORKDIR.value, 'eval.json')}:")
  print(format_table(metrics))


if __name__ == "__main__":
  cli.run(main)
