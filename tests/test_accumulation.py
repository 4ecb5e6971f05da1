"""optim.accumulation_steps: the towers in microbatches, the gradient of the
whole batch (ito_jax/accumulation.py). The same on 8 sharded devices is
checked by tests/test_sharding.py::test_sharded_step_equals_single_device_step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from ito_jax import accumulation, objective, sharding, train
from ito_jax.bench import random_batch
from ito_jax.models.ito import ItoModel


def tiny_config(kind: str, steps: int = 1):
  c = common.base_config()
  c.batch_size = 16
  c.model.embed_dim = 16
  c.model.image.update(image_size=8, patch_size=4, width=16, depth=1, num_heads=2, mlp_ratio=2.0)
  c.model.text.update(vocab_size=64, context_length=8, width=16, depth=1, num_heads=2, mlp_ratio=2.0)
  c.model.fusion.update(width=16, depth=1, num_heads=2, mlp_ratio=2.0)
  c.optim.update(warmup_steps=0, accumulation_steps=steps)
  if kind == "sigmoid":
    c.loss.name = "sigmoid"
  elif kind == "patch_dropout":  # each image view keeps half its tokens, split with its images
    c.model.image.patch_dropout = 0.5
  elif kind == "scan_layers":  # nnx.scan over the blocks, inside the microbatch loop
    c.model.scan_layers = True
    c.model.image.depth = c.model.text.depth = 2
  elif kind == "ito":  # multiple alignment, ITM with mined negatives, anchor
    c.model.fusion.enabled = True
    c.loss.update(num_image_views=2, num_text_views=2, itm_weight=0.5, anchor_weight=0.5,
                  itm_negative_pool=4)
  elif kind == "ot":  # R_ot on unaligned batches, the aligned batch in the measures too
    c.partial.update(enabled=True, unaligned_batch_size=8)
    c.loss.ot_weight = 1.0
    c.ot.update(start_step=0, min_points=2, include_aligned=True)
  elif kind == "ot_images_fixed":  # the barycenter and the plan contrast, image pool held fixed
    c.partial.update(enabled=True, unaligned_batch_size=8)
    c.loss.update(ot_weight=1.0, ot_plan_contrast_weight=1.0)
    c.ot.update(start_step=0, min_points=2, variant="barycenter", stop_gradient="image")
  elif kind == "ot_two_views":  # K = 4 measures, two views of every unaligned sample
    c.partial.update(enabled=True, unaligned_batch_size=8, unaligned_views=2)
    c.loss.ot_weight = 1.0
    c.ot.update(start_step=0, min_points=2, gamma=1.0)
  elif kind == "ot_patch_dropout":  # the unaligned images keep half their tokens, split with them
    c.partial.update(enabled=True, unaligned_batch_size=8, unaligned_patch_dropout=True)
    c.model.image.patch_dropout = 0.5
    c.loss.ot_weight = 1.0
    c.ot.update(start_step=0, min_points=2)
  elif kind == "ito_image_locked":  # LiT: no gradient for the image tower, none through it
    c.model.fusion.enabled = True
    c.loss.update(itm_weight=0.5, anchor_weight=0.5, itm_negative_pool=4)
    c.optim.locked = ("image",)
  elif kind == "scan_image_locked":  # the locked tower's blocks under nnx.scan, microbatched
    c.model.scan_layers = True
    c.model.image.depth = c.model.text.depth = 2
    c.optim.locked = ("image",)
  elif kind == "remat_text_locked":  # the locked tower's blocks under nnx.remat, microbatched
    c.model.remat = "full"
    c.optim.locked = ("text",)
  elif kind == "ot_text_locked":  # the locked text tower's unaligned texts need no second pass
    c.partial.update(enabled=True, unaligned_batch_size=8)
    c.loss.ot_weight = 1.0
    c.ot.update(start_step=0, min_points=2)
    c.optim.locked = ("text",)
  elif kind == "ot_not_started":  # step 0 < ot.start_step: the unaligned batches are skipped
    c.partial.update(enabled=True, unaligned_batch_size=8)
    c.loss.ot_weight = 1.0
    c.ot.update(start_step=1, min_points=2)
  common.validate(c)
  return c


def model_state(config):
  with nnx.use_eager_sharding(False):
    return nnx.split(ItoModel(config.model, rngs=nnx.Rngs(0)))


def jitted_value_and_grad(config):
  """(accumulation.value_and_grad at step 0, jitted over (state, batch); the model's state)."""
  graphdef, state = model_state(config)
  fn = jax.jit(lambda s, b: accumulation.value_and_grad(nnx.merge(graphdef, s), b, config,
                                                        step=jnp.int32(0)))
  return fn, state


def loss_and_grads(config, batch):
  fn, state = jitted_value_and_grad(config)
  return fn(state, batch)


def largest_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def largest(tree) -> float:
  return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "scan_layers", "patch_dropout", "ito", "ot",
                                  "ot_images_fixed", "ot_two_views", "ot_patch_dropout",
                                  "ot_not_started", "ito_image_locked", "ot_text_locked",
                                  "scan_image_locked", "remat_text_locked"])
