"""Partially aligned mode (issue 4): the data split, R_ot in the jitted train
step and its bad-input counts (evaluation: test_ot_partial_eval.py; config
checks: test_ot_config.py; the plan contrast: test_ot_plan_contrast.py; the
comparison command: test_ot_compare.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, ot_sections
from ito_jax import bench, objective, objective_ot, sharding, train
from ito_jax import metrics as metrics_lib
from ito_jax.data import partial, pipeline, synthetic
from ito_jax.evaluate import evaluator
from ito_jax.losses import ot as ot_lib

import data_helpers
from partial_helpers import UNSEEN, data_config, micro_config, params as _params, run_step as _run


# ---- split ---------------------------------------------------------------------


def test_split_fractions_unseen_classes_and_disjoint_pools():
  labels = np.random.default_rng(1).integers(0, 30, size=2001)
  s = partial.split_indices(labels, 0.05, UNSEEN, seed=3)
  assert len(s.aligned) == round(0.05 * 2001) == 100
  assert len(s.unaligned_images) == len(s.unaligned_texts) == (2001 - 100) // 2
  sets = [set(s.aligned), set(s.unaligned_images), set(s.unaligned_texts)]
  assert all(len(x) == len(y) for x, y in zip(sets, (s.aligned, s.unaligned_images, s.unaligned_texts)))
  assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
  assert len(sets[0] | sets[1] | sets[2]) == 2001 - 1  # odd remainder: one sample dropped
  assert not np.isin(labels[s.aligned], UNSEEN).any()
  for pool in (s.unaligned_images, s.unaligned_texts):  # every unseen class is in both pools
    assert set(UNSEEN) <= set(labels[pool])
  # All unseen-class samples land in the pools (but for the one odd sample).
  assert np.isin(labels[np.concatenate([s.unaligned_images, s.unaligned_texts])], UNSEEN).sum() >= \
      np.isin(labels, UNSEEN).sum() - 1
  again = partial.split_indices(labels, 0.05, UNSEEN, seed=3)
  other = partial.split_indices(labels, 0.05, UNSEEN, seed=4)
  assert all(np.array_equal(a, b) for a, b in zip(vars(s).values(), vars(again).values()))
  assert not np.array_equal(s.aligned, other.aligned)


def test_split_rejects_too_few_seen_samples():
  labels = np.array([0] * 90 + [1] * 10)
  with pytest.raises(ValueError, match="config.partial.aligned_fraction: 0.2 of 100 samples gives 20"):
    partial.split_indices(labels, 0.2, (0,), seed=0)


def test_no_aligned_pair_shows_an_unseen_class(partial_data):
  """ito_shapes draws distractors of any class, and some captions name them:
  a sample whose distractor is of an unseen class is never aligned, so the
  aligned pairs neither show nor name an unseen class. Its id gives the
  example that scene_classes replays; the replay draws the same image."""
  data_dir, _, _ = partial_data
  c = data_config(data_dir)
  source = partial.train_source(c)
  split = partial.split_for(c, source)
  shown = {int(i): synthetic.scene_classes(0, "train", synthetic.example_index(source[int(i)].id, "train"))
           for i in range(len(source))}
  assert all(shown[i][0] == source[i].label for i in shown)  # the replay is the stored example
  assert not any(set(shown[int(i)]) & set(UNSEEN) for i in split.aligned)
  distracting = [i for i in shown if set(shown[i][1:]) & set(UNSEEN) and shown[i][0] not in UNSEEN]
  assert len(distracting) >= 10  # what the label alone would have let through
  record = synthetic.make_example(0, "train", 7)
  assert source[[r for r in range(len(source)) if source[r].id == "train_000007"][0]].image == record["image"]


def test_partial_pipeline_batches_come_from_their_pools(partial_data, monkeypatch):
  data_dir, builder, tok = partial_data
  c = data_config(data_dir)
  source = partial.train_source(c)
  split = partial.split_for(c, source)
  captions = [cap.decode() for i in split.unaligned_texts for cap in source[int(i)].captions]
  text_pool = {tok.decode(t) for t in tok.encode_batch(captions, 12)}  # as truncated to L = 12

  it = iter(pipeline.train_dataset(c, tok))  # dispatches on partial.enabled
  for _ in range(10):
    batch = next(it)
    assert batch["images"].shape == (8, 1, 16, 16, 3) and batch["tokens"].shape == (8, 1, 12)
    assert batch["unaligned_images"].shape == (12, 1, 16, 16, 3)  # partial.unaligned_views = 1
    assert batch["unaligned_tokens"].shape == (12, 1, 12)
    assert not np.isin(batch["labels"], UNSEEN).any()
    assert set(tok.decode(t) for t in batch["unaligned_tokens"][:, 0]) <= text_pool
  # Deterministic given the seeds; per-process batches are a share of the global one.
  first = next(iter(pipeline.train_dataset(c, tok)))
  again = next(iter(pipeline.train_dataset(c, tok)))
  assert all(np.array_equal(first[k], again[k]) for k in first)
  shard = next(iter(pipeline.train_dataset(c, tok, process_index=1, process_count=2)))
  assert shard["images"].shape[0] == 4 and shard["unaligned_images"].shape[0] == 6
  # Each stream is split between the processes: disjoint halves of its pool, together all of it.
  read = data_helpers.ids_read_per_process(
      monkeypatch, lambda p, n: pipeline.train_dataset(c, tok, process_index=p, process_count=n),
      [pipeline.TrainTransform, partial.ImageTransform, partial.TextTransform],
      batches=max(len(split.aligned) // 4, len(split.unaligned_images) // 6) + 1)
  for name, pool in (("TrainTransform", split.aligned), ("ImageTransform", split.unaligned_images),
                     ("TextTransform", split.unaligned_texts)):
    ids = {(source.name, source[int(i)].id) for i in pool}
    assert not read[name][0] & read[name][1] and read[name][0] | read[name][1] == ids, name
  monkeypatch.undo()
  # The iterator state (what a checkpoint saves) resumes all three streams exactly.
  state = it.get_state()
  expected = next(it)
  resumed = iter(pipeline.train_dataset(c, tok))
  resumed.set_state(state)
  got = next(resumed)
  assert all(np.array_equal(expected[k], got[k]) for k in expected)


def test_subset_reads_the_indexed_records(partial_data):
  data_dir, _, _ = partial_data
  source = partial.train_source(data_config(data_dir))
  sub = partial.Subset(source, np.array([5, 17, 2]))
  ids = [sub[i].id for i in range(3)]
  assert len(sub) == 3 and ids == [source[5].id, source[17].id, source[2].id]
  assert len(set(ids)) == 3 and sub.name == source.name


# ---- R_ot in the train step ----------------------------------------------------


@pytest.fixture(scope="module")
def steppers():
  """Compiled train steps with ot_weight 0 (contrastive only: the OT term is
  not even built) and 1 (R_ot into both towers), and with ot_weight 1 holding
  the "image" or the "text" measures fixed (ot.stop_gradient); one initial
  state, and a random partial batch. Gradient clipping is off: clipping the
  global norm would couple one tower's update to the other's gradient."""
  c = micro_config(**{"optim.grad_clip_norm": 0.0})
  common.validate(c)
  mesh = sharding.make_mesh(c)
  batch = sharding.put_batch(bench.random_batch(c), mesh)
  steps, state = {}, None
  for key, ot_weight, fixed in ((0.0, 0.0, ""), (1.0, 1.0, ""), ("image", 1.0, "image"), ("text", 1.0, "text")):
    cfg = c.copy_and_resolve_references()
    cfg.loss.ot_weight = ot_weight
    cfg.ot.stop_gradient = fixed
    model, optimizer = train.create_model_and_optimizer(cfg, mesh)  # same seed: same init
    graphdef, state = nnx.split((model, optimizer))
    steps[key] = train.make_train_step(graphdef, sharding.state_shardings(state), mesh, cfg)
  return c, graphdef, state, batch, steps


def _same(a, b):
  return all(bool(jnp.allclose(x, y, rtol=1e-6, atol=1e-9)) for x, y in zip(a, b))


def test_ot_gradient_reaches_both_towers_and_is_gated_by_start_step(steppers):
  c, graphdef, state0, batch, steps = steppers
  # Step 1 (0 updates taken < ot.start_step = 1): R_ot is off, the same update as contrastive only.
  s0, m0 = _run(steps[0.0], state0, batch)
  s1, m1 = _run(steps[1.0], state0, batch)
  assert "loss/ot" not in m0 and float(m1["ot/weight"]) == 0.0
  for tower in ("image_tower", "text_tower"):
    assert _same(_params(s0, tower), _params(s1, tower)), tower
  # Step 2: on. From the same state, the two objectives differ by R_ot alone,
  # and so do the updates of both towers.
  s0b, _ = _run(steps[0.0], s1, batch)
  s1b, m1b = _run(steps[1.0], s1, batch)
  assert float(m1b["ot/weight"]) == 1.0 and int(m1b["ot/nonfinite_points"]) == 0
  for tower in ("image_tower", "text_tower"):
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(_params(s0b, tower), _params(s1b, tower)))
    assert diff > 1e-6, (tower, diff)
  # loss/ot is the library's R_ot of the unaligned batches' embeddings.
  model, _ = nnx.merge(graphdef, s1)
  xs = [evaluator._embed_images(model, batch["unaligned_images"][:, 0]),
        evaluator._embed_texts(model, batch["unaligned_tokens"][:, 0])]
  expected = jax.jit(lambda xs: ot_lib.ot_regularizer(xs, ot_sections.ot_solver_config(c))[0])(xs)
  np.testing.assert_allclose(float(m1b["loss/ot"]), float(expected), rtol=1e-4)
  np.testing.assert_allclose(float(m1b["loss"]), float(m1b["loss/align"]) + float(expected), rtol=1e-4)


@pytest.mark.parametrize("fixed,moved", [("image", "text_tower"), ("text", "image_tower")])
def test_stop_gradient_holds_one_modality_fixed(steppers, fixed, moved):
  """ot.stop_gradient: R_ot's value is unchanged, but the fixed modality's
  tower gets the contrastive-only update and only the other tower moves."""
  _, _, state0, batch, steps = steppers
  s1, _ = _run(steps[0.0], state0, batch)  # past start_step
  contrastive, _ = _run(steps[0.0], s1, batch)
  both, m_both = _run(steps[1.0], s1, batch)
  held, m_held = _run(steps[fixed], s1, batch)
  np.testing.assert_allclose(float(m_held["loss/ot"]), float(m_both["loss/ot"]), rtol=1e-6)
  still = {"image": "image_tower", "text": "text_tower"}[fixed]
  assert _same(_params(contrastive, still), _params(held, still)), still
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(_params(contrastive, moved), _params(held, moved)))
  assert diff > 1e-6, (moved, diff)


def test_train_step_switches_ot_on_without_recompiling(steppers):
  _, _, state, batch, steps = steppers
  state = jax.tree.map(jnp.copy, state)
  weights = []
  for _ in range(3):
    state, metrics = steps[1.0](state, batch)
    assert np.isfinite(float(metrics["loss"]))
    weights.append(float(metrics["ot/weight"]))
  assert weights == [0.0, 1.0, 1.0]  # start_step = 1: off for the first update only
  assert steps[1.0].jitted._cache_size() == 1


def test_before_start_step_the_unaligned_batches_are_not_encoded(steppers):
  """A finite unaligned image that overflows inside the tower (3e38) makes
  the step's gradient NaN wherever the towers run on it, even at zero
  weight (0 · inf in the backward pass). Before ot.start_step the term is
  skipped by a cond, so the step is the contrastive-only one, finite."""
  _, _, state0, batch, steps = steppers
  images = np.asarray(batch["unaligned_images"]).copy()
  images[3] = 3e38
  huge = dict(batch, unaligned_images=jax.device_put(images, batch["unaligned_images"].sharding))
  s0, m0 = _run(steps[0.0], state0, huge)  # 0 updates taken < start_step = 1
  s1, m1 = _run(steps[1.0], state0, huge)
  assert np.isfinite(float(m1["grad_norm"])) and int(m1["train/nonfinite_steps"]) == 0
  assert float(m1["ot/weight"]) == 0.0 and float(m1["loss/ot"]) == 0.0
  for tower in ("image_tower", "text_tower"):
    assert _same(_params(s0, tower), _params(s1, tower)), tower
  # Past start_step the towers do run on it: the step is skipped and counted.
  _, m2 = _run(steps[1.0], s1, huge)
  assert int(m2["train/nonfinite_steps"]) == 1


def test_nonfinite_unaligned_input_is_counted_and_adds_no_gradient(steppers):
  _, _, state0, batch, steps = steppers
  s1, _ = _run(steps[0.0], state0, batch)  # past start_step
  images = np.asarray(batch["unaligned_images"]).copy()
  images[3] = np.nan
  bad = dict(batch, unaligned_images=jax.device_put(images, batch["unaligned_images"].sharding))
  s0b, _ = _run(steps[0.0], s1, bad)
  s1b, metrics = _run(steps[1.0], s1, bad)
  assert int(metrics["ot/nonfinite_points"]) == 1 and float(metrics["ot/weight"]) == 0.0
  assert np.isfinite(float(metrics["grad_norm"]))
  # What the solves measured on the stand-ins is not reported as R_ot's.
  described = [k for k in metrics if k.startswith(("ot/", "loss/ot", "gap/unaligned"))
               and k not in ("ot/weight", "ot/nonfinite_points", "ot/nonfinite_value")]
  assert "ot/cycle" in described and "loss/ot" in described
  assert {k: float(metrics[k]) for k in described} == {k: 0.0 for k in described}
  for tower in ("image_tower", "text_tower"):
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in _params(s1b, tower))
    assert _same(_params(s0b, tower), _params(s1b, tower)), tower


def test_nonfinite_ot_value_from_finite_points_is_counted_and_dropped(steppers, monkeypatch):
  """A W_eps that comes out non-finite although every point is finite (an
  overflowing solve) is counted in ot/nonfinite_value and left out of the
  loss, with zero weight and zero gradient."""
  c, graphdef, state0, batch, _ = steppers
  cfg = c.copy_and_resolve_references()
  cfg.loss.ot_weight = 1.0
  model, _ = nnx.merge(graphdef, state0)
  term = lambda m: objective_ot.ot_loss(m, batch, objective.embed_batch(m, batch), cfg)
  _, metrics = nnx.jit(term)(model)
  assert int(metrics["ot/nonfinite_value"]) == 0 and float(metrics["ot/weight"]) == 1.0
  real = ot_lib.ot_regularizer_and_coupling
  monkeypatch.setattr(objective_ot.ot_lib, "ot_regularizer_and_coupling",
                      lambda xs, solver: (lambda v, aux, p: (v + jnp.nan, aux, p))(*real(xs, solver)))
  (value, metrics), grads = nnx.jit(nnx.value_and_grad(term, has_aux=True))(model)
  assert int(metrics["ot/nonfinite_value"]) == 1 and int(metrics["ot/nonfinite_points"]) == 0
  assert float(metrics["ot/weight"]) == 0.0 and float(value) == 0.0
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(g == 0)) for g in leaves)


def test_debias_self_solves_count_towards_unconverged(steppers):
  """With ot.debias the W_eps(mu_k, mu_k) solves are checked like R_ot's own:
  after one Sinkhorn iteration ot/unconverged adds the self-solves that miss
  their marginals to the K = 2 loop's one solve."""
  c, graphdef, state0, batch, _ = steppers
  model, _ = nnx.merge(graphdef, state0)
  out = objective.embed_batch(model, batch)
  counts, errors = {}, {}
  for debias in (False, True):
    cfg = c.copy_and_resolve_references()
    cfg.ot.update(num_iterations=1, marginal_tolerance=1e-6, debias=debias)
    _, metrics = objective_ot.ot_loss(model, batch, out, cfg)
    counts[debias], errors[debias] = float(metrics["ot/unconverged"]), float(metrics["ot/marginal_error"])
  xs, _ = objective_ot.measures(model, batch, out, cfg)
  self_check = ot_lib.convergence([p for _, p in objective_ot.self_solves(xs, ot_sections.ot_solver_config(cfg))],
                                  1e-6)
  assert counts[False] == 1.0 and float(self_check["unconverged"]) >= 1.0
  assert counts[True] == counts[False] + float(self_check["unconverged"])
  assert errors[True] == pytest.approx(max(errors[False], float(self_check["marginal_error"])))


