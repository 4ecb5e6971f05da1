"""Train-step benchmark: compile time, median step time, examples/s, memory.

  python -m ito_jax.bench --config=configs/tiny_cpu.py
  python -m ito_jax.bench --config=configs/bench_s.py --steps=10
  python -m ito_jax.bench --config=configs/tiny_cpu.py --host_devices=8   # simulated CPU devices
  python -m ito_jax.bench --config=configs/tiny_cpu.py --host_devices=8 --steps=0 \
      --config.batch_size=1024   # compile only: memory per device against global batch

Uses random inputs of the config's shapes, so it measures the step alone
(the input pipeline has its own figures). One figure per line.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from configs import common
from ito_jax import sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after compilation.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", 0, "Simulate this many CPU devices (XLA's host platform device count); "
    "0 keeps the platform's devices. The mesh is config.mesh over all of them.")


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  b, m, n = config.batch_size, config.loss.num_image_views, config.loss.num_text_views
  size, length = config.model.image.image_size, config.model.text.context_length
  tokens = rng.integers(3, config.model.text.vocab_size, size=(b, n, length), dtype=np.int32)
  tokens[..., length // 2:] = 0  # realistic padding
  tokens[..., length // 2 - 1] = 2  # EOS
  return {
      "images": rng.uniform(-1, 1, size=(b, m, size, size, 3)).astype(np.float32),
      "tokens": tokens,
      "labels": rng.integers(0, 10, size=(b,), dtype=np.int32),
  }


def benchmark_step(config: ml_collections.ConfigDict, steps: int = 10, warmup: int = 2) -> dict:
  """Compiles and times the train step; returns the figures as a dict."""
  common.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config)
  model, optimizer = train.create_model_and_optimizer(config, mesh)
  graphdef, state = nnx.split((model, optimizer))
  step_fn = train.make_train_step(graphdef, sharding.state_shardings(state), mesh, config)
  batch = sharding.put_batch(random_batch(config), mesh)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  figures = {"devices": jax.device_count(), "compile_s": compile_s}
  memory = compiled.memory_analysis()
  if memory is not None:  # per device
    figures["compiled_temp_mib"] = memory.temp_size_in_bytes / 2**20
    figures["compiled_argument_mib"] = memory.argument_size_in_bytes / 2**20
  if steps == 0:
    return figures
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)

  figures.update({
      "step_s_median": statistics.median(times),
      "examples_per_s": config.batch_size / statistics.median(times),
      "params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  })
  cost = compiled.cost_analysis()
  if cost and "flops" in cost:
    figures["xla_flops_per_step"] = cost["flops"]
    figures["achieved_tflops"] = cost["flops"] / statistics.median(times) / 1e12
  return figures


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  if _HOST_DEVICES.value:  # read when the backend starts, which is below
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_HOST_DEVICES.value}")
  config = _CONFIG.value
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  "
        f"batch: {config.batch_size}  image: {config.model.image.image_size}/"
        f"{config.model.image.patch_size}  loss: {config.loss.name}  dtype: {config.model.dtype}")
  for name, value in benchmark_step(config, _STEPS.value, _WARMUP.value).items():
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
  app.run(main)
