"""Invalid settings fail before anything is built or compiled, naming the field."""

import os
import re

import pytest

from configs import (bench_s, clip_vit_b16, common, ito_tiny_cpu, ito_vit_b16, ot_partial_tiny_cpu,
                     siglip_vit_b16, tiny_cpu)
from ito_jax import train


def tiny():
  return tiny_cpu.get_config("runlocal")


@pytest.mark.parametrize("field,value,match", [
    ("loss.name", "hinge", "config.loss.name: unknown loss 'hinge'"),
    ("total_steps", -5, "config.total_steps: must be a non-negative integer"),
    ("batch_size", 0, "config.batch_size: must be a positive integer"),
    ("model.image.num_heads", 5, "config.model.image.width: 128 is not divisible by num_heads 5"),
    ("model.text.num_heads", 3, "config.model.text.width: 128 is not divisible by num_heads 3"),
    ("model.image.patch_size", 5, "config.model.image.patch_size: 5 does not divide image_size 32"),
    ("model.image.depth", 0, "config.model.image.depth: must be a positive integer"),
    ("model.dtype", "float8", "config.model.dtype"),
    ("model.image.eval_resize", "crop", "config.model.image.eval_resize: expected one of squash|center_crop"),
    ("loss.num_image_views", 0, "config.loss.num_image_views"),
    ("loss.itm_weight", 1.0, "config.loss.itm_weight: is non-zero but model.fusion.enabled is False"),
    ("optim.learning_rate", -1.0, "config.optim.learning_rate"),
    ("optim.end_learning_rate_factor", -0.5, "config.optim.end_learning_rate_factor: must be in [0, 1]"),
    ("optim.b1", 1.5, "config.optim.b1: must be in [0, 1)"),
    ("optim.b2", 1.0, "config.optim.b2: must be in [0, 1)"),
    ("optim.eps", -1.0, "config.optim.eps: must be positive"),
    ("data.word_dropout", 1.5, "config.data.word_dropout: must be in [0, 1)"),
    ("eval.batch_size", 0, "config.eval.batch_size: must be a positive integer"),
    ("eval.templates", ("no placeholder",), "config.eval.templates: 'no placeholder' has no '{}' for the class name"),
    ("eval.templates", ("a {} of a {}.",), "config.eval.templates: 'a {} of a {}.' takes one '{}' for the class "
                                           "name and no other field (IndexError"),
    ("eval.templates", ("a {} {x}.",), "config.eval.templates: 'a {} {x}.' takes one '{}' for the class name "
                                       "and no other field (KeyError: 'x')"),
    ("eval.templates", (), "config.eval.templates: need at least one template"),
    ("eval.embeddings_limit", -1, "config.eval.embeddings_limit: must be a non-negative integer"),
    ("checkpoint_every_steps", 0, "config.checkpoint_every_steps: must be a positive integer"),
    ("keep_checkpoints", 0, "config.keep_checkpoints: must be a positive integer"),
    ("data.crop_scale", (0.0, 1.0), "config.data.crop_scale: must satisfy 0 < min <= max <= 1"),
    ("data.crop_scale", (0.8, 0.5), "config.data.crop_scale: must satisfy 0 < min <= max <= 1"),
    ("data.crop_scale", (0.5, 1.5), "config.data.crop_scale: must satisfy 0 < min <= max <= 1"),
    ("data.crop_scale", (0.5,), "config.data.crop_scale: must be (min, max), got (0.5,)"),
    ("data.crop_scale", (0.5, 0.6, 0.7), "config.data.crop_scale: must be (min, max), got (0.5, 0.6, 0.7)"),
    ("optim.weight_decay", -0.1, "config.optim.weight_decay: must be >= 0"),
    ("data.sources", ("",), "config.data.sources[0]: expected 'DIR' or ('DIR', weight > 0)"),
    ("data.sources", ("/a", ("/b", 0.0)), "config.data.sources[1]: expected 'DIR' or ('DIR', weight > 0)"),
    ("data.sources", (("/a", 1.0, 2.0),), "config.data.sources[0]: expected 'DIR' or ('DIR', weight > 0)"),
    ("data.num_workers", -1, "config.data.num_workers: must be >= 0"),
    ("model.temperature_init", 0.0, "config.model.temperature_init: must be finite and positive"),
    ("model.temperature_init", float("inf"), "config.model.temperature_init: must be finite and positive"),
    ("model.bias_init", float("nan"), "config.model.bias_init: must be finite, got nan"),
    ("optim.learning_rate", float("inf"), "config.optim.learning_rate: must be finite and positive"),
    ("loss.anchor_pull_weight", float("inf"), "config.loss.anchor_pull_weight: must be finite and >= 0"),
    ("loss.itm_weight", float("inf"), "config.loss.itm_weight: must be finite and >= 0"),
    ("model.attention", "cudnn", "config.model.attention: 'cudnn' needs model.dtype = 'bfloat16'"),
    ("model.embed_dim", 0, "config.model.embed_dim: must be positive"),
    ("model.text.vocab_size", 15, "config.model.text.vocab_size: must be >= 16"),
    ("model.text.context_length", 1, "config.model.text.context_length: must be >= 2"),
    ("model.remat", "some", "config.model.remat: expected none|full|dots"),
    ("model.attention", "flash", "config.model.attention: expected xla|cudnn|einsum"),
    ("loss.sharded", None, "config.loss.sharded: must be a bool"),
    ("data.eval_source", None, "config.data.eval_source: must be a path string"),
    ("eval.split", "train", "config.eval.split: expected validation|test"),
    ("eval.retrieval_gallery", -1, "config.eval.retrieval_gallery: must be a non-negative integer"),
    ("optim.locked", ("vision",), "config.optim.locked: must name each of ('image', 'text') at most once"),
    ("optim.locked", ("text", "text"), "config.optim.locked: must name each of ('image', 'text') at most once"),
    ("init_from", None, "config.init_from: must be an export directory"),
])
def test_invalid_field_fails_before_anything_is_built(tmp_path, field, value, match):
  config = tiny()
  section, _, name = field.rpartition(".")
  target = config
  for part in filter(None, section.split(".")):
    target = target[part]
  target[name] = value
  with pytest.raises(common.ConfigError, match=re.escape(match)):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w"), "nothing may be written before validation"


