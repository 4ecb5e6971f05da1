"""ITO: the fusion head shapes both towers in training and is absent from inference."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common, ito_tiny_cpu
from ito_jax import objective
from ito_jax.ablate import TABLE_KEYS, VARIANTS, markdown_table, over_seeds, variant_config
from ito_jax.losses import fusion as fusion_losses
from ito_jax.models.ito import ItoModel, count_params, encoder_filter


def build(model_config, seed=0):
  with nnx.use_eager_sharding(False):
    return ItoModel(model_config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def config():
  return ito_tiny_cpu.get_config("runlocal")


@pytest.fixture(scope="module")
def inputs():
  images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
  tokens = jnp.array([[5, 6, 7, 2] + [0] * 20, [9, 8, 2] + [0] * 21,
                      [4, 4, 11, 12, 2] + [0] * 19, [3, 2] + [0] * 22], jnp.int32)
  return images, tokens


def test_encoders_are_bit_identical_with_or_without_fusion_params(config, inputs):
  images, tokens = inputs
  ito = build(config.model)
  clip_config = variant_config(config, "baseline").model
  clip = build(clip_config)
  assert ito.fusion_head is not None and clip.fusion_head is None
  np.testing.assert_array_equal(ito.encode_image(images), clip.encode_image(images))
  np.testing.assert_array_equal(ito.encode_text(tokens), clip.encode_text(tokens))
  # Scrambling every fusion parameter changes nothing on the inference path.
  before_i, before_t = ito.encode_image(images), ito.encode_text(tokens)
  for _, var in nnx.to_flat_state(nnx.state(ito.fusion_head, nnx.Param)):
    var[...] = var[...] + 1.0
  np.testing.assert_array_equal(ito.encode_image(images), before_i)
  np.testing.assert_array_equal(ito.encode_text(tokens), before_t)


def test_encoder_parameter_count_equals_clip_baseline(config):
  ito = nnx.eval_shape(lambda: build(config.model))
  clip = nnx.eval_shape(lambda: build(variant_config(config, "baseline").model))
  assert count_params(ito, encoder_filter()) == count_params(clip)
  assert count_params(ito) > count_params(clip)  # the head exists in training


@pytest.mark.parametrize("which", ["itm", "anchor"])
def test_fusion_loss_gradients_reach_both_towers(config, inputs, which):
  images, tokens = inputs
  model = build(config.model)

  def fusion_only(model):
    img_emb, img_tok = model.image_features(images)
    txt_emb, txt_tok, mask = model.text_features(tokens)
    head = model.fusion_head
    if which == "itm":
      return fusion_losses.itm_loss(head, txt_tok, mask, img_tok, img_emb @ txt_emb.T)[0]
    fused = head(txt_tok, mask, img_tok)
    return fusion_losses.anchor_loss(img_emb, txt_emb, head.anchor(fused), model.logit_scale)[0]

  grads = nnx.jit(nnx.grad(fusion_only))(model)
  for tower in ("image_tower", "text_tower", "fusion_head"):
    norm = optax_norm(grads[tower])
    assert norm > 1e-6, f"no gradient from the {which} loss into {tower}"


def optax_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree))))


def test_objective_adds_weighted_fusion_losses(config, inputs):
  """loss = align + w_itm * itm + w_anchor * (anchor + w_pull * pull), each term reported."""
  images, tokens = inputs
  model = build(config.model)
  batch = {"images": jnp.stack([images, images[::-1]], axis=1),  # [4, 2, H, W, 3]
           "tokens": jnp.stack([tokens, tokens], axis=1)}  # [4, 2, L]
  weighted = config.copy_and_resolve_references()
  # Three different weights, none 1, so that a weight left out or applied to
  # the wrong term changes the sum.
  weighted.loss.update(itm_weight=0.7, anchor_weight=0.3, anchor_pull_weight=2.5)
  loss, m = objective.compute_loss(model, batch, weighted)
  l = weighted.loss
  expected = (m["loss/align"] + l.itm_weight * m["loss/itm"] +
              l.anchor_weight * (m["loss/anchor"] + l.anchor_pull_weight * m["fusion/anchor_pull"]))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  base = variant_config(config, "baseline")
  loss_base, m_base = objective.compute_loss(build(base.model), {k: v[:, :1] for k, v in batch.items()}, base)
  assert "loss/itm" not in m_base and float(loss_base) == pytest.approx(float(m_base["loss/align"]))


def test_anchor_loss_does_not_train_the_temperature(config, inputs):
  """The anchor contrast reads the logit scale under stop_gradient: adding it
  leaves the temperature's gradient exactly that of the alignment loss, while
  it still moves the towers."""
  images, tokens = inputs
  batch = {"images": jnp.stack([images, images[::-1]], axis=1),
           "tokens": jnp.stack([tokens, tokens], axis=1)}

  def grads(anchor_weight):
    c = config.copy_and_resolve_references()
    c.loss.itm_weight = 0.0
    c.loss.anchor_weight = anchor_weight
    return nnx.grad(lambda m: objective.compute_loss(m, batch, c)[0])(build(c.model))

  with_anchor, without = grads(1.0), grads(0.0)
  np.testing.assert_array_equal(with_anchor["log_scale"][...], without["log_scale"][...])
  assert float(with_anchor["log_scale"][...]) != 0.0
  diff = jax.tree.map(lambda a, b: a - b, with_anchor["image_tower"], without["image_tower"])
  assert optax_norm(diff) > 1e-6


def test_ablation_variants_switch_the_right_mechanisms(config):
  got = {v: variant_config(config, v) for v in VARIANTS}
  views = {v: (c.loss.num_image_views, c.loss.num_text_views) for v, c in got.items()}
  fusion = {v: c.model.fusion.enabled for v, c in got.items()}
  assert views == {"baseline": (1, 1), "multi_align": (2, 2), "fusion": (1, 1), "ito": (2, 2)}
  assert fusion == {"baseline": False, "multi_align": False, "fusion": True, "ito": True}
  for v, c in got.items():
    assert (c.total_steps, c.seed, c.data.num_train) == (config.total_steps, config.seed, config.data.num_train)
    common.validate(c)  # every variant is a runnable config


def test_an_ablation_of_a_config_without_ito_is_refused_before_training(config, tmp_path, monkeypatch):
  """tiny_cpu has one view and no fusion head, so every variant of it is the
  same run; the ablation says so instead of training four copies. With the
  fusion head alone on, baseline = multi_align and fusion = ito."""
  from configs import tiny_cpu
  from ito_jax import ablate, train
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a: pytest.fail("trained a run"))
  with pytest.raises(ValueError, match=r"variants 'baseline' and 'multi_align' train the same "
                                       r"config: .*multiple alignment off .*1 x 1.* fusion head off"):
    ablate.run_ablation(tiny_cpu.get_config("runlocal"), str(tmp_path), VARIANTS, [])
  one_view = ml_collections.ConfigDict(config.to_dict())
  one_view.loss.update(num_image_views=1, num_text_views=1)
  with pytest.raises(ValueError, match=r"'baseline' and 'multi_align' .* fusion head on"):
    ablate.check_variants_differ(one_view, VARIANTS)
  ablate.check_variants_differ(one_view, ["baseline", "fusion"])  # these two still differ
  ablate.check_variants_differ(config, VARIANTS)  # the full-ITO config: four different runs


def test_finished_refuses_a_run_of_another_config(tmp_path):
  """A finished run is reused only if its saved config is this variant's:
  one with optim.learning_rate halved is refused, naming the field."""
  from ito_jax import ablate
  c = ito_tiny_cpu.get_config("runlocal")
  (tmp_path / "eval.json").write_text("{}")
  (tmp_path / "config.json").write_text(c.to_json_best_effort())
  assert ablate.finished(str(tmp_path), c)
  c.optim.learning_rate *= 0.5
  with pytest.raises(ValueError, match=r"finished earlier with another config \(optim.learning_rate differ\)"):
    ablate.finished(str(tmp_path), c)
  # A preempted run (config.json and a checkpoint, no eval.json) is resumed only
  # under its own config: under another, its checkpoint would continue as this one.
  (tmp_path / "eval.json").unlink()
  with pytest.raises(ValueError, match=r"holds an unfinished \(preempted\) run with another config "
                                       r"\(optim.learning_rate differ\)"):
    ablate.finished(str(tmp_path), c)
  c.optim.learning_rate *= 2
  assert not ablate.finished(str(tmp_path), c)  # the same config: resumed
  assert not ablate.finished(str(tmp_path / "new"), c)  # nothing there yet


def test_finished_reads_fields_added_since_the_run_as_their_defaults(tmp_path):
  """A run saved before a config field existed is the same config as today's
  with that field at its default, and not at another value."""
  import json
  from ito_jax import ablate
  c = ito_tiny_cpu.get_config("runlocal")
  saved = json.loads(c.to_json_best_effort())
  del saved["optim"]["accumulation_steps"], saved["model"]["image"]["patch_dropout"]
  (tmp_path / "eval.json").write_text("{}")
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert ablate.finished(str(tmp_path), c)
  c.model.image.patch_dropout = 0.5
  with pytest.raises(ValueError, match=r"\(model.image.patch_dropout differ\)"):
    ablate.finished(str(tmp_path), c)


def test_ablation_over_seeds_reports_mean_and_spread():
  per_seed = {0: {k: 0.1 for k in TABLE_KEYS}, 1: {k: 0.3 for k in TABLE_KEYS}}
  per_seed[1]["step"] = 600  # a figure missing from one seed is not averaged
  got = over_seeds(per_seed)
  assert got["retrieval/i2t_r1"] == pytest.approx(0.2)
  assert got["std/retrieval/i2t_r1"] == pytest.approx(0.1)
  assert "step" not in got and set(got["per_seed"]) == {"0", "1"}
  row = markdown_table({"ito": got}).splitlines()[2]
  assert row.startswith("| ito | 0.200 ± 0.100 |")
  single = over_seeds({0: per_seed[0]})
  assert single == per_seed[0] and "±" not in markdown_table({"ito": single})


def test_an_unknown_variant_is_refused_before_any_training(config, tmp_path, monkeypatch):
  """--variants=baseline,itoo fails naming 'itoo' before baseline trains, and
  a variant named twice (it would train once and fill two rows) likewise;
  both are one-line command-line errors (cli.BadArgument)."""
  from ito_jax import ablate, cli, train
  trained = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda config, run_dir: trained.append(run_dir))
  with pytest.raises(ValueError, match=r"--variants: unknown \['itoo'\]; expected some of"):
    ablate.run_ablation(config, str(tmp_path), ["baseline", "itoo"], [])
  with pytest.raises(cli.BadArgument, match=r"--variants: \['ito'\] named more than once"):
    ablate.run_ablation(config, str(tmp_path), ["ito", "baseline", "ito"], [])
  assert trained == [] and not list(tmp_path.iterdir())


def test_a_preempted_ablation_run_stops_before_any_table(config, tmp_path, monkeypatch):
  """A run that a preemption signal stopped (train_and_evaluate returns
  {"preempted": True}, its checkpoint saved) ends the ablation there: no next
  variant, no table, and a message saying how to resume."""
  from ito_jax import ablate, train
  trained = []

  def preempted(config, run_dir):
    trained.append(run_dir)
    return {"step": 3, "preempted": True}

  monkeypatch.setattr(train, "train_and_evaluate", preempted)
  with pytest.raises(ablate.Preempted, match=r"baseline: preempted, checkpoint of step 3 saved; "
                                             r"rerun the same command to resume"):
    ablate.run_ablation(config, str(tmp_path), VARIANTS, [])
  assert trained == [str(tmp_path / "baseline")]
  assert not (tmp_path / "ablation.json").exists() and not (tmp_path / "ablation.md").exists()
