"""Train-step benchmark: compile time, median step time, examples/s, memory.

  python -m ito_jax.bench --config=configs/tiny_cpu.py
  python -m ito_jax.bench --config=configs/bench_s.py --steps=10
  python -m ito_jax.bench --config=configs/tiny_cpu.py --input_only   # the input pipeline

Uses random inputs of the config's shapes, so it measures the step alone. One
figure per line. With --input_only it times the input pipeline instead (the
config's data, built under --workdir) with 0, 1 and 2 worker processes, next to
the examples/s the step consumes.
"""

from __future__ import annotations

import copy
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
_INPUT_ONLY = flags.DEFINE_bool("input_only", False, "Time the input pipeline (see the module doc).")
_INPUT_WORKERS = flags.DEFINE_list("input_workers", ["0", "1", "2"], "input_only: worker counts.")
_INPUT_BATCHES = flags.DEFINE_integer("input_batches", 40, "input_only: timed batches per count.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ito_jax_bench",
                               "input_only: data set and tokenizer directory (reused).")


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
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)

  figures = {
      "compile_s": compile_s,
      "step_s_median": statistics.median(times),
      "examples_per_s": config.batch_size / statistics.median(times),
      "params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }
  memory = compiled.memory_analysis()
  if memory is not None:
    figures["compiled_temp_mib"] = memory.temp_size_in_bytes / 2**20
    figures["compiled_argument_mib"] = memory.argument_size_in_bytes / 2**20
  cost = compiled.cost_analysis()
  if cost and "flops" in cost:
    figures["xla_flops_per_step"] = cost["flops"]
    figures["achieved_tflops"] = cost["flops"] / statistics.median(times) / 1e12
  return figures


def benchmark_input(config: ml_collections.ConfigDict, workdir: str, num_workers: int,
                    batches: int = 40, warmup: int = 3) -> dict:
  """Times `batches` batches of the training pipeline with `num_workers`
  processes, after `warmup` untimed ones (worker start-up is reported apart)."""
  from ito_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(config)
  config.data.num_workers = num_workers
  data_dir, tokenizer = train.prepare_inputs(config, workdir)
  it = iter(pipeline.train_dataset(config, tokenizer, data_dir=data_dir))
  try:
    t0 = time.perf_counter()
    for _ in range(warmup):
      next(it)
    startup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - t0
  finally:
    it.close()
  examples = batches * config.batch_size
  return {"startup_s": startup_s, "examples_per_s": examples / seconds,
          "images_per_s": examples * config.loss.num_image_views / seconds}


def main_input_only(config: ml_collections.ConfigDict) -> None:
  step = benchmark_step(config, _STEPS.value, _WARMUP.value)
  views = config.loss.num_image_views
  print(f"train step consumes: {step['examples_per_s']:.0f} examples/s = "
        f"{step['examples_per_s'] * views:.0f} images/s ({views} view(s) each)")
  for workers in map(int, _INPUT_WORKERS.value):
    figures = benchmark_input(config, _WORKDIR.value, workers, _INPUT_BATCHES.value)
    print(f"input pipeline, {workers} workers: {figures['images_per_s']:.0f} images/s "
          f"({figures['examples_per_s']:.0f} examples/s, "
          f"{figures['examples_per_s'] / step['examples_per_s']:.2f}x the step; "
          f"first 3 batches {figures['startup_s']:.2f}s)")


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  config = _CONFIG.value
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  "
        f"batch: {config.batch_size}  image: {config.model.image.image_size}/"
        f"{config.model.image.patch_size}  loss: {config.loss.name}  dtype: {config.model.dtype}")
  if _INPUT_ONLY.value:
    return main_input_only(config)
  for name, value in benchmark_step(config, _STEPS.value, _WARMUP.value).items():
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
  app.run(main)
