"""Shared by the partially aligned tests: the shipped partial config at micro size."""

import jax
import jax.numpy as jnp
from flax import nnx

from configs import ot_partial_tiny_cpu

UNSEEN = (0, 6, 12)


def micro_config(**overrides):
  """The shipped partial config with towers small enough to compile in seconds."""
  c = ot_partial_tiny_cpu.get_config()
  c.model.embed_dim = 16
  c.model.image.update(image_size=16, patch_size=8, width=32, depth=1, num_heads=2)
  c.model.text.update(vocab_size=128, context_length=12, width=32, depth=1, num_heads=2)
  c.batch_size, c.partial.unaligned_batch_size = 8, 12
  c.ot.num_iterations = 20
  c.ot.start_step = 1
  c.eval.retrieval_gallery = 0  # the tests' held-out sets are a few dozen images
  c.partial.unseen_classes = UNSEEN
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


def data_config(data_dir, **overrides):
  """micro_config reading the `partial_data` fixture's built data set."""
  return micro_config(**{"data.data_dir": data_dir, "data.num_train": 300, "data.num_eval": 40,
                         "data.word_dropout": 0.0, "partial.aligned_fraction": 0.2,
                         "eval.batch_size": 40, **overrides})


def run_step(step_fn, state, batch):
  """One step from a copy of `state` (the step donates its input)."""
  return step_fn(jax.tree.map(jnp.copy, state), batch)


def params(state, prefix):
  """The model parameters (of a (model, optimizer) state) under `prefix`, e.g. "image_tower"."""
  flat = nnx.to_flat_state(state)
  return [v[...] for k, v in flat if k[0] == 0 and k[1] == prefix]  # (model, optimizer)[0]
