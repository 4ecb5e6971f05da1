"""Validation of the `ot` and `partial` config sections (configs/ot_sections.py):
each invalid field is named, and the shipped partial config is valid."""

import numpy as np
import pytest

from configs import common, ot_partial_tiny_cpu
from ito_jax.data import partial, records


@pytest.mark.parametrize("field,value,match", [
    ("partial.aligned_fraction", 1.5, "config.partial.aligned_fraction: must lie in (0, 1)"),
    ("partial.unseen_classes", (3, 99), "config.partial.unseen_classes: must be class ids in [0, 30)"),
    ("partial.unseen_classes", (3, 3), "config.partial.unseen_classes: has repeated ids"),
    ("partial.unseen_classes", tuple(range(30)), "config.partial.unseen_classes: leaves no seen class"),
    ("partial.unaligned_batch_size", 0, "config.partial.unaligned_batch_size: must be a positive"),
    ("loss.ot_weight", -1.0, "config.loss.ot_weight: must be finite and >= 0"),
    ("loss.ot_weight", float("inf"), "config.loss.ot_weight: must be finite and >= 0, got inf"),
    ("loss.ot_plan_contrast_weight", float("inf"), "config.loss.ot_plan_contrast_weight: must be finite"),
    ("ot.start_step", -1, "config.ot.start_step: must be a non-negative integer"),
    ("ot.start_step", True, "config.ot.start_step: must be a non-negative integer"),
    ("ot.start_step", 300, "config.ot.start_step: 300 is not before total_steps = 300: R_ot would never run"),
    ("partial.unseen_classes", (-1,), "config.partial.unseen_classes: must be non-negative class ids"),
    ("ot.epsilon", 0.0, "config.ot.epsilon: must be a positive number"),
    ("ot.variant", "ring", "config.ot.variant: expected one of"),
    ("ot.weights", (1.0, 1.0, 1.0), "config.ot.weights: has 3 entries for 2 measures"),
    ("ot.barycenter_size", 1000, "config.ot.barycenter_size: 1000 exceeds the 256 points"),
    ("ot.min_points", 200, "config.ot.min_points: each R_ot measure gets 128 points per step "
                           "(partial.unaligned_batch_size), fewer than 200"),
    ("ot.marginal_tolerance", -1.0, "config.ot.marginal_tolerance: must be a positive number"),
    ("ot.stop_gradient", "images", "config.ot.stop_gradient: expected '', 'image' or 'text', got 'images'"),
])
def test_invalid_partial_and_ot_fields_name_the_field(field, value, match):
  c = ot_partial_tiny_cpu.get_config()
  section, _, name = field.rpartition(".")
  c[section][name] = value
  with pytest.raises(common.ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[")):
    common.validate(c)


def test_unseen_classes_of_a_converted_source_are_checked_against_its_labels():
  """Class ids past ito_shapes' 30 are valid for a converted source; the
  split checks them against the source's own labels instead."""
  c = ot_partial_tiny_cpu.get_config()
  c.data.sources = ("/converted/dir",)
  c.data.eval_source = "/converted/held_out"
  c.partial.unseen_classes = (40, 75)
  common.validate(c)  # no ito_shapes bound

  class Source:
    name = "converted"
    rows = [records.RawRecord(id=str(i), label=lab) for i, lab in enumerate([40, 3, 3, 7] * 25)]

    def __len__(self):
      return len(self.rows)

    def __getitem__(self, i):
      return self.rows[i]

  with pytest.raises(ValueError, match=r"config.partial.unseen_classes: \[75\] occur in no label of "
                                       r"source 'converted'"):
    partial.split_for(c, Source())
  c.partial.unseen_classes = (40,)
  split = partial.split_for(c, Source())
  labels = np.array([40, 3, 3, 7] * 25)
  assert not np.isin(labels[split.aligned], [40]).any()


def test_a_start_step_past_the_run_is_fine_without_r_ot():
  c = ot_partial_tiny_cpu.get_config()
  c.ot.start_step, c.loss.ot_weight = 300, 0.0  # the contrastive-only run of an ablation
  common.validate(c)


def test_partial_settings_need_partial_mode():
  c = ot_partial_tiny_cpu.get_config()
  c.partial.enabled = False
  with pytest.raises(common.ConfigError, match="config.partial.unseen_classes: is set but"):
    common.validate(c)
  c.partial.unseen_classes = ()
  c.ot.include_aligned = True
  with pytest.raises(common.ConfigError, match="config.ot.include_aligned: needs partial.enabled"):
    common.validate(c)
  c = ot_partial_tiny_cpu.get_config()
  c.partial.unaligned_batch_size = 100
  with pytest.raises(common.ConfigError, match="unaligned_batch_size: 100 is not divisible by the device count 8"):
    common.validate(c, num_devices=8)


@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_shipped_partial_config_is_valid(arg):
  c = ot_partial_tiny_cpu.get_config(arg)
  common.validate(c)
  assert c.is_locked and c.partial.enabled and c.loss.ot_weight > 0
