"""Partially aligned mode (issue 4): the data split, R_ot in the jitted train
step, generalised zero-shot evaluation and config checks (the plan contrast:
test_ot_plan_contrast.py; the comparison command: test_ot_compare.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, ot_sections
from ito_jax import bench, objective, objective_ot, sharding, train
from ito_jax import metrics as metrics_lib
from ito_jax.data import partial, pipeline, synthetic
from ito_jax.data import tokenizer as tokenizer_lib
from ito_jax.evaluate import evaluator, retrieval, transport, zeroshot
from ito_jax.losses import ot as ot_lib

from partial_helpers import UNSEEN, micro_config, params as _params, run_step as _run


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


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("data"))
  builder = synthetic.prepare(data_dir, num_train=300, num_eval=40, seed=0)
  tok = tokenizer_lib.train_tokenizer(synthetic.train_captions(builder),
                                      os.path.join(data_dir, "tok.model"), 128)
  return data_dir, builder, tok


def _data_config(data_dir, **kw):
  return micro_config(**{"data.data_dir": data_dir, "data.num_train": 300, "data.num_eval": 40,
                         "data.word_dropout": 0.0, "partial.aligned_fraction": 0.2,
                         "eval.batch_size": 40, **kw})


def test_partial_pipeline_batches_come_from_their_pools(built):
  data_dir, builder, tok = built
  c = _data_config(data_dir)
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
  # The iterator state (what a checkpoint saves) resumes all three streams exactly.
  state = it.get_state()
  expected = next(it)
  resumed = iter(pipeline.train_dataset(c, tok))
  resumed.set_state(state)
  got = next(resumed)
  assert all(np.array_equal(expected[k], got[k]) for k in expected)


def test_subset_reads_the_indexed_records(built):
  data_dir, _, _ = built
  source = partial.train_source(_data_config(data_dir))
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
  _, metrics = term(model)
  assert int(metrics["ot/nonfinite_value"]) == 0 and float(metrics["ot/weight"]) == 1.0
  real = ot_lib.ot_regularizer_and_coupling
  monkeypatch.setattr(objective_ot.ot_lib, "ot_regularizer_and_coupling",
                      lambda xs, solver: (lambda v, aux, p: (v + jnp.nan, aux, p))(*real(xs, solver)))
  (value, metrics), grads = nnx.value_and_grad(term, has_aux=True)(model)
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
def test_training_logs_counts_of_the_steps_between_log_lines(built, tmp_path, monkeypatch):
  """End to end: a step that counts one unconverged solve, logged every
  second step, shows 2 on each log line."""
  data_dir, _, _ = built
  real = train.make_train_step

  def counting(*args, **kwargs):
    step = real(*args, **kwargs)
    def counted(state, batch):
      state, metrics = step(state, batch)
      return state, {**metrics, "ot/unconverged": jnp.float32(1.0)}
    return counted

  monkeypatch.setattr(train, "make_train_step", counting)
  c = _data_config(data_dir, **{"total_steps": 4, "log_every_steps": 2, "eval_every_steps": 4})
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


# ---- evaluation ------------------------------------------------------------------


def test_generalised_zero_shot_accuracy_by_hand():
  class_emb = np.eye(4, dtype=np.float32)  # classes 0..3; class 3 unseen
  labels = np.array([0, 1, 2, 3, 3, 3])
  predicted = np.array([0, 1, 0, 3, 3, 1])  # seen: 2/3 right; unseen: 2/3 right
  image_emb = class_emb[predicted]
  out = zeroshot.accuracy_by_group(image_emb, class_emb, labels, (3,))
  assert out["zeroshot/seen_accuracy"] == pytest.approx(2 / 3)
  assert out["zeroshot/unseen_accuracy"] == pytest.approx(2 / 3)
  assert out["zeroshot/harmonic_mean"] == pytest.approx(2 / 3)
  out = zeroshot.accuracy_by_group(image_emb, class_emb, labels, (0,))  # seen 3/5, unseen 1/1
  assert out["zeroshot/seen_accuracy"] == pytest.approx(3 / 5)
  assert out["zeroshot/harmonic_mean"] == pytest.approx(2 * 0.6 / 1.6)


def test_retrieval_by_group_by_hand():
  # 3 images, 1 caption each; class 7 (images/captions 1 and 2) is unseen.
  image_emb = np.eye(3, dtype=np.float32)
  caption_emb = np.array([[[1, 0, 0]], [[0, 0.6, 0.8]], [[0, 0.3, 0.95]]], np.float32)
  labels = np.array([5, 7, 7])
  out = retrieval.recall_by_group(image_emb, caption_emb, labels, (7,))
  # i2t: image 0 -> caption 0; image 1 -> caption 1 (.6 > .3); image 2 -> caption 2 (.95 > .8): all hit.
  # t2i: caption 0 -> image 0 (hit); caption 1 -> image 2 (.8 > .6, miss); caption 2 -> image 2 (hit).
  assert out == {"retrieval/seen_i2t_r1": 1.0, "retrieval/seen_t2i_r1": 1.0,
                 "retrieval/unseen_i2t_r1": 1.0, "retrieval/unseen_t2i_r1": 0.5}


def test_class_embeddings_renormalise_the_prompt_mean():
  # Class 0's two prompts agree (mean e0, norm 1); class 1's are at +-60
  # degrees around e1 (mean 0.5 e1). An image at (0.6, 0.8) is nearer class
  # 1's direction (cosine 0.8 > 0.6), but the raw mean scores it 0.4 < 0.6:
  # only the renormalised mean puts it in class 1.
  spread = np.sqrt(0.75)
  prompts = np.array([[[1, 0], [1, 0]], [[spread, 0.5], [-spread, 0.5]]], np.float32)
  class_emb = zeroshot.class_embeddings(prompts)
  np.testing.assert_allclose(class_emb, np.eye(2), atol=1e-6)
  out = zeroshot.accuracy(np.array([[0.6, 0.8]], np.float32), class_emb, np.array([1]))
  assert out == {"zeroshot/accuracy": 1.0, "zeroshot/chance": 0.5}


def test_retrieval_by_group_with_several_captions_per_image_by_hand():
  # Image 0 (class 0, seen) has captions e0 and (0.6, 0.8); image 1 (class 1,
  # unseen) has e1 twice. Flattened, captions 0-1 are image 0's, 2-3 image 1's.
  # t2i: caption 0 -> image 0 (hit); caption 1 -> image 1 (0.8 > 0.6, miss);
  # captions 2, 3 -> image 1 (hits). Seen captions {0, 1}: 1/2; unseen {2, 3}: 1.
  # i2t: each image's own e_i caption is its nearest, so both hit.
  image_emb = np.eye(2, dtype=np.float32)
  caption_emb = np.array([[[1, 0], [0.6, 0.8]], [[0, 1], [0, 1]]], np.float32)
  out = retrieval.recall_by_group(image_emb, caption_emb, np.array([0, 1]), (1,))
  assert out == {"retrieval/seen_i2t_r1": 1.0, "retrieval/seen_t2i_r1": 0.5,
                 "retrieval/unseen_i2t_r1": 1.0, "retrieval/unseen_t2i_r1": 1.0}


def test_plan_class_purity_by_construction():
  # Classes 0, 1, 2 at orthogonal directions, 40 examples each and stored
  # sorted by class, as a converted source with class-prefixed ids would be.
  # The two halves are drawn at random, so both hold every class: each image's
  # nearest caption is of its class, and the balanced plan is pure up to the
  # halves' class imbalance (halves by position, classes 0-1 against 1-2,
  # would score both at most 1/3). Captions pointing at the next class are never
  # nearest, and get only the mass that the imbalance forces onto them.
  labels = np.repeat([0, 1, 2], 40)
  emb = np.eye(3, dtype=np.float32)[labels]
  cfg = ot_lib.default_config()
  out = transport.plan_class_purity(emb, emb, labels, cfg)
  assert out["transport/nearest_class_purity"] == 1.0
  assert out["transport/plan_class_purity"] > 0.6
  elsewhere = np.eye(3, dtype=np.float32)[(labels + 1) % 3]
  out = transport.plan_class_purity(emb, elsewhere, labels, cfg)
  assert out["transport/plan_class_purity"] < 0.15 and out["transport/nearest_class_purity"] == 0.0


def test_plan_class_purity_halves_hold_no_true_pair():
  """Caption i is image i's own embedding, 200 random directions, 10 labels.
  The purity halves are disjoint, so no image meets its own caption and both
  figures stay near chance (1/10); halves sharing rows would score 1.0."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 200)
  emb = rng.normal(size=(200, 64)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  out = transport.plan_class_purity(emb, emb, labels, ot_lib.default_config())
  assert out["transport/nearest_class_purity"] < 0.3, out
  assert out["transport/plan_class_purity"] < 0.3, out


def test_evaluator_reports_seen_and_unseen_keys(built, monkeypatch):
  data_dir, _, tok = built
  c = _data_config(data_dir)
  model, _ = train.create_model_and_optimizer(c, sharding.make_mesh(c))
  data = pipeline.eval_arrays(c, tok, "test", data_dir=data_dir)
  assert set(UNSEEN) & set(data["labels"]) and set(data["labels"]) - set(UNSEEN)
  ev = evaluator.Evaluator(c, data, pipeline.class_names(c, data_dir), tok)
  out = ev.run(model)
  for key in ("zeroshot/accuracy", "zeroshot/seen_accuracy", "zeroshot/unseen_accuracy",
              "zeroshot/harmonic_mean", "retrieval/i2t_r1", "retrieval/seen_i2t_r1",
              "retrieval/seen_t2i_r1", "retrieval/unseen_i2t_r1", "retrieval/unseen_t2i_r1",
              "transport/plan_class_purity", "transport/nearest_class_purity"):
    assert 0.0 <= out[key] <= 1.0, key
  unseen = np.isin(data["labels"], UNSEEN)
  overall = (unseen.mean() * out["zeroshot/unseen_accuracy"]
             + (1 - unseen.mean()) * out["zeroshot/seen_accuracy"])
  assert overall == pytest.approx(out["zeroshot/accuracy"])
  # The same evaluator on constructed embeddings (the model's, untrained, sit
  # near chance): image i is e_i; every caption of a seen-class image is e_i,
  # of an unseen-class image -e_i. A seen image's own captions score 1 and all
  # others <= 0, so it and they retrieve each other; an unseen image's own
  # captions score -1 and all others >= 0, so it and they always miss. The
  # groups must follow each row's label, for images and for all C captions.
  num, num_captions = data["tokens"].shape[:2]
  assert data["captioned"].all() and num_captions > 1
  image_emb = np.eye(num, dtype=np.float32)
  sign = np.where(unseen, -1.0, 1.0).astype(np.float32)
  caption_emb = np.repeat((sign[:, None] * image_emb)[:, None], num_captions, axis=1)  # [E, C, E]
  prompt_emb = np.ones((ev.num_classes, ev.num_templates, num), np.float32) / np.sqrt(num)
  monkeypatch.setattr(ev, "embed", lambda model: dict(image=image_emb, caption=caption_emb,
                                                      prompt=prompt_emb))
  out = ev.run(None)
  assert {k: out[f"retrieval/{k}"] for k in ("seen_i2t_r1", "seen_t2i_r1", "unseen_i2t_r1",
                                             "unseen_t2i_r1")} == {
      "seen_i2t_r1": 1.0, "seen_t2i_r1": 1.0, "unseen_i2t_r1": 0.0, "unseen_t2i_r1": 0.0}
  for direction in ("i2t", "t2i"):
    assert out[f"retrieval/{direction}_r1"] == pytest.approx(1 - unseen.mean()), direction
