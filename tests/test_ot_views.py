"""Partially aligned mode with several views per unaligned sample
(`partial.unaligned_views` = V): the pipeline's view axis, R_ot's K = 2V
measures in the train step, and the config checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, ot_sections
from ito_jax import bench, objective, objective_ot, sharding, train
from ito_jax.data import partial, pipeline, synthetic
from ito_jax.data import tokenizer as tokenizer_lib
from ito_jax.evaluate import evaluator
from ito_jax.losses import ot as ot_lib
from ito_jax.models.ito import ItoModel

from partial_helpers import micro_config


def test_pipeline_gives_views_of_one_pool_sample(tmp_path):
  data_dir = str(tmp_path)
  builder = synthetic.prepare(data_dir, num_train=120, num_eval=8, seed=0)
  tok = tokenizer_lib.train_tokenizer(synthetic.train_captions(builder), os.path.join(data_dir, "tok.model"), 128)
  c = micro_config(**{"data.data_dir": data_dir, "data.num_train": 120, "data.num_eval": 8,
                      "data.word_dropout": 0.0, "partial.aligned_fraction": 0.2,
                      "partial.unaligned_views": 2})
  source = partial.train_source(c)
  split = partial.split_for(c, source)
  owners = {}  # decoded (truncated) caption -> the text-pool samples that have it
  for i in split.unaligned_texts:
    for ids in tok.encode_batch([t.decode() for t in source[int(i)].captions], 12):
      text = tok.decode(ids)
      owners.setdefault(text, set()).add(int(i))
  batch = next(iter(pipeline.train_dataset(c, tok)))
  assert batch["unaligned_images"].shape == (12, 2, 16, 16, 3)
  assert batch["unaligned_tokens"].shape == (12, 2, 12)
  distinct = 0
  for first, second in batch["unaligned_tokens"]:
    a, b = tok.decode(first), tok.decode(second)
    assert owners[a] & owners[b], (a, b)  # both captions of one pool sample
    distinct += a != b
  assert distinct >= 10  # distinct captions first (ito_shapes has five per image)
  views = batch["unaligned_images"]
  assert not np.allclose(views[:, 0], views[:, 1])  # independently augmented


def test_train_step_puts_every_view_into_r_ot():
  c = micro_config(**{"partial.unaligned_views": 2, "ot.start_step": 0})
  common.validate(c)
  assert ot_sections.num_ot_measures(c) == (4, 48)
  mesh = sharding.make_mesh(c)
  batch = sharding.put_batch(bench.random_batch(c), mesh)
  assert batch["unaligned_images"].shape == (12, 2, 16, 16, 3)
  model, optimizer = train.create_model_and_optimizer(c, mesh)
  graphdef, state = nnx.split((model, optimizer))
  step = train.make_train_step(graphdef, sharding.state_shardings(state), mesh, c)
  model0, _ = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  # Image views, then text views: the loop's cross-modal pairs are (image 1,
  # text 0) and (text 1, image 0).
  xs = [evaluator._embed_images(model0, batch["unaligned_images"][:, v]) for v in range(2)] + \
       [evaluator._embed_texts(model0, batch["unaligned_tokens"][:, v]) for v in range(2)]
  expected, aux = jax.jit(lambda xs: ot_lib.ot_regularizer(xs, ot_sections.ot_solver_config(c)))(xs)
  _, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["loss/ot"]), float(expected), rtol=1e-4)
  for pair in ("w_0_1", "w_1_2", "w_2_3", "w_3_0"):
    np.testing.assert_allclose(float(metrics[f"ot/{pair}"]), float(aux[pair]), rtol=1e-4)
  # Views of the same sample are closer than the unaligned image-text pairs.
  assert float(aux["w_0_1"]) < float(aux["w_1_2"]) and float(aux["w_2_3"]) < float(aux["w_3_0"])
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["ot/weight"]) == 1.0


def test_include_aligned_appends_the_aligned_view_0_to_both_measures():
  c = micro_config(**{"ot.include_aligned": True})
  common.validate(c)
  u, b = c.partial.unaligned_batch_size, c.batch_size
  assert ot_sections.num_ot_measures(c) == (2, 2 * (u + b))  # (K, points in all)
  with nnx.use_eager_sharding(False):
    model = ItoModel(c.model, rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in bench.random_batch(c).items()}

  @nnx.jit
  def measures_and_encodings(model, batch):  # one program: eager op-by-op is slow
    xs, bad = objective_ot.measures(model, batch, objective.embed_batch(model, batch), c)
    encoded = [model.encode_image(batch["unaligned_images"][:, 0]),
               model.encode_text(batch["unaligned_tokens"][:, 0]),
               model.encode_image(batch["images"][:, 0]), model.encode_text(batch["tokens"][:, 0])]
    return xs, bad, encoded

  xs, bad, (image_u, text_u, image_b, text_b) = measures_and_encodings(model, batch)
  assert int(bad) == 0 and [x.shape for x in xs] == [(u + b, 16), (u + b, 16)]
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  close(xs[0][:u], image_u)
  close(xs[1][:u], text_u)
  close(xs[0][u:], image_b)  # the aligned batch's view 0, last
  close(xs[1][u:], text_b)


@pytest.mark.parametrize("overrides, message", [
    ({"partial.unaligned_views": 0}, "config.partial.unaligned_views: must be an integer >= 1"),
    ({"partial.unaligned_views": 2, "ot.include_aligned": True},
     "config.ot.include_aligned: needs partial.unaligned_views == 1"),
    ({"partial.unaligned_views": 2, "loss.ot_plan_contrast_weight": 1.0},
     "config.loss.ot_plan_contrast_weight: needs partial.unaligned_views == 1"),
])
def test_views_config_errors_name_the_field(overrides, message):
  with pytest.raises(common.ConfigError, match=message):
    common.validate(micro_config(**overrides))
