"""Train-step benchmark: compile time, median step time, examples/s, memory.

  python -m ito_jax.bench --config=configs/tiny_cpu.py
  python -m ito_jax.bench --config=configs/bench_s.py --steps=10
  python -m ito_jax.bench --config=configs/bench_s.py --peak_tflops=1.0   # MFU against a given peak
  python -m ito_jax.bench --config=configs/clip_vit_b16.py --config.batch_size=8 --steps=0  # compile only
  python -m ito_jax.bench --config=configs/tiny_cpu.py --input_only   # the input pipeline
  python -m ito_jax.bench --config=configs/bench_s.py --ot   # + R_ot alone, both variants

Uses random inputs of the config's shapes, so it measures the step alone. One
figure per line. With --input_only it times the input pipeline instead (the
config's data, built under --workdir) with 0, 1 and 2 worker processes, next to
the examples/s the step consumes.
"""

from __future__ import annotations

import copy
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

from configs import common, ot_sections
from ito_jax import cli, flops, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after compilation.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", 0, "Simulate this many CPU devices (XLA's host platform device count); "
    "0 keeps the platform's devices. The mesh is config.mesh over all of them.")
_FUSION = flags.DEFINE_bool("fusion_overhead", False,
                            "Time the step with and without the ITO fusion head (M = N = 1).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak TFLOP/s for MFU; 0 looks the "
                           "device up in ito_jax.flops.PEAK_BF16_TFLOPS (no MFU on CPU without it).")
_OT = flags.DEFINE_bool("ot", False, "Also time R_ot's value and gradient (config.ot, loop and "
                        "barycenter) on two [n, embed_dim] measures per --ot_batch_sizes.")
_OT_BATCH_SIZES = flags.DEFINE_list("ot_batch_sizes", ["256", "1024"], "Global batches n for --ot.")
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
  batch = {
      "images": rng.uniform(-1, 1, size=(b, m, size, size, 3)).astype(np.float32),
      "tokens": tokens,
      "labels": rng.integers(0, 10, size=(b,), dtype=np.int32),
  }
  if config.partial.enabled:  # the unaligned image and text batches R_ot reads
    u, v = config.partial.unaligned_batch_size, config.partial.unaligned_views
    batch["unaligned_images"] = rng.uniform(-1, 1, size=(u, v, size, size, 3)).astype(np.float32)
    batch["unaligned_tokens"] = tokens[rng.integers(0, b, size=(u, v)), 0]  # [U, V, L]
  return batch


class CompiledStep:
  """A compiled train step with its state and a fixed batch, ready to time."""

  def __init__(self, config: ml_collections.ConfigDict):
    common.validate(config, jax.device_count(), jax.process_count(), jax.default_backend(),
                    evaluates=False)
    if config.ot.start_step > 0:
      # The state starts at step 0, where R_ot has not started (a lax.cond skips
      # it before ot.start_step); time the step that most of a run takes.
      config = copy.deepcopy(config)
      config.ot.start_step = 0
    self.config = config
    mesh = sharding.make_mesh(config)
    model, optimizer = train.create_model_and_optimizer(config, mesh)
    graphdef, self.state = nnx.split((model, optimizer))
    step_fn = train.make_train_step(graphdef, sharding.state_shardings(self.state), mesh, config)
    self.batch = sharding.put_batch(random_batch(config), mesh)
    self.params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    t0 = time.perf_counter()
    self.compiled = step_fn.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0

  def run(self, steps: int) -> list[float]:
    """Runs `steps` steps, returning each one's wall time."""
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    return times


def benchmark_step(config: ml_collections.ConfigDict, steps: int = 10, warmup: int = 2,
                   peak_tflops: float = 0.0) -> dict:
  """Compiles and times the train step; returns the figures as a dict.
  steps=0 compiles only (compile time, compiled memory and FLOPs)."""
  step = CompiledStep(config)
  figures = {"devices": jax.device_count(), **compile_figures(config, step)}
  if steps == 0:
    return figures
  step.run(warmup)
  median = statistics.median(step.run(steps))
  figures.update({
      "step_s_median": median,
      "examples_per_s": config.batch_size / median,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  })
  cost = step.compiled.cost_analysis()
  xla_flops = cost["flops"] if cost and "flops" in cost else None
  device = jax.devices()[0]
  figures.update(flops.mfu_figures(config, median, device.device_kind, jax.device_count(),
                                   xla_flops, peak_tflops or None, device.platform))
  return figures