def test_microbatched_towers_give_the_whole_batch_gradient(kind):
  batch = jax.tree.map(jnp.asarray, random_batch(tiny_config(kind)))
  batch = objective.with_patch_dropout(batch, tiny_config(kind), 0)
  (loss, metrics), grads = loss_and_grads(tiny_config(kind), batch)
  (loss4, metrics4), grads4 = loss_and_grads(tiny_config(kind, steps=4), batch)
  assert jax.tree.structure(grads4) == jax.tree.structure(grads)
  scale = largest(grads)
  assert scale > 1.0  # a gradient worth comparing
  assert largest_diff(grads, grads4) <= 1e-5 * scale
  assert metrics4.keys() == metrics.keys()
  for k in metrics:
    assert abs(float(metrics4[k]) - float(metrics[k])) <= 1e-5 * max(1.0, abs(float(metrics[k]))), k
  assert abs(float(loss4) - float(loss)) <= 1e-5 * abs(float(loss))
  # Every parameter the objective trains gets its gradient through one of
  # the two paths (the towers' microbatch pass, or the loss on their outputs).
  nonzero = lambda g: {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(g)
                       if float(jnp.max(jnp.abs(x))) > 0}
  assert nonzero(grads4) == nonzero(grads)
  # A locked tower is not differentiated at all: it has no gradient leaves.
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads)}
  locked = tiny_config(kind).optim.locked
  for tower in ("image", "text"):
    for part in ("tower", "proj"):
      assert any(f"'{tower}_{part}'" in n for n in names) == (tower not in locked), (tower, part)


def test_the_gradient_is_not_the_mean_of_microbatch_losses():
  """What the comparison above can tell apart: four contrastive losses of 4
  samples each (3 negatives apiece, the plain accumulation of other
  trainers) differ from one loss of 16 by far more than its tolerance."""
  config = tiny_config("softmax")
  batch = jax.tree.map(jnp.asarray, random_batch(config))
  _, grads = loss_and_grads(config, batch)
  graphdef, state = model_state(config)

  def mean_of_microbatches(model):
    losses = [objective.compute_loss(model, {k: v[j::4] for k, v in batch.items()}, config)[0]
              for j in range(4)]
    return sum(losses) / 4

  naive = jax.jit(lambda s: nnx.grad(mean_of_microbatches)(nnx.merge(graphdef, s)))(state)
  assert largest_diff(grads, naive) > 100 * 1e-5 * largest(grads)


def test_train_steps_with_microbatches_follow_the_one_pass_steps():
  """Two optimizer steps through train.make_train_step on a one-device mesh."""
  finals = {}
  for steps in (1, 2):
    config = tiny_config("softmax", steps)
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    model, optimizer = train.create_model_and_optimizer(config, mesh)
    graphdef, state = nnx.split((model, optimizer))
    step = train.make_train_step(graphdef, sharding.state_shardings(state), mesh, config)
    losses = []
    for i in range(2):
      state, metrics = step(state, sharding.put_batch(random_batch(config, seed=i), mesh))
      losses.append(float(metrics["loss"]))
    nnx.update((model, optimizer), state)
    finals[steps] = (losses, nnx.state(model, nnx.Param))
  (losses1, params1), (losses2, params2) = finals[1], finals[2]
  np.testing.assert_allclose(losses2, losses1, rtol=1e-5)
  assert largest_diff(params1, params2) <= 1e-5  # updates are ~1e-3 (AdamW, lr 1e-3)


