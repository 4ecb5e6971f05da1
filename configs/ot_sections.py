"""The `ot` and `partial` config sections: which `ot` fields the solver reads
(`ot_solver_config`), how many measures R_ot gets (`num_ot_measures`), and
their validation, which `common.validate` runs."""

from __future__ import annotations

import math

import ml_collections

from configs.validation import ConfigError, require
from ito_jax.losses import ot as ot_lib


# Fields of the `ot` section that the trainer reads; the rest go to the solver.
OT_TRAINER_FIELDS = ("start_step", "include_aligned", "debias", "stop_gradient")


def ot_solver_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `ot` section without the trainer's fields: what ito_jax.losses.ot reads."""
  return ml_collections.ConfigDict({k: v for k, v in c.ot.items() if k not in OT_TRAINER_FIELDS})


def num_ot_measures(c: ml_collections.ConfigDict) -> tuple[int, int]:
  """(K, total points) of R_ot's measures for this config."""
  if c.partial.enabled:
    per_measure = c.partial.unaligned_batch_size + (c.batch_size if c.ot.include_aligned else 0)
    return 2 * c.partial.unaligned_views, 2 * c.partial.unaligned_views * per_measure
  views = c.loss.num_image_views + c.loss.num_text_views
  return views, views * c.batch_size


def validate(c: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
  """The `ot` and `partial` fields (and the loss weights that use them);
  called by configs.validation.validate."""
  from ito_jax.data import synthetic  # lazy: the data layer is heavier than the config

  for field in ("ot_weight", "ot_plan_contrast_weight"):
    value = c.loss[field]
    require(0 <= value < math.inf, f"loss.{field}", f"must be finite and >= 0, got {value}")
  require(not c.loss.ot_plan_contrast_weight or c.partial.enabled, "loss.ot_plan_contrast_weight",
          "needs partial.enabled (it pairs the unaligned batches)")
  require(isinstance(c.ot.start_step, int) and not isinstance(c.ot.start_step, bool)
          and c.ot.start_step >= 0, "ot.start_step",
          f"must be a non-negative integer, got {c.ot.start_step!r}")
  require(not (c.loss.ot_weight or c.loss.ot_plan_contrast_weight)
          or c.ot.start_step == 0 or c.ot.start_step < c.total_steps, "ot.start_step",
          f"{c.ot.start_step} is not before total_steps = {c.total_steps}: R_ot would never run "
          "(set loss.ot_weight = 0 for a run without it)")
  for field in ("include_aligned", "debias"):
    require(isinstance(c.ot[field], bool), f"ot.{field}", f"must be True or False, got {c.ot[field]!r}")
  require(c.ot.stop_gradient in ("", "image", "text"), "ot.stop_gradient",
          f"expected '', 'image' or 'text', got {c.ot.stop_gradient!r}")
  p = c.partial
  require(isinstance(p.enabled, bool), "partial.enabled", f"must be True or False, got {p.enabled!r}")
  require(not c.ot.include_aligned or p.enabled, "ot.include_aligned", "needs partial.enabled")
  if p.enabled:
    require(0 < p.aligned_fraction < 1, "partial.aligned_fraction",
            f"must lie in (0, 1), got {p.aligned_fraction}")
    unseen = tuple(p.unseen_classes)
    require(all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in unseen),
            "partial.unseen_classes", f"must be non-negative class ids, got {unseen}")
    require(len(set(unseen)) == len(unseen), "partial.unseen_classes", f"has repeated ids: {unseen}")
    if not c.data.sources:  # ito_shapes; a converted source's labels are checked at the split
      num_classes = len(synthetic.CLASS_NAMES)
      require(all(k < num_classes for k in unseen), "partial.unseen_classes",
              f"must be class ids in [0, {num_classes}), got {unseen}")
      require(len(unseen) < num_classes, "partial.unseen_classes", "leaves no seen class")
    u = p.unaligned_batch_size
    require(isinstance(u, int) and u > 0, "partial.unaligned_batch_size",
            f"must be a positive integer, got {u!r}")
    for count, what in ((num_devices, "device"), (num_processes, "process")):
      require(u % count == 0, "partial.unaligned_batch_size",
              f"{u} is not divisible by the {what} count {count}")
    require(isinstance(p.unaligned_patch_dropout, bool), "partial.unaligned_patch_dropout",
            f"must be True or False, got {p.unaligned_patch_dropout!r}")
    require(not p.unaligned_patch_dropout or c.model.image.patch_dropout > 0,
            "partial.unaligned_patch_dropout", "is True but model.image.patch_dropout is 0")
    v = p.unaligned_views
    require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, "partial.unaligned_views",
            f"must be an integer >= 1, got {v!r}")
    for field, on in (("ot.include_aligned", c.ot.include_aligned),
                      ("loss.ot_plan_contrast_weight", c.loss.ot_plan_contrast_weight)):
      require(not on or v == 1, field, f"needs partial.unaligned_views == 1 (one image and one text "
              f"measure), got {v}")
  else:
    require(not p.unseen_classes, "partial.unseen_classes", "is set but partial.enabled is False")
    require(not p.unaligned_patch_dropout, "partial.unaligned_patch_dropout",
            "is True but partial.enabled is False")
  num_measures, total_points = num_ot_measures(c)
  try:
    ot_lib.validate_config(ot_solver_config(c), num_measures=num_measures, total_points=total_points)
  except ValueError as e:  # already "config.ot.FIELD: ..."
    raise ConfigError(str(e)) from None
  if c.loss.ot_weight or c.loss.ot_plan_contrast_weight:
    per_measure = total_points // num_measures
    require(per_measure >= c.ot.min_points, "ot.min_points",
            f"each R_ot measure gets {per_measure} points per step "
            f"({'partial.unaligned_batch_size' if p.enabled else 'batch_size'}), fewer than {c.ot.min_points}")
