"""End-to-end: a short CPU training run learns held-out structure."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common, tiny_cpu
from ito_jax import bench, objective, sharding, train
from ito_jax.metrics import read_jsonl
from ito_jax.models.ito import MAX_LOG_SCALE, MAX_LOGIT_SCALE, ItoModel


def short_config():
  c = tiny_cpu.get_config()
  c.total_steps = 200
  c.log_every_steps = 25
  c.eval_every_steps = 200
  c.batch_size = 64
  c.optim.warmup_steps = 20
  c.data.num_train = 2000
  c.data.num_eval = 200
  c.eval.batch_size = 200
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("train"))
  result = train.train_and_evaluate(short_config(), workdir)
  return workdir, result


@pytest.mark.slow
def test_loss_falls_and_heldout_retrieval_beats_chance(trained):
  workdir, result = trained
  logged = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in logged] == list(range(25, 201, 25))
  first, last = logged[0]["loss"], logged[-1]["loss"]
  assert last < 0.8 * first, (first, last)
  chance = result["retrieval/r1_chance"]  # 1/200
  assert result["retrieval/i2t_r1"] > 5 * chance
  assert result["retrieval/t2i_r1"] > 5 * chance
  assert result["zeroshot/accuracy"] > 3 * result["zeroshot/chance"]


@pytest.mark.slow
def test_run_writes_metrics_and_eval_files(trained):
  workdir, result = trained
  with open(os.path.join(workdir, "eval.json")) as f:
    on_disk = json.load(f)
  assert on_disk == pytest.approx(result)
  for key in ("zeroshot/accuracy", "retrieval/i2t_r1", "retrieval/t2i_r1", "gap/centroid_distance"):
    assert key in on_disk
  record = read_jsonl(os.path.join(workdir, "metrics.jsonl"))[0]
  for key in ("step", "loss", "learning_rate", "temperature", "grad_norm", "examples_per_sec"):
    assert np.isfinite(record[key]), key
  assert os.path.exists(os.path.join(workdir, "tokenizer.model"))


# ------------------------------------------------- non-finite steps are skipped
def _micro_config(skip_nonfinite):
  """tiny_cpu with towers small enough to compile in seconds."""
  c = tiny_cpu.get_config()
  c.model.embed_dim = 16
  c.model.image.update(image_size=16, patch_size=8, width=32, depth=1, num_heads=2)
  c.model.text.update(vocab_size=128, context_length=12, width=32, depth=1, num_heads=2)
  c.batch_size = 8
  c.optim.skip_nonfinite = skip_nonfinite
  common.validate(c)
  return c


def _micro_step(skip_nonfinite):
  """A compiled train step of the micro towers, its initial state and a random batch."""
  c = _micro_config(skip_nonfinite)
  mesh = sharding.make_mesh(c)
  graphdef, state = nnx.split(train.create_model_and_optimizer(c, mesh))
  step = train.make_train_step(graphdef, sharding.state_shardings(state), mesh, c)
  return step, state, bench.random_batch(c), mesh, graphdef


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.fixture(scope="module")
def guarded():
  return _micro_step(skip_nonfinite=True)


def test_a_step_with_a_nan_input_leaves_parameters_and_optimizer_state_as_they_were(guarded):
  step, state, batch, mesh, _ = guarded
  before = _leaves(state)
  bad = {**batch, "images": batch["images"].copy()}
  bad["images"][0, 0, 0, 0, 0] = np.nan  # one pixel of one image
  state, metrics = step(jax.tree.map(jnp.copy, state), sharding.put_batch(bad, mesh))
  assert not np.isfinite(float(metrics["loss"]))
  assert int(metrics["train/nonfinite_steps"]) == 1
  after = _leaves(state)
  assert len(after) == len(before)
  for a, b in zip(after, before):  # parameters, Adam moments and the step count
    np.testing.assert_array_equal(a, b)
  # A finite batch next trains as usual: every leaf finite, parameters moved.
  state, metrics = step(state, sharding.put_batch(batch, mesh))
  assert int(metrics["train/nonfinite_steps"]) == 0
  after = _leaves(state)
  assert all(np.isfinite(a).all() for a in after)
  assert any(not np.array_equal(a, b) for a, b in zip(after, before))


def test_the_logged_learning_rate_follows_the_optimizer_count_past_a_skipped_step(guarded):
  """The loop's step 2 follows a skipped step 1, so its update is the
  optimizer's first and uses the schedule's first rate, not its second."""
  step, state, batch, mesh, _ = guarded
  c = tiny_cpu.get_config()
  schedule = train.learning_rate_schedule(c)
  bad = {**batch, "images": batch["images"].copy()}
  bad["images"][0, 0, 0, 0, 0] = np.nan
  state = jax.tree.map(jnp.copy, state)
  rates = []
  for b in (bad, batch, batch):
    state, metrics = step(state, sharding.put_batch(b, mesh))
    rates.append(float(metrics["learning_rate"]))
  expected = [float(schedule(0)), float(schedule(0)), float(schedule(1))]
  np.testing.assert_allclose(rates, expected, rtol=1e-5)
  assert expected[2] > expected[1]  # the warmup moves, so a loop-step rate would differ


def test_a_logit_scale_past_the_cap_is_clamped_back_and_keeps_its_gradient(guarded):
  """The cap binds on the parameter, so a scale that overshot it comes back
  to it and can still move down: a cap on exp(log_scale) alone would zero its
  gradient and leave it stuck above."""
  step, state, batch, mesh, graphdef = guarded
  model, optimizer = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  model.log_scale[...] = jnp.asarray(MAX_LOG_SCALE + 0.5, jnp.float32)
  state, _ = step(nnx.state((model, optimizer)), sharding.put_batch(batch, mesh))
  model, _ = nnx.merge(graphdef, state)
  assert float(model.log_scale[...]) == pytest.approx(MAX_LOG_SCALE)
  assert float(model.logit_scale) == pytest.approx(MAX_LOGIT_SCALE)
  grads = nnx.grad(lambda m: m.logit_scale)(model)
  # d exp(t) / dt = exp(t), whole: a cap that split the tie (jnp.minimum) gave half.
  assert float(grads.log_scale[...]) == pytest.approx(MAX_LOGIT_SCALE, rel=1e-5)


def test_the_logged_temperature_and_grad_norm_are_the_models_before_clipping(guarded):
  """The first update runs at the warmup's rate 0, so the logged temperature
  is 1 / temperature_init; grad_norm is the global norm of the loss gradient,
  computed here outside the step, before optim.grad_clip_norm clips it."""
  step, state, batch, mesh, graphdef = guarded
  c = _micro_config(skip_nonfinite=True)
  placed = sharding.put_batch(batch, mesh)

  def loss_grad_norm(state):
    model, _ = nnx.merge(graphdef, state)
    grads = nnx.grad(lambda m: objective.compute_loss(m, placed, c, mesh, step=0)[0])(model)
    return optax.global_norm(grads)

  with jax.set_mesh(mesh):
    expected_norm = float(jax.jit(loss_grad_norm)(state))
  _, metrics = step(jax.tree.map(jnp.copy, state), placed)
  assert float(metrics["temperature"]) == pytest.approx(1 / tiny_cpu.get_config().model.temperature_init)
  assert float(metrics["temperature"]) == pytest.approx(0.07)
  assert expected_norm > c.optim.grad_clip_norm  # so a clipped norm would differ
  assert float(metrics["grad_norm"]) == pytest.approx(expected_norm, rel=1e-4)


def test_weight_decay_reaches_kernels_and_embeddings_only():
  """One AdamW update with a zero gradient is the decay alone: p <- p (1 - lr wd).
  Decay on log_scale would drag the temperature, on logit_bias the sigmoid
  bias, on norms' scales and biases the layers' gains. Every parameter is set
  to 1 first, so a decayed zero-initialised bias would show."""
  c = _micro_config(skip_nonfinite=True)
  c.optim.warmup_steps = 0  # the first update runs at the peak rate
  lr, wd = c.optim.learning_rate, c.optim.weight_decay
  assert lr * wd > 0
  with nnx.use_eager_sharding(False):
    model = ItoModel(c.model, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(jnp.ones_like, params))
  optimizer = nnx.Optimizer(model, train.make_optimizer(c), wrt=nnx.Param)
  optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
  decayed = {}
  for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param))):
    name = str(path[-1].key)
    value = np.asarray(value)
    shrunk = bool(np.allclose(value, 1 - lr * wd, rtol=0, atol=1e-7))
    assert shrunk or np.all(value == 1), (path, value.ravel()[:3])
    decayed.setdefault(name, set()).add(shrunk)
  assert decayed == {"kernel": {True}, "embedding": {True}, "pos_embedding": {True},
                     "bias": {False}, "scale": {False}, "log_scale": {False},
                     "logit_bias": {False}}, decayed


def test_without_the_guard_the_same_input_turns_parameters_nan():
  """What optim.skip_nonfinite prevents: the unguarded step applies the NaN update."""
  step, state, batch, mesh, _ = _micro_step(skip_nonfinite=False)
  batch["images"][0, 0, 0, 0, 0] = np.nan
  state, metrics = step(state, sharding.put_batch(batch, mesh))
  assert "train/nonfinite_steps" not in metrics
  assert any(np.isnan(a).any() for a in _leaves(state))


def test_a_log_window_of_only_skipped_steps_is_an_error():
  train.check_progress({"train/nonfinite_steps": 49}, step=100, steps_since_log=50)  # one applied: goes on
  train.check_progress({}, step=100, steps_since_log=50)  # guard off: nothing counted
  with pytest.raises(FloatingPointError, match=r"steps 51-100: every step had a non-finite"):
    train.check_progress({"train/nonfinite_steps": 50, "loss": float("nan")}, step=100,
                         steps_since_log=50)


@pytest.mark.slow
def test_a_run_whose_loss_is_always_nan_stops_at_its_first_log_line(tmp_path, monkeypatch):
  """End to end: the loop counts the skipped steps and raises at the log line
  instead of training on (or spinning on) NaN."""
  real = objective.compute_loss

  def nan_loss(*args, **kwargs):
    loss, metrics = real(*args, **kwargs)
    return loss * jnp.nan, metrics

  monkeypatch.setattr(objective, "compute_loss", nan_loss)
  c = short_config()
  c.total_steps, c.log_every_steps = 6, 3
  c.data.num_train, c.data.num_eval = 256, 64
  c.eval.batch_size = 64
  with pytest.raises(FloatingPointError, match=r"steps 1-3: every step"):
    train.train_and_evaluate(c, str(tmp_path))


# ------------------------------------------------- throughput and refused resumes
def test_throughput_leaves_evaluation_time_out():
  """Two steps, a 10-second evaluation, two more steps, 6 seconds of training
  in all: 4 steps / 6 s, not 4 steps over the 2 s since the evaluation."""
  now = [0.0]
  speed = train.Throughput(clock=lambda: now[0])
  for _ in range(2):
    now[0] += 1.0
    speed.step()
  now[0] += 10.0
  speed.exclude(10.0)
  for _ in range(2):
    now[0] += 2.0
    speed.step()
  rates = speed.rates(batch_size=8)
  assert rates["steps_per_sec"] == pytest.approx(4 / 6)
  assert rates["examples_per_sec"] == pytest.approx(32 / 6)
  speed.restart()
  assert speed.steps == 0


@pytest.mark.slow
def test_throughput_leaves_compilation_out(tmp_path, monkeypatch):
  """Tracing a step here sleeps 3 s (as a slow compile would take), once for
  the patch-dropout step at step 1 and once for the unmasked step at step 4.
  Both happen off the throughput clock: each 3-step line reads over 1 step/s,
  where a window holding either compile reads under 3 steps / 3 s."""
  import time
  import data_helpers
  from ito_jax import accumulation
  real = accumulation.value_and_grad
  traces = []

  def slow_to_trace(*args, **kwargs):
    traces.append(1)
    time.sleep(3.0)
    return real(*args, **kwargs)

  monkeypatch.setattr(accumulation, "value_and_grad", slow_to_trace)
  c = data_helpers.micro_config(num_train=64, num_eval=16)
  c.update(total_steps=6, log_every_steps=3, eval_every_steps=6, checkpoint_every_steps=1000)
  c.model.image.update(patch_dropout=0.5, unmasked_final_steps=3)
  train.train_and_evaluate(c, str(tmp_path / "run"))
  assert len(traces) == 2  # one trace (and compile) per step function
  lines = [r for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in lines] == [3, 6]
  assert all(r["steps_per_sec"] > 1.0 for r in lines), [r["steps_per_sec"] for r in lines]


def test_a_workdir_tokenizer_larger_than_the_vocab_is_refused(tmp_path):
  """Ids past the embedding table would embed as NaN and the run would stop
  blaming the learning rate; the reused tokenizer is checked instead."""
  from ito_jax.data import tokenizer as tokenizer_lib
  texts = [f"a {c} {s} on the {p}" for c in ("red", "green", "blue", "amber", "violet")
           for s in ("circle", "square", "triangle", "diamond") for p in ("left", "right", "top")]
  tok = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "tokenizer.model"), vocab_size=64)
  config = tiny_cpu.get_config()
  config.model.text.vocab_size = tok.vocab_size - 1
  with pytest.raises(common.ConfigError, match=f"config.model.text.vocab_size: {tok.vocab_size - 1} "
                     f"is smaller than the {tok.vocab_size} pieces"):
    train.prepare_inputs(config, str(tmp_path))
  config.model.text.vocab_size = tok.vocab_size
  assert train.prepare_inputs(config, str(tmp_path))[1].vocab_size == tok.vocab_size