def compile_figures(config: ml_collections.ConfigDict, step: CompiledStep) -> dict:
  """Figures of a compiled step that need no run: compile time, memory, FLOPs."""
  figures = {"compile_s": step.compile_s, "params": step.params,
             "model_flops_per_example": flops.train_flops_per_example(config)}
  memory = step.compiled.memory_analysis()
  if memory is not None:  # per device
    figures["compiled_temp_mib"] = memory.temp_size_in_bytes / 2**20
    figures["compiled_argument_mib"] = memory.argument_size_in_bytes / 2**20
  cost = step.compiled.cost_analysis()
  if cost and "flops" in cost:
    # cost_analysis describes one device's program.
    figures["xla_flops_per_example"] = cost["flops"] * jax.device_count() / config.batch_size
    if note := flops.xla_flops_note(config, jax.devices()[0].platform):
      figures["xla_flops_note"] = note
  figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return figures


def fusion_overhead(config: ml_collections.ConfigDict, steps: int, rounds: int = 5) -> dict:
  """Step time with the fusion head and its two losses vs without, same towers,
  M = N = 1. The two steps alternate over `rounds` so machine noise hits both."""
  plain = ml_collections.ConfigDict(config.to_dict())
  plain.model.fusion.enabled = False
  plain.loss.update(num_image_views=1, num_text_views=1, itm_weight=0.0, anchor_weight=0.0)
  fused = ml_collections.ConfigDict(plain.to_dict())
  fused.model.fusion.enabled = True
  fused.loss.update(itm_weight=1.0, anchor_weight=1.0)
  a, b = CompiledStep(plain), CompiledStep(fused)
  a.run(2), b.run(2)
  times_a, times_b = [], []
  for _ in range(rounds):
    times_a += a.run(steps)
    times_b += b.run(steps)
  ta, tb = statistics.median(times_a), statistics.median(times_b)
  return {"step_s_without_fusion": ta, "step_s_with_fusion": tb,
          "fusion_overhead_pct": 100 * (tb / ta - 1),
          "params_without_fusion": a.params, "params_with_fusion": b.params}


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


def benchmark_regularizer(config: ml_collections.ConfigDict, batch_size: int, variant: str,
                          steps: int = 10) -> float:
  """Median seconds of jit(value_and_grad(R_ot)) on K = 2 measures (image and
  text embeddings) of [batch_size, embed_dim] unit vectors: what the step adds."""
  from ito_jax.losses import ot  # pylint: disable=g-import-not-at-top

  cfg = ot_sections.ot_solver_config(config)
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


def _int_list(flag, minimum: int) -> list[int]:
  try:
    values = [int(v) for v in flag.value]
  except ValueError:
    values = []
  if not values or min(values) < minimum:
    raise app.UsageError(f"--{flag.name}={','.join(flag.value)}: expected a comma-separated "
                         f"list of integers >= {minimum}")
  return values


def check_flags() -> None:
  """Refuses flag values the benchmark cannot use, before anything compiles
  (a negative --steps used to compile the step and then fail computing the
  median of no times)."""
  for flag, minimum in ((_STEPS, 0), (_WARMUP, 0), (_HOST_DEVICES, 0), (_INPUT_BATCHES, 1)):
    if flag.value < minimum:
      raise app.UsageError(f"--{flag.name}={flag.value}: must be >= {minimum}")
  if _PEAK.value < 0:
    raise app.UsageError(f"--peak_tflops={_PEAK.value}: must be >= 0 (0 looks the device up)")
  if _STEPS.value == 0:
    timed = [f"--{f.name}" for f in (_FUSION, _INPUT_ONLY, _OT) if f.value]
    if timed:
      raise app.UsageError(f"--steps=0 compiles only, but {' and '.join(timed)} time steps: "
                           "give --steps >= 1")
  if _OT.value:
    _int_list(_OT_BATCH_SIZES, 1)
  if _INPUT_ONLY.value:
    _int_list(_INPUT_WORKERS, 0)


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  check_flags()
  if _HOST_DEVICES.value:  # read when the backend starts, which is below
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_HOST_DEVICES.value}")
  config = _CONFIG.value
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  "
        f"batch: {config.batch_size}  image: {config.model.image.image_size}/"
        f"{config.model.image.patch_size}  loss: {config.loss.name}  dtype: {config.model.dtype}")
  if _INPUT_ONLY.value:
    return main_input_only(config)
  if _FUSION.value:
    figures = fusion_overhead(config, _STEPS.value)
  else:
    figures = benchmark_step(config, _STEPS.value, _WARMUP.value, _PEAK.value)
  for name, value in figures.items():
    print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
  if _OT.value and "step_s_median" in figures:
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
  cli.run(main)
