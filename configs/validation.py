"""The checks every config passes before anything compiles: `validate`
raises ConfigError naming the first invalid field. `configs.common`
re-exports both, so `common.validate(config)` is the usual spelling."""

from __future__ import annotations

import math

import ml_collections

from ito_jax import sharding
from ito_jax.cli import UserError, template_problem
from ito_jax.data.augment import EVAL_RESIZE_MODES
from ito_jax.losses.sharded import SIGMOID_VARIANTS
from ito_jax.models import vit as vit_lib
from ito_jax.models.ito import TOWER_PARAMS

LOSSES = ("softmax", "sigmoid")
DTYPES = ("float32", "bfloat16")
TOWERS = tuple(TOWER_PARAMS)  # what optim.locked may name


class ConfigError(UserError, ValueError):
  """An invalid setting, named by its field."""


def require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def validate(c: ml_collections.ConfigDict, num_devices: int = 1, num_processes: int = 1,
             backend: str | None = None, evaluates: bool = True) -> None:
  """Raises ConfigError naming the first invalid field. Runs before compiling.
  `backend` (jax.default_backend()), when given, is checked against settings
  that need one: model.attention = 'cudnn' runs only on GPUs. `evaluates`:
  whether the caller runs the held-out evaluation (bench does not, so it
  takes data.sources without a data.eval_source)."""
  for field in ("total_steps", "seed"):
    require(isinstance(c[field], int) and c[field] >= 0, field,
            f"must be a non-negative integer, got {c[field]!r}")
  for field in ("log_every_steps", "eval_every_steps", "batch_size", "checkpoint_every_steps",
                "keep_checkpoints"):
    require(isinstance(c[field], int) and c[field] > 0, field,
            f"must be a positive integer, got {c[field]!r}")
  require(isinstance(c.data.seed, int) and c.data.seed >= 0, "data.seed",
          f"must be a non-negative integer, got {c.data.seed!r}")
  try:
    data, fsdp, tensor = sharding.mesh_shape(c, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for rule in c.logical_axis_rules:
    require(len(rule) == 2 and isinstance(rule[0], str), "logical_axis_rules",
            f"each rule is (logical_name, mesh_axes), got {rule!r}")
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    require(all(a is None or a in sharding.MESH_AXES for a in axes), "logical_axis_rules",
            f"rule {tuple(rule)!r} names a mesh axis outside {sharding.MESH_AXES}")
    require(rule[0] != "batch", "logical_axis_rules",
            f"rule {tuple(rule)!r}: the batch is always split over {sharding.BATCH_AXES} "
            "(config.mesh.data x config.mesh.fsdp); no rule sets it")
  batch_shards = data * fsdp
  require(c.batch_size % batch_shards == 0, "batch_size",
          f"{c.batch_size} is not divisible by the {batch_shards} batch shards "
          f"(config.mesh.data x config.mesh.fsdp = {data} x {fsdp} on {num_devices} devices)")
  require(c.batch_size % num_processes == 0, "batch_size",
          f"{c.batch_size} is not divisible by the process count {num_processes}")
  # Each process feeds its own rows of the batch, so every process must hold
  # whole batch shards; with fewer shards than processes (say data = fsdp = 1
  # and tensor across hosts) the global batch would silently be a fraction of
  # batch_size, different on every process.
  require(batch_shards % num_processes == 0, "mesh",
          f"the batch is split over config.mesh.data x config.mesh.fsdp = {data} x {fsdp} "
          f"= {batch_shards} shards, which the {num_processes} processes must divide (each "
          f"process reads its own part of the batch); put the axes across hosts on data or fsdp")
  require(c.loss.name in LOSSES, "loss.name", f"unknown loss {c.loss.name!r}; expected one of {LOSSES}")
  for field in ("num_image_views", "num_text_views"):
    require(isinstance(c.loss[field], int) and c.loss[field] >= 1, f"loss.{field}",
            f"must be an integer >= 1, got {c.loss[field]!r}")
  require(0 <= c.loss.anchor_pull_weight < math.inf, "loss.anchor_pull_weight",
          f"must be finite and >= 0, got {c.loss.anchor_pull_weight}")
  for field in ("itm_weight", "anchor_weight"):
    require(0 <= c.loss[field] < math.inf, f"loss.{field}", f"must be finite and >= 0, got {c.loss[field]}")
    require(c.loss[field] == 0 or c.model.fusion.enabled, f"loss.{field}",
            "is non-zero but model.fusion.enabled is False")
  require(isinstance(c.loss.sharded, bool), "loss.sharded", f"must be a bool, got {c.loss.sharded!r}")
  require(c.loss.sigmoid_variant in SIGMOID_VARIANTS, "loss.sigmoid_variant",
          f"expected one of {SIGMOID_VARIANTS}, got {c.loss.sigmoid_variant!r}")
  require(c.loss.sigmoid_variant != "ring" or c.loss.sharded, "loss.sigmoid_variant",
          "'ring' passes text chunks between batch shards and needs loss.sharded = True")
  pool = c.loss.itm_negative_pool
  shard_batch = c.batch_size // batch_shards if c.loss.sharded else c.batch_size
  require(isinstance(pool, int) and (pool == 0 or pool >= 2), "loss.itm_negative_pool",
          f"must be 0 (the whole batch shard) or an integer >= 2, got {pool!r}")
  if c.loss.itm_weight:
    require(shard_batch % (pool or shard_batch) == 0 and (pool or shard_batch) >= 2,
            "loss.itm_negative_pool",
            f"ITM negatives are mined within pools of {pool or shard_batch} samples, which must "
            f"be >= 2 and divide the {shard_batch} samples of each batch shard "
            f"(batch_size / (mesh.data x mesh.fsdp), with loss.sharded)")

  m = c.model
  require(m.dtype in DTYPES, "model.dtype", f"expected one of {DTYPES}, got {m.dtype!r}")
  require(m.param_dtype in DTYPES, "model.param_dtype", f"expected one of {DTYPES}, got {m.param_dtype!r}")
  require(m.remat in ("none", "full", "dots"), "model.remat", f"expected none|full|dots, got {m.remat!r}")
  require(m.attention in ("xla", "cudnn", "einsum"), "model.attention",
          f"expected xla|cudnn|einsum, got {m.attention!r}")
  # cuDNN's fused attention takes only 16-bit inputs, and head dims that are
  # multiples of 8 up to 128 (jax.nn.dot_product_attention's checks).
  require(m.attention != "cudnn" or m.dtype == "bfloat16", "model.attention",
          f"'cudnn' needs model.dtype = 'bfloat16', got {m.dtype!r}")
  require(m.attention != "cudnn" or backend in (None, "gpu", "cuda"), "model.attention",
          f"'cudnn' is the fused GPU kernel; this backend is {backend!r} (use einsum or xla)")
  require(isinstance(m.donate, bool), "model.donate", f"must be True or False, got {m.donate!r}")
  require(m.embed_dim > 0, "model.embed_dim", f"must be positive, got {m.embed_dim}")
  require(0 < m.temperature_init < math.inf, "model.temperature_init",
          f"must be finite and positive, got {m.temperature_init}")
  require(math.isfinite(m.bias_init), "model.bias_init", f"must be finite, got {m.bias_init}")
  towers = [("model.image", m.image), ("model.text", m.text)]
  if m.fusion.enabled:
    towers.append(("model.fusion", m.fusion))
  for name, t in towers:
    for field in ("width", "depth", "num_heads"):
      require(isinstance(t[field], int) and t[field] > 0, f"{name}.{field}",
              f"must be a positive integer, got {t[field]!r}")
    require(t.width % t.num_heads == 0, f"{name}.width",
            f"{t.width} is not divisible by num_heads {t.num_heads}")
    head_dim = t.width // t.num_heads
    require(m.attention != "cudnn" or (head_dim % 8 == 0 and head_dim <= 128), f"{name}.num_heads",
            f"gives a head dim of {head_dim}; model.attention = 'cudnn' needs a multiple of 8 up to 128")
    require(t.mlp_ratio > 0, f"{name}.mlp_ratio", f"must be positive, got {t.mlp_ratio}")
  require(m.image.patch_size > 0 and m.image.image_size % m.image.patch_size == 0,
          "model.image.patch_size",
          f"{m.image.patch_size} does not divide image_size {m.image.image_size}")
  rate = m.image.patch_dropout
  require(0 <= rate < 1, "model.image.patch_dropout", f"must be in [0, 1), got {rate}")
  require(vit_lib.kept_patches(m.image) >= 1, "model.image.patch_dropout",
          f"{rate} keeps no patch token of the {(m.image.image_size // m.image.patch_size) ** 2} "
          f"an image has")
  final = m.image.unmasked_final_steps
  require(isinstance(final, int) and 0 <= final <= c.total_steps,
          "model.image.unmasked_final_steps",
          f"must be an integer in [0, total_steps = {c.total_steps}], got {final!r}")
  require(final == 0 or rate > 0, "model.image.unmasked_final_steps",
          f"is {final} but model.image.patch_dropout is 0, so no step drops patches")
  require(m.image.eval_resize in EVAL_RESIZE_MODES, "model.image.eval_resize",
          f"expected one of {'|'.join(EVAL_RESIZE_MODES)}, got {m.image.eval_resize!r}")
  require(m.image.stem in vit_lib.STEMS, "model.image.stem",
          f"expected one of {'|'.join(vit_lib.STEMS)}, got {m.image.stem!r}")
  if m.image.stem == "conv":
    try:
      vit_lib.conv_stem_channels(m.image.patch_size, m.image.width)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
  require(m.text.vocab_size >= 16, "model.text.vocab_size", f"must be >= 16, got {m.text.vocab_size}")
  require(m.text.context_length >= 2, "model.text.context_length",
          f"must be >= 2, got {m.text.context_length}")

  o = c.optim
  require(0 < o.learning_rate < math.inf, "optim.learning_rate",
          f"must be finite and positive, got {o.learning_rate}")
  require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
  require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
  require(o.grad_clip_norm >= 0, "optim.grad_clip_norm", f"must be >= 0, got {o.grad_clip_norm}")
  require(0 <= o.end_learning_rate_factor <= 1, "optim.end_learning_rate_factor",
          f"must be in [0, 1] (below 0 the schedule ends in gradient ascent), got "
          f"{o.end_learning_rate_factor}")
  for field in ("b1", "b2"):
    require(0 <= o[field] < 1, f"optim.{field}", f"must be in [0, 1), got {o[field]}")
  require(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
  locked = o.locked
  require(isinstance(locked, (tuple, list)) and all(t in TOWERS for t in locked)
          and len(set(locked)) == len(locked), "optim.locked",
          f"must name each of {TOWERS} at most once, got {locked!r}")
  require(isinstance(c.init_from, str), "init_from",
          f"must be an export directory (a string; \"\" for none), got {c.init_from!r}")
  steps = o.accumulation_steps
  require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
          "optim.accumulation_steps", f"must be an integer >= 1, got {steps!r}")
  require(c.batch_size % (steps * batch_shards) == 0, "optim.accumulation_steps",
          f"{steps} microbatches of batch_size {c.batch_size} must each divide evenly over the "
          f"{batch_shards} batch shards (mesh.data x mesh.fsdp): batch_size must be a multiple "
          f"of {steps} x {batch_shards} = {steps * batch_shards}")
  chunks = m.fusion.remat_chunks
  require(isinstance(chunks, int) and not isinstance(chunks, bool) and chunks >= 0,
          "model.fusion.remat_chunks",
          f"must be an integer >= 0 (0: optim.accumulation_steps), got {chunks!r}")
  require(not m.fusion.enabled or c.batch_size % ((chunks or steps) * batch_shards) == 0,
          "model.fusion.remat_chunks",
          f"{chunks or steps} chunks of batch_size {c.batch_size} must each divide evenly over "
          f"the {batch_shards} batch shards (mesh.data x mesh.fsdp): batch_size must be a "
          f"multiple of {chunks or steps} x {batch_shards} = {(chunks or steps) * batch_shards}")

  d = c.data
  require(d.dataset == "ito_shapes", "data.dataset", f"unknown data set {d.dataset!r}")
  require(d.num_train > 0 and d.num_eval > 0, "data.num_train",
          "num_train and num_eval must be positive")
  require(isinstance(d.crop_scale, (tuple, list)) and len(d.crop_scale) == 2, "data.crop_scale",
          f"must be (min, max), got {d.crop_scale!r}")
  lo, hi = d.crop_scale
  require(0 < lo <= hi <= 1, "data.crop_scale", f"must satisfy 0 < min <= max <= 1, got {d.crop_scale}")
  require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
  require(0 <= d.word_dropout < 1, "data.word_dropout",
          f"must be in [0, 1) (the rate at which words are dropped), got {d.word_dropout}")
  for i, entry in enumerate(d.sources):
    ok = isinstance(entry, str) or (
        isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
        and isinstance(entry[1], (int, float)) and entry[1] > 0)
    require(ok and bool(entry if isinstance(entry, str) else entry[0]), f"data.sources[{i}]",
            f"expected 'DIR' or ('DIR', weight > 0), got {entry!r}")
  require(isinstance(d.eval_source, str), "data.eval_source", f"must be a path string, got {d.eval_source!r}")
  require(d.eval_source or not d.sources or not evaluates, "data.eval_source",
          "is empty while data.sources is set, so held-out evaluation would run on the synthetic "
          f"{d.dataset} set, not on your data; convert a held-out part of it "
          "(python -m ito_jax.data.convert) and set data.eval_source to that directory")
  require(0 <= d.max_bad_fraction < 1, "data.max_bad_fraction",
          f"must be in [0, 1) (a source of only bad records can never fill a batch), got {d.max_bad_fraction}")
  for field in ("bad_check_min_records", "max_image_pixels", "max_caption_chars"):
    require(isinstance(d[field], int) and d[field] > 0, f"data.{field}",
            f"must be a positive integer, got {d[field]!r}")
  from configs import ot_sections  # pylint: disable=g-import-not-at-top (it imports this module)
  ot_sections.validate(c, num_devices, num_processes)
  u = c.partial.unaligned_batch_size
  require(not (c.partial.enabled and (c.loss.ot_weight or c.loss.ot_plan_contrast_weight))
          or u % (steps * batch_shards) == 0, "optim.accumulation_steps",
          f"{steps} microbatches of partial.unaligned_batch_size {u} (R_ot's unaligned batches are "
          f"microbatched too) must each divide evenly over the {batch_shards} batch shards: "
          f"partial.unaligned_batch_size must be a multiple of {steps} x {batch_shards} = "
          f"{steps * batch_shards}")
  require(c.eval.split in ("validation", "test"), "eval.split", f"expected validation|test, got {c.eval.split!r}")
  require(isinstance(c.eval.batch_size, int) and c.eval.batch_size > 0, "eval.batch_size",
          f"must be a positive integer, got {c.eval.batch_size!r}")
  require(isinstance(c.eval.retrieval_gallery, int) and c.eval.retrieval_gallery >= 0,
          "eval.retrieval_gallery", f"must be a non-negative integer, got {c.eval.retrieval_gallery!r}")
  gallery = c.eval.retrieval_gallery
  require(not gallery or d.eval_source or d.num_eval % gallery == 0,
          "eval.retrieval_gallery", f"{gallery} does not divide data.num_eval = {d.num_eval} into equal galleries")
  require(isinstance(c.eval.embeddings_limit, int) and c.eval.embeddings_limit >= 0,
          "eval.embeddings_limit", f"must be a non-negative integer, got {c.eval.embeddings_limit!r}")
  require(len(c.eval.templates) > 0, "eval.templates", "need at least one template, with a '{}' for the class name")
  for template in c.eval.templates:
    problem = template_problem(template)
    require(problem is None, "eval.templates", problem)
