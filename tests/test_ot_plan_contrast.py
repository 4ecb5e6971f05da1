"""The plan contrast (issue 4, `loss.ot_plan_contrast_weight`): an InfoNCE on
the unaligned batches whose soft targets are R_ot's coupling; its loss by
hand, its pull and push, its place in the train step, and its config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, ot_partial_tiny_cpu
from ito_jax import bench, objective, objective_ot, sharding, train
from ito_jax.models.ito import ItoModel

from partial_helpers import micro_config, params as _params, run_step as _run


def _unit_rows(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_plan_contrast_is_cross_entropy_against_the_plan_rows_and_columns():
  rng = np.random.default_rng(0)
  image = _unit_rows(rng.normal(size=(5, 8))).astype(np.float32)
  text = _unit_rows(rng.normal(size=(4, 8))).astype(np.float32)
  coupling = rng.uniform(size=(5, 4)).astype(np.float32)
  coupling /= coupling.sum()
  scale = 7.0
  loss, aux = objective_ot.plan_contrast(jnp.asarray(image), jnp.asarray(text), jnp.asarray(coupling),
                                         jnp.float32(scale))
  logits = scale * image @ text.T
  log_softmax = lambda z: z - np.log(np.exp(z).sum(1, keepdims=True))
  rows = coupling / coupling.sum(1, keepdims=True)
  cols = coupling.T / coupling.sum(0)[:, None]
  i2t = -np.mean(np.sum(rows * log_softmax(logits), 1))
  t2i = -np.mean(np.sum(cols * log_softmax(logits.T), 1))
  np.testing.assert_allclose(float(loss), 0.5 * (i2t + t2i), rtol=1e-5)
  # Both ways, like the loss: loss - entropy is then the mean KL to the targets.
  entropy = lambda t: -np.mean(np.sum(t * np.log(t), 1))
  np.testing.assert_allclose(float(aux["plan_target_entropy"]), 0.5 * (entropy(rows) + entropy(cols)),
                             rtol=1e-5)
  kl = lambda t, z: np.mean(np.sum(t * (np.log(t) - log_softmax(z)), 1))
  np.testing.assert_allclose(float(loss) - float(aux["plan_target_entropy"]),
                             0.5 * (kl(rows, logits) + kl(cols, logits.T)), rtol=1e-4)


def test_plan_contrast_pulls_plan_partners_together_and_pushes_the_rest_apart():
  """A gradient step on the loss raises each image's similarity to its plan
  partner and lowers its similarity to the others."""
  rng = np.random.default_rng(1)
  n = 6
  image = jnp.asarray(_unit_rows(rng.normal(size=(n, 8))), jnp.float32)
  text = jnp.asarray(_unit_rows(rng.normal(size=(n, 8))), jnp.float32)
  coupling = jnp.eye(n) / n  # image i is paired with text i
  loss_fn = lambda t: objective_ot.plan_contrast(image, t / jnp.linalg.norm(t, axis=1, keepdims=True),
                                                 coupling, jnp.float32(10.0))[0]
  grad = jax.grad(loss_fn)(text)
  moved = text - 0.05 * grad
  moved = moved / jnp.linalg.norm(moved, axis=1, keepdims=True)
  before, after = np.asarray(image @ text.T), np.asarray(image @ moved.T)
  off = ~np.eye(n, dtype=bool)
  assert np.all(np.diag(after) > np.diag(before))
  assert after[off].mean() < before[off].mean()
  assert float(loss_fn(moved)) < float(loss_fn(text))


def test_plan_contrast_trains_both_towers_in_the_step():
  c = micro_config(**{"loss.ot_weight": 0.0, "loss.ot_plan_contrast_weight": 1.0, "ot.start_step": 0})
  common.validate(c)
  mesh = sharding.make_mesh(c)
  batch = sharding.put_batch(bench.random_batch(c), mesh)
  states = {}
  for weight in (0.0, 1.0):
    cfg = c.copy_and_resolve_references()
    cfg.loss.ot_plan_contrast_weight = weight
    model, optimizer = train.create_model_and_optimizer(cfg, mesh)
    graphdef, state = nnx.split((model, optimizer))
    step = train.make_train_step(graphdef, sharding.state_shardings(state), mesh, cfg)
    state, _ = _run(step, state, batch)  # the first update has learning rate 0 (warmup)
    states[weight], metrics = _run(step, state, batch)
  assert "loss/ot_plan_contrast" in metrics and np.isfinite(float(metrics["loss/ot_plan_contrast"]))
  # W_eps has weight 0, so the whole difference is the plan contrast.
  np.testing.assert_allclose(float(metrics["loss"]),
                             float(metrics["loss/align"]) + float(metrics["loss/ot_plan_contrast"]), rtol=1e-5)
  for tower in ("image_tower", "text_tower"):
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(_params(states[0.0], tower), _params(states[1.0], tower)))
    assert diff > 1e-6, (tower, diff)


def test_plan_contrast_needs_partial_mode_and_a_non_negative_weight():
  c = ot_partial_tiny_cpu.get_config()
  c.loss.ot_plan_contrast_weight = -1.0
  with pytest.raises(common.ConfigError, match="config.loss.ot_plan_contrast_weight: must be finite and >= 0"):
    common.validate(c)
  c = common.base_config()
  c.loss.ot_plan_contrast_weight = 1.0
  with pytest.raises(common.ConfigError, match="config.loss.ot_plan_contrast_weight: needs partial.enabled"):
    common.validate(c)


def test_plan_contrast_on_nonfinite_unaligned_input_adds_no_loss_and_no_gradient():
  """A NaN unaligned image: the measures become constant stand-ins, whose
  plan contrast is finite (about log 12, every logit equal) but describes
  nothing, so the term must be gated off: the loss is L_align alone and the
  gradient is the contrastive-only one."""
  c = micro_config(**{"loss.ot_weight": 0.0, "loss.ot_plan_contrast_weight": 1.0, "ot.start_step": 0})
  common.validate(c)
  batch = {k: jnp.asarray(v) for k, v in bench.random_batch(c).items()}
  images = np.asarray(batch["unaligned_images"]).copy()
  images[3] = np.nan
  bad = dict(batch, unaligned_images=jnp.asarray(images))
  with nnx.use_eager_sharding(False):
    model = ItoModel(c.model, rngs=nnx.Rngs(0))
  contrastive_only = c.copy_and_resolve_references()
  contrastive_only.loss.ot_plan_contrast_weight = 0.0  # the OT term is not even built

  def loss_and_grads(cfg):
    loss_fn = lambda m: objective.compute_loss(m, bad, cfg)
    return nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)

  (loss, metrics), grads = loss_and_grads(c)
  (loss0, _), grads0 = loss_and_grads(contrastive_only)
  assert int(metrics["ot/nonfinite_points"]) == 1
  assert float(metrics["loss/ot_plan_contrast"]) == 0.0  # reported as 0 on stand-ins
  np.testing.assert_allclose(float(loss), float(metrics["loss/align"]), rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
  for tower in ("image_tower", "text_tower"):
    ours, theirs = jax.tree.leaves(grads[tower]), jax.tree.leaves(grads0[tower])
    assert ours and all(bool(jnp.all(jnp.isfinite(g))) for g in ours)
    for a, b in zip(ours, theirs):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