def test_bad_input_counts_are_summed_between_log_lines():
  """train.tally_counts: a log line reports the counts of every step since
  the previous one (the worst marginal error), not just its own step's."""
  steps = [dict(loss=1.0, nonfinite=0, unconverged=1.0, error=0.2),
           dict(loss=2.0, nonfinite=2, unconverged=0.0, error=0.5),
           dict(loss=3.0, nonfinite=1, unconverged=1.0, error=0.1)]
  tally = None
  for f in steps:
    tally = train.tally_counts(tally, {"loss": jnp.float32(f["loss"]),
                                       "ot/nonfinite_points": jnp.int32(f["nonfinite"]),
                                       "ot/unconverged": jnp.float32(f["unconverged"]),
                                       "ot/marginal_error": jnp.float32(f["error"])})
  assert {k: float(v) for k, v in tally.items()} == pytest.approx(
      {"ot/nonfinite_points": 3.0, "ot/unconverged": 2.0, "ot/marginal_error": 0.5})
  assert train.tally_counts(None, {"loss": jnp.float32(1.0)}) == {}  # contrastive-only: nothing counted


@pytest.mark.slow
def test_training_logs_counts_of_the_steps_between_log_lines(partial_data, tmp_path, monkeypatch):
  """End to end: a step that counts one unconverged solve, logged every
  second step, shows 2 on each log line."""
  data_dir, _, _ = partial_data
  real = train.make_train_step

  def counting(*args, **kwargs):
    step = real(*args, **kwargs)
    def counted(state, batch):
      state, metrics = step(state, batch)
      return state, {**metrics, "ot/unconverged": jnp.float32(1.0)}
    counted.lower = step.lower  # the loop compiles a step ahead of its first call
    return counted

  monkeypatch.setattr(train, "make_train_step", counting)
  c = data_config(data_dir, **{"total_steps": 4, "log_every_steps": 2, "eval_every_steps": 4})
  train.train_and_evaluate(c, str(tmp_path))
  lines = [r for r in metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r]
  assert [(r["step"], r["ot/unconverged"]) for r in lines] == [(2, 2.0), (4, 2.0)]