@pytest.mark.parametrize("value, devices, match", [
    (0, 1, "integer >= 1, got 0"),
    (True, 1, "integer >= 1, got True"),
    (-2, 1, "integer >= 1, got -2"),
    (3, 1, "multiple of 3 x 1 = 3"),  # 16 samples do not split into 3 microbatches
    (4, 8, "multiple of 4 x 8 = 32"),  # 4 samples a microbatch on 8 batch shards
])
def test_invalid_accumulation_steps_name_the_field(value, devices, match):
  config = tiny_config("softmax")
  config.optim.accumulation_steps = value
  config.mesh.data = devices
  with pytest.raises(common.ConfigError, match=r"config\.optim\.accumulation_steps: .*" + match):
    common.validate(config, num_devices=devices)


def test_unaligned_batches_must_split_into_the_microbatches():
  config = tiny_config("ot")  # 16 aligned samples split into 16 microbatches; 8 unaligned do not
  config.optim.accumulation_steps = 16
  with pytest.raises(common.ConfigError, match=r"config\.optim\.accumulation_steps: 16 microbatches "
                     r"of partial\.unaligned_batch_size 8 .*multiple of 16 x 1 = 16"):
    common.validate(config)


@pytest.mark.parametrize("kind", ["softmax", "ot"])
def test_microbatches_lower_the_compiled_step_memory(kind):
  """The compiled train step's temporary memory (a deterministic figure of
  the compiler, not a timing) at 4 microbatches against one pass, on a shape
  where the towers' activations dominate: the aligned batch's, or ("ot") the
  unaligned batches' that R_ot reads, four times as many samples."""
  temp = {}
  for steps in (1, 4):
    config = tiny_config(kind, steps)
    config.model.image.update(image_size=32, patch_size=4, width=64, depth=2)
    if kind == "ot":
      config.partial.unaligned_batch_size = 64
      config.ot.include_aligned = False
    else:
      config.batch_size = 64
    common.validate(config)
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    graphdef, state = train.abstract_model_and_optimizer(config, mesh)
    step = train.make_train_step(graphdef, sharding.state_shardings(state), mesh, config)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
            for k, v in random_batch(config).items()}
    temp[steps] = step.lower(state, spec).compile().memory_analysis().temp_size_in_bytes
  assert temp[4] < 0.5 * temp[1], temp


@pytest.mark.parametrize("accumulation, chunks", [(1, 4), (4, 1)])
def test_fusion_remat_chunks_set_the_heads_chunks_apart_from_accumulation(accumulation, chunks):
  """model.fusion.remat_chunks = C runs the head in C chunks whatever
  optim.accumulation_steps is: the same loss and gradient as the default (the
  head in A chunks), and C decides the head's share of the compiled step's
  temporary memory, on a shape where the head's activations dominate."""
  def config_for(remat_chunks):
    config = tiny_config("ito", accumulation)
    config.model.image.update(image_size=32, patch_size=4)  # 64 image tokens per pair
    config.model.fusion.update(width=64, depth=2, mlp_ratio=4.0, remat_chunks=remat_chunks)
    common.validate(config)
    return config

  assert objective.fusion_chunks(config_for(0)) == accumulation
  assert objective.fusion_chunks(config_for(chunks)) == chunks
  batch = jax.tree.map(jnp.asarray, random_batch(config_for(0)))
  (loss, metrics), grads = loss_and_grads(config_for(0), batch)
  (loss_c, metrics_c), grads_c = loss_and_grads(config_for(chunks), batch)
  assert largest_diff(grads, grads_c) <= 1e-5 * largest(grads)
  assert abs(float(loss_c) - float(loss)) <= 1e-5 * abs(float(loss))
  assert abs(float(metrics_c["loss/itm"]) - float(metrics["loss/itm"])) <= 1e-5

  temp = {}
  for remat_chunks in (1, 4):
    fn, state = jitted_value_and_grad(config_for(remat_chunks))
    temp[remat_chunks] = fn.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
  assert temp[4] < 0.75 * temp[1], temp


@pytest.mark.parametrize("value, match", [
    (-1, "integer >= 0 .*got -1"),
    (True, "integer >= 0 .*got True"),
    (3, "multiple of 3 x 1 = 3"),  # 16 samples do not split into 3 chunks
])
def test_invalid_fusion_remat_chunks_name_the_field(value, match):
  config = tiny_config("ito")
  config.model.fusion.remat_chunks = value
  with pytest.raises(common.ConfigError, match=r"config\.model\.fusion\.remat_chunks: .*" + match):
    common.validate(config)