def test_batch_not_divisible_by_device_count():
  config = tiny()
  config.batch_size = 100
  with pytest.raises(common.ConfigError, match="config.batch_size: 100 is not divisible by the 8 batch shards"):
    common.validate(config, num_devices=8)


def test_unknown_field_names_the_field():
  config = tiny()
  with pytest.raises(AttributeError, match="lerning_rate"):
    config.optim.lerning_rate = 1.0


@pytest.mark.parametrize("module", [tiny_cpu, clip_vit_b16, siglip_vit_b16, bench_s])
def test_shipped_configs_are_valid(module):
  config = module.get_config()
  common.validate(config, num_devices=1)
  assert config.is_locked


ALL_CONFIGS = [tiny_cpu, ito_tiny_cpu, ot_partial_tiny_cpu, clip_vit_b16, ito_vit_b16,
               siglip_vit_b16, bench_s]


@pytest.mark.parametrize("module", ALL_CONFIGS, ids=lambda m: m.__name__.split(".")[-1])
def test_unknown_config_arg_is_refused(module):
  """`--config=FILE:ARG` with an ARG the file does not read fails, naming the
  file and what it accepts, instead of silently training the full run."""
  name = module.__name__.split(".")[-1]
  accepted = "'runlocal'" if "tiny_cpu" in name else "takes no ':ARG'"
  with pytest.raises(ValueError, match=rf"configs/{name}\.py:runlocl: unknown config argument .*{accepted}"):
    module.get_config("runlocl")
  module.get_config()  # no ARG is always fine
  if "tiny_cpu" in name:
    assert module.get_config("runlocal").total_steps < module.get_config().total_steps


def test_named_sizes():
  config = common.base_config()
  common.vit(config, "L/14")
  assert (config.model.image.width, config.model.image.depth, config.model.image.patch_size) == (1024, 24, 14)
  with pytest.raises(ValueError, match="unknown ViT variant 'H/14'"):
    common.vit(config, "H/14")
  with pytest.raises(ValueError, match="unknown text size"):
    common.text(config, "XXL")


def test_cudnn_attention_is_refused_where_it_cannot_run():
  """The fused GPU kernel: not on another backend, and only with head dims
  that are multiples of 8 up to 128 (the tiny config's 128 / 4 = 32 is one)."""
  config = tiny()
  config.model.update(attention="cudnn", dtype="bfloat16")
  common.validate(config, backend="gpu")
  with pytest.raises(common.ConfigError, match="config.model.attention: 'cudnn' is the fused GPU "
                                               "kernel; this backend is 'cpu'"):
    common.validate(config, backend="cpu")
  config.model.image.update(width=96, num_heads=8)
  with pytest.raises(common.ConfigError, match="config.model.image.num_heads: gives a head dim of 12"):
    common.validate(config, backend="gpu")