@pytest.mark.parametrize("variant", ["loop", "barycenter"])
def test_debias_turns_w_eps_into_sinkhorn_divergences(variant):
  c = micro_config(**{"ot.variant": variant, "ot.gamma": 0.0, "ot.debias": True})
  solver = ot_sections.ot_solver_config(c)

  @jax.jit  # one compile for all the solves
  def figures(x, y):
    w = lambda a, b: ot_lib.wasserstein(a, b, cost="cosine", epsilon=c.ot.epsilon,
                                        num_iterations=c.ot.num_iterations)[0]
    return dict(wxy=w(x, y), wxx=w(x, x), wyy=w(y, y),
                r=ot_lib.ot_regularizer([x, y], solver)[0],
                terms=sum(objective_ot.self_transport([x, y], solver)),
                r_same=ot_lib.ot_regularizer([x, x], solver)[0],
                terms_same=sum(objective_ot.self_transport([x, x], solver)))

  rng = np.random.default_rng(0)
  x, y = (rng.normal(size=(24, 8)) for _ in range(2))
  f = {k: float(v) for k, v in figures(*(jnp.asarray(a / np.linalg.norm(a, axis=1, keepdims=True),
                                                       jnp.float32) for a in (x, y))).items()}
  if variant == "loop":  # R = 2 W(x, y): both pairs of the K = 2 loop
    np.testing.assert_allclose(f["terms"], f["wxx"] + f["wyy"], rtol=1e-5)
    np.testing.assert_allclose(f["r"] - f["terms"], 2 * f["wxy"] - f["wxx"] - f["wyy"], rtol=1e-5)
    assert abs(f["r_same"] - f["terms_same"]) < 1e-5  # S(x, x) = 0
  else:  # R = (W(x, nu) + W(y, nu)) / 2; nu* = x for identical measures
    np.testing.assert_allclose(f["terms"], (f["wxx"] + f["wyy"]) / 4, rtol=1e-5)
    np.testing.assert_allclose(f["r_same"] - f["terms_same"], f["wxx"] / 2, rtol=1e-2)  # the constant W(nu, nu)/2
  # Plain W_eps of a cloud with itself is far from 0: it rewards shrinking.
  assert f["wxx"] > 0.1
