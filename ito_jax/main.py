"""Command-line entry point.

  python -m ito_jax.main --config=configs/tiny_cpu.py --workdir=DIR [--config.FIELD=VALUE ...]
  python -m ito_jax.main evaluate --workdir=DIR
  python -m ito_jax.main export --workdir=DIR   # encoder-only DIR/export from the latest checkpoint

Training resumes from DIR/checkpoints when it holds any; SIGTERM saves a
checkpoint and exits with status 0 (rerun the same command to continue).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, tokenizer, metrics and checkpoints.")
flags.mark_flag_as_required("workdir")

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
  from ito_jax import train

  metrics = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if metrics.get("preempted"):
    print(f"\nPreempted: checkpoint of step {metrics['step']} saved in "
          f"{os.path.join(_WORKDIR.value, 'checkpoints')}; rerun the same command to resume.")
    return
  print(f"\nHeld-out evaluation ({_CONFIG.value.eval.split} split), {os.path.join(_WORKDIR.value, 'eval.json')}:")
  print(format_table(metrics))


if __name__ == "__main__":
  app.run(main)
