"""Train-step benchmark: compile time, median step time, examples/s, memory.

  python -m ito_jax.bench --config=configs/tiny_cpu.py
  python -m ito_jax.bench --config=configs/bench_s.py --steps=10
  python -m ito_jax.bench --config=configs/bench_s.py --ot   # + R_ot alone, both variants

Uses random inputs of the config's shapes, so it measures the step alone
(the input pipeline has its own figures). One figure per line.
"""

from __future__ import annotations

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
_OT = flags.DEFINE_bool("ot", False, "Also time R_ot's value and gradient (config.ot, loop and "
                        "barycenter) on two [n, embed_dim] measures per --ot_batch_sizes.")
_OT_BATCH_SIZES = flags.DEFINE_list("ot_batch_sizes", ["256", "1024"], "Global batches n for --ot.")


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  b, m, n = config.batch_size, config.loss.num_image_views, config.loss.num_text_views
  size, length = config.model.image.image_size, config.model.text.context_length
  tokens = rng.integers(3, config.model.text.vocab_size, size=(b, n, length), dtype=np.int32)
  tokens[..., length // 2:] = 0  # realistic padding
  tokens[..., length // 2 - 1] = 2  # EOS
  batch = {
      "images": rng.uniform(-1, 1, size=(b, m, size, size, 3)).astype(np.float32),
      "tokens": tokens,
      "labels": rng.integers(0, 10, size=(b,), dtype=np.int32),
  }
  if config.partial.enabled:  # the unaligned image and text batches R_ot reads
    u = config.partial.unaligned_batch_size
    batch["unaligned_images"] = rng.uniform(-1, 1, size=(u, size, size, 3)).astype(np.float32)
    batch["unaligned_tokens"] = tokens[rng.integers(0, b, size=u), 0]
  return batch


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


def benchmark_regularizer(config: ml_collections.ConfigDict, batch_size: int, variant: str,
                          steps: int = 10) -> float:
  """Median seconds of jit(value_and_grad(R_ot)) on K = 2 measures (image and
  text embeddings) of [batch_size, embed_dim] unit vectors: what the step adds."""
  from ito_jax.losses import ot  # pylint: disable=g-import-not-at-top

  cfg = common.ot_solver_config(config)
  cfg.variant = variant
  fn = ot.value_and_grad_fn(cfg)
  rng = np.random.default_rng(0)
  xs = []
  for _ in range(2):
    x = rng.normal(size=(batch_size, config.model.embed_dim))
    xs.append(jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), jnp.float32))
  jax.block_until_ready(fn(xs))  # compile
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(xs))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  config = _CONFIG.value
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  "
        f"batch: {config.batch_size}  image: {config.model.image.image_size}/"
        f"{config.model.image.patch_size}  loss: {config.loss.name}  dtype: {config.model.dtype}")
  figures = benchmark_step(config, _STEPS.value, _WARMUP.value)
  for name, value in figures.items():
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
  if _OT.value:
    o = config.ot
    print(f"R_ot: cost={o.cost} eps={o.epsilon} iterations={o.num_iterations} gamma={o.gamma} "
          f"barycenter_iterations={o.barycenter_iterations} dim={config.model.embed_dim}, "
          f"next to the step above (batch {config.batch_size})")
    for n in (int(v) for v in _OT_BATCH_SIZES.value):
      for variant in ("loop", "barycenter"):
        seconds = benchmark_regularizer(config, n, variant, max(_STEPS.value, 3))
        print(f"ot_{variant}_batch{n}_s: {seconds:.4g}  "
              f"({100 * seconds / figures['step_s_median']:.1f}% of the train step)")


if __name__ == "__main__":
  app.run(main)
