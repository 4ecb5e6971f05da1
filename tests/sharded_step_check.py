"""Runs on 8 simulated CPU devices; prints one JSON object per check.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_step_check.py step [OBJECTIVE ...]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_step_check.py memory
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_step_check.py placement

A separate process because a process fixes its device count when JAX starts;
tests/test_sharding.py and tests/test_placement.py launch it and assert on
the figures.

step:   the train step on a (data, fsdp, tensor) mesh against the same step on
        one device, same initial parameters and batches: loss of each step and
        parameters after the last, for every mesh x objective, and on (2, 2, 2)
        with the towers in two microbatches (optim.accumulation_steps = 2);
        partial mode with R_ot only on (2, 2, 2) in two microbatches.
memory: the compiled per-device memory of the batch-level loss terms (value
        and gradient) at a global batch where a [B, B] float32 would dominate,
        and of a whole train step under fsdp against data parallelism; and the
        saturation metric from 8 shards against `gap.saturation` of the whole
        [B, B] logits (each shard's positives sit in its own columns).
placement: the collectives of the compiled patch-dropout draw on every mesh
        (each batch shard draws its own rows' subsets; nothing to exchange);
        held-out embeddings on every mesh against one device's, with the
        placement and per-device FLOPs of the embedding program.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from configs import common  # noqa: E402
from ito_jax import objective, sharding, train  # noqa: E402
from ito_jax.bench import random_batch  # noqa: E402
from ito_jax.evaluate import evaluator, gap  # noqa: E402
from ito_jax.losses import sharded  # noqa: E402

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
OBJECTIVES = {  # name -> (loss.name, sigmoid_variant, fusion)
    "softmax": ("softmax", "gather", False),
    "sigmoid_gather": ("sigmoid", "gather", False),
    "sigmoid_ring": ("sigmoid", "ring", False),
    "ito": ("softmax", "gather", True),
    # Partial mode: R_ot (loop) on unaligned batches of 32, checked only with
    # the towers in microbatches, which split the unaligned batches too.
    "ot_partial": ("softmax", "gather", False),
}
STEPS = 2


def tiny_config(objective: str, mesh_shape=(1, 1, 1), accumulation_steps=1):
  """Every sharded dimension divisible by 4 (fsdp) and 2 (tensor)."""
  name, variant, fusion = OBJECTIVES[objective]
  c = common.base_config()
  c.batch_size = 32  # 4 samples per shard on 8 batch shards, 8 on 4
  c.total_steps = 10
  c.model.embed_dim = 16
  c.model.image.update(image_size=8, patch_size=4, width=16, depth=1, num_heads=2, mlp_ratio=2.0)
  c.model.text.update(vocab_size=64, context_length=8, width=16, depth=1, num_heads=2, mlp_ratio=2.0)
  c.model.fusion.update(enabled=fusion, width=16, depth=1, num_heads=2, mlp_ratio=2.0)
  c.loss.update(name=name, sigmoid_variant=variant, num_image_views=2, num_text_views=2)
  if fusion:
    # Pools of 4 fit every mesh here, so all runs mine the same negatives.
    c.loss.update(itm_weight=0.5, anchor_weight=0.5, itm_negative_pool=4)
    c.model.image.patch_dropout = 0.5  # 2 of 4 tokens: drawn alike on every mesh
  if objective == "ot_partial":
    c.partial.update(enabled=True, unaligned_batch_size=32)
    c.loss.ot_weight = 1.0
    c.ot.update(start_step=0, min_points=2)
  c.optim.update(learning_rate=1e-3, warmup_steps=0, accumulation_steps=accumulation_steps)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
  return c


def fc1_kernel_layout(state):
  """Per-device shard shape of the first ViT MLP kernel [width, mlp] and of
  its Adam moments: FSDP splits 'embed' over fsdp, tensor parallelism 'mlp'
  over tensor, and the optimizer state is laid out like the parameter."""
  return {"/".join(map(str, path)): list(v[...].addressable_shards[0].data.shape)
          for path, v in nnx.to_flat_state(state)
          if path[-3:] == ("mlp", "fc1", "kernel") and "image_tower" in path}


def run_steps(config, devices):
  """Trains STEPS steps on a mesh over `devices`; returns (losses, params, seconds,
  layout, largest parameter change)."""
  common.validate(config, len(devices))
  mesh = sharding.make_mesh(config, devices)
  model, optimizer = train.create_model_and_optimizer(config, mesh)
  graphdef, state = nnx.split((model, optimizer))
  step = train.make_train_step(graphdef, sharding.state_shardings(state), mesh, config)
  initial = jax.tree.map(np.asarray, jax.device_get(nnx.state(model, nnx.Param).to_pure_dict()))
  t0 = time.perf_counter()
  losses = []
  for i in range(STEPS):
    state, metrics = step(state, sharding.put_batch(random_batch(config, seed=i), mesh))
    losses.append(float(metrics["loss"]))
  layout = fc1_kernel_layout(state)
  nnx.update((model, optimizer), state)
  params = jax.tree.map(np.asarray, jax.device_get(nnx.state(model, nnx.Param).to_pure_dict()))
  update = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, initial)))
  return losses, params, time.perf_counter() - t0, layout, update


def check_steps(objectives=tuple(OBJECTIVES)):
  devices = jax.devices()
  references = {}
  for objective in objectives:
    # One shard: ring and gather are the same sum, so they share a reference.
    name = "sigmoid_gather" if objective == "sigmoid_ring" else objective
    if name not in references:
      references[name] = run_steps(tiny_config(name), devices[:1])
    reference = references[name]
    # Every mesh in one pass, and (2, 2, 2) again with the towers in two
    # microbatches of 16 (optim.accumulation_steps: the same gradient).
    runs = [(shape, 1) for shape in MESHES] * (objective != "ot_partial") + [((2, 2, 2), 2)]
    for shape, steps in runs:
      losses, params, seconds, layout, update = run_steps(tiny_config(objective, shape, steps),
                                                          devices)
      diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                           params, reference[1]))
      print(json.dumps({
          "check": "step", "objective": objective, "mesh": list(shape),
          "accumulation_steps": steps,
          "losses": losses, "reference_losses": reference[0],
          "loss_max_abs_diff": max(abs(a - b) for a, b in zip(losses, reference[0])),
          "param_max_abs_diff": max(diffs), "param_max_update": update,
          "fc1_kernel_shard_shapes": layout,
          "seconds": round(seconds, 1)}), flush=True)


def largest_array(hlo: str):
  """(elements, shape) of the largest array any instruction of an HLO module has."""
  shapes = {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"\w+\[(\d+(?:,\d+)*)\]", hlo)}
  return max((math.prod(s), list(s)) for s in shapes)


def check_memory(batch=4096, dim=64):
  """Per-device compiled memory of the value and gradient of the batch-level
  terms (alignment, saturation, anchor) on [batch, dim] embeddings, split
  over 8 devices by shard_map, against the same terms on one device."""
  config = common.base_config()
  config.mesh.data = 8
  mesh = sharding.make_mesh(config)
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  embeddings = [unit(rng.normal(size=(batch, 1, dim)).astype(np.float32)) for _ in range(3)]
  B, R = sharded.BATCH, sharded.REPLICATED
  for name, variant in (("softmax", "gather"), ("sigmoid", "gather"), ("sigmoid", "ring")):
    figures = {}
    for label, shard_mesh in (("sharded", mesh), ("one_device", None)):

      def align(image, text, scale, bias):
        fn = lambda i, t, s, b, axis: sharded.alignment(name, variant, i, t, s, b, axis=axis)
        return sharded.on_batch_shards(fn, shard_mesh, (B, B, R, R), R)(image, text, scale, bias)

      def terms(image, text, anchor, scale, bias):
        run = lambda fn, ins: sharded.on_batch_shards(fn, shard_mesh, ins, R)
        stats = run(sharded.saturation, (B, B, R))(image[:, 0], text[:, 0], scale)
        anchor = run(sharded.anchor_alignment, (B, B, B, R))(image[:, 0], text[:, 0], anchor[:, 0], scale)
        return align(image, text, scale, bias) + anchor + 0.0 * stats["mean_margin"]

      if shard_mesh is None:
        args = [jax.device_put(x, jax.devices()[0]) for x in embeddings]
      else:
        args = [jax.device_put(x, NamedSharding(mesh, B)) for x in embeddings]
      scalars = (jnp.float32(10.0), jnp.float32(-10.0))
      whole = jax.jit(jax.value_and_grad(terms, argnums=(0, 1, 2, 3, 4))).lower(*args, *scalars).compile()
      alone = jax.jit(jax.value_and_grad(align, argnums=(0, 1, 2, 3))).lower(*args[:2], *scalars).compile()
      elements, shape = largest_array(whole.as_text())
      figures[label] = {"temp_mib": whole.memory_analysis().temp_size_in_bytes / 2**20,
                        "align_temp_mib": alone.memory_analysis().temp_size_in_bytes / 2**20,
                        "align_largest_array": largest_array(alone.as_text())[1],
                        "largest_array": shape}
    print(json.dumps({"check": "memory", "loss": name, "variant": variant, "batch": batch,
                      "dim": dim, "devices": 8, "global_bxb_mib": batch * batch * 4 / 2**20,
                      **figures}), flush=True)


def check_fsdp_memory(batch=256):
  """The compiled train step's per-device temporary memory on (8,1,1) and
  (1,8,1): FSDP must split the activations as data parallelism does, not
  gather the whole batch onto every device to meet a split kernel."""
  figures = {}
  for label, shape in (("data", (8, 1, 1)), ("fsdp", (1, 8, 1))):
    c = common.base_config()
    c.batch_size = batch
    c.model.embed_dim = 64
    c.model.image.update(image_size=32, patch_size=8, width=128, depth=2, num_heads=4)
    c.model.text.update(vocab_size=512, context_length=24, width=128, depth=2, num_heads=4)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape
    common.validate(c, num_devices=8)
    mesh = sharding.make_mesh(c)
    graphdef, state = train.abstract_model_and_optimizer(c, mesh)
    step = train.make_train_step(graphdef, sharding.state_shardings(state), mesh, c)
    data = random_batch(c)
    batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                  for k, v in data.items()}
    compiled = step.lower(state, batch_spec).compile()
    figures[label] = compiled.memory_analysis().temp_size_in_bytes / 2**20
  print(json.dumps({"check": "fsdp_memory", "batch": batch, "temp_mib": figures}), flush=True)


def check_saturation(batch=32, dim=8):
  """sharded.saturation on 8 shards of [batch, dim] against gap.saturation of
  the gathered logits. Texts are noisy copies of their images, so every row's
  positive stands out; a shard that read shard 0's columns as its positives
  would find much smaller (mostly negative) margins."""
  config = common.base_config()
  config.mesh.data = 8
  mesh = sharding.make_mesh(config)
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  image = unit(rng.normal(size=(batch, dim))).astype(np.float32)
  text = unit(image + 0.3 * rng.normal(size=(batch, dim))).astype(np.float32)
  scale = jnp.float32(20.0)
  B, R = sharded.BATCH, sharded.REPLICATED
  fn = jax.jit(sharded.on_batch_shards(sharded.saturation, mesh, (B, B, R), R))
  ours = fn(*(jax.device_put(x, NamedSharding(mesh, B)) for x in (image, text)), scale)
  theirs = gap.saturation(scale * image @ text.T)
  print(json.dumps({"check": "saturation", "batch": batch, "devices": 8,
                    "sharded": {k: float(v) for k, v in ours.items()},
                    "whole": {k: float(v) for k, v in theirs.items()}}), flush=True)


def collectives(hlo: str) -> list[str]:
  """'kind result-shape' of every collective an HLO module runs."""
  found = re.findall(r"=\s*(\S+)\s+(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
                     r"(?:-start)?\(", hlo)
  return sorted(f"{kind} {shape}" for shape, kind in found)


def check_patch_dropout():
  """The compiled draw of objective.with_patch_dropout, as the train step makes
  it (batch split over data x fsdp), on every mesh, aligned and unaligned
  images: its collectives, and its keep indices against one device's."""
  for shape in MESHES:
    config = tiny_config("ot_partial", shape)
    config.model.image.patch_dropout = 0.5
    config.partial.unaligned_patch_dropout = True
    common.validate(config, 8)
    mesh = sharding.make_mesh(config)
    batch = sharding.put_batch(random_batch(config), mesh)
    draw = jax.jit(lambda b, step, mesh=mesh: {
        k: v for k, v in objective.with_patch_dropout(b, config, step, mesh).items() if "keep" in k})
    compiled = draw.lower(batch, 3).compile()
    keep = compiled(batch, 3)
    alone = objective.with_patch_dropout(jax.device_put(random_batch(config), jax.devices()[0]), config, 3)
    print(json.dumps({
        "check": "patch_dropout", "mesh": list(shape),
        "scores_shape": [config.batch_size, config.loss.num_image_views,
                         (config.model.image.image_size // config.model.image.patch_size) ** 2],
        "collectives": collectives(compiled.as_text()),
        "keep_shard_shapes": {k: list(v.addressable_shards[0].data.shape) for k, v in keep.items()},
        "equal_to_one_device": {k: bool(np.array_equal(np.asarray(v), np.asarray(alone[k])))
                                for k, v in keep.items()}}), flush=True)


def check_eval_embedding(examples=21, batch_size=10):
  """Held-out embeddings (images and texts, evaluator.embed_in_batches) of a
  model on each mesh against the same parameters on one device; and, for the
  images, each device's input shard of the embedding program and its
  compiled FLOPs per device, from the arguments embed_in_batches passed."""
  data = random_batch(tiny_config("softmax"))
  images = np.resize(data["images"][:, 0], (examples, *data["images"].shape[2:]))  # [E, H, W, 3]
  tokens = np.resize(data["tokens"][:, 0], (examples, data["tokens"].shape[-1]))  # [E, L]

  def embed(shape, devices):
    config = tiny_config("softmax", shape)
    mesh = sharding.make_mesh(config, devices)
    model, _ = train.create_model_and_optimizer(config, mesh)
    calls = []  # (images, whether the mesh was set) of each call

    def spy(model, x):
      calls.append((x, not jax.sharding.get_abstract_mesh().empty))
      return evaluator._embed_images(model, x)

    image_emb = evaluator.embed_in_batches(spy, model, images, batch_size)
    text_emb = evaluator.embed_in_batches(evaluator._embed_texts, model, tokens, batch_size)
    x, with_mesh = calls[0]
    with jax.set_mesh(mesh) if with_mesh else contextlib.nullcontext():
      compiled = evaluator._embed_images.lower(model, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return image_emb, text_emb, {"batch": list(x.shape), "mesh_set": with_mesh,
                                 "shard_shape": list(x.addressable_shards[0].data.shape),
                                 "flops_per_device": float(cost["flops"])}

  one_image, one_text, one = embed((1, 1, 1), jax.devices()[:1])
  for shape in MESHES:
    image_emb, text_emb, program = embed(shape, jax.devices())
    print(json.dumps({
        "check": "eval_embedding", "mesh": list(shape), "examples": examples,
        "batch_size": batch_size, "shapes": [list(image_emb.shape), list(text_emb.shape)],
        "image_max_abs_diff": float(np.max(np.abs(image_emb - one_image))),
        "text_max_abs_diff": float(np.max(np.abs(text_emb - one_text))),
        "program": program, "one_device_program": one}), flush=True)


if __name__ == "__main__":
  if jax.device_count() != 8:
    sys.exit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), got {jax.device_count()}")
  part = sys.argv[1] if len(sys.argv) > 1 else "step"
  if part == "memory":
    check_memory()
    check_fsdp_memory()
    check_saturation()
  elif part == "placement":
    check_patch_dropout()
    check_eval_embedding()
  else:
    unknown = set(sys.argv[2:]) - set(OBJECTIVES)
    if unknown:
      sys.exit(f"unknown objectives {sorted(unknown)}; known: {list(OBJECTIVES)}")
    check_steps(tuple(sys.argv[2:]) or tuple(OBJECTIVES))
