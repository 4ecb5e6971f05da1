"""model.image.patch_dropout: training images encode a random subset of their
patch tokens (FLIP); evaluation and serving encode all of them."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, tiny_cpu
from ito_jax import objective, objective_ot, train
from ito_jax.bench import random_batch
from ito_jax.models import vit
from ito_jax.models.ito import ItoModel


def config(rate=0.5):
  c = tiny_cpu.get_config("runlocal")
  c.model.image.patch_dropout = rate
  return c


@pytest.fixture(scope="module")
def model():
  with nnx.use_eager_sharding(False):
    return ItoModel(config().model, rngs=nnx.Rngs(0))


def images(seed=0, n=1):
  c = config().model.image
  return jax.random.uniform(jax.random.key(seed), (n, c.image_size, c.image_size, 3), minval=-1, maxval=1)


def set_patch(x, index, value):
  """x with patch `index` (row-major on the patch grid) filled with `value`."""
  p = config().model.image.patch_size
  grid = x.shape[1] // p
  r, c = divmod(index, grid)
  return x.at[:, r * p:(r + 1) * p, c * p:(c + 1) * p].set(value)


def test_only_kept_patches_reach_the_embedding(model):
  x = images()
  keep = jnp.array([[0, 5, 9, 14]])  # of 16 patches (32 px, patch 8)
  base = model.image_features(x, keep)[0]
  dropped = model.image_features(set_patch(x, 1, 0.7), keep)[0]
  kept = model.image_features(set_patch(x, 5, 0.7), keep)[0]
  np.testing.assert_array_equal(dropped, base)
  assert float(jnp.max(jnp.abs(kept - base))) > 1e-3
  # Pooling and the returned tokens cover the kept tokens only.
  assert model.image_features(x, keep)[1].shape == (1, 4, config().model.image.width)


def test_a_kept_token_keeps_its_own_position(model):
  """Two patches with the same pixels, each kept alone: they differ only by
  their position embeddings, so their embeddings differ."""
  x = set_patch(set_patch(images(), 3, 0.2), 12, 0.2)
  a = model.image_features(x, jnp.array([[3]]))[0]
  b = model.image_features(x, jnp.array([[12]]))[0]
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


@pytest.mark.parametrize("keep, match", [
    ([[0, 16]], r"must lie in \[0, 16\), got values from 0 to 16"),
    ([[-1, 3]], r"must lie in \[0, 16\), got values from -1 to 3"),
    ([[0.0, 1.0]], "integer patch indices, got dtype float32"),
    ([0, 1], r"\[batch=1, K\] patch indices with 1 <= K <= 16, got shape \(2,\)"),
    ([list(range(16)) + [0]], r"got shape \(1, 17\)"),
])
def test_bad_keep_indices_fail_with_a_clear_error(model, keep, match):
  """Out of range, a gather would read NaN into the embedding, not fail."""
  with pytest.raises(ValueError, match="keep: .*" + match):
    model.image_features(images(), jnp.array(keep))


def test_without_keep_every_token_is_encoded(model):
  """Evaluation and serving (keep=None) see the whole image, so the rate in
  the config does not change them; keeping every token in order is the same."""
  x = images(n=2)
  patches = (config().model.image.image_size // config().model.image.patch_size) ** 2
  every = jnp.tile(jnp.arange(patches)[None], (2, 1))
  np.testing.assert_allclose(model.image_features(x, every)[0], model.encode_image(x),
                             rtol=1e-5, atol=1e-6)


def test_each_step_and_view_draws_its_own_subset():
  c = config()
  c.batch_size = 4
  c.loss.num_image_views = 2
  batch = {k: jnp.asarray(v) for k, v in random_batch(c).items()}
  patches = (c.model.image.image_size // c.model.image.patch_size) ** 2
  keep0 = np.asarray(objective.with_patch_dropout(batch, c, 0)["patch_keep"])
  assert keep0.shape == (4, 2, vit.kept_patches(c.model.image)) == (4, 2, patches // 2)
  assert all(len(set(row)) == row.size for row in keep0.reshape(-1, keep0.shape[-1]))  # no repeats
  assert keep0.min() >= 0 and keep0.max() < patches
  rows = {tuple(sorted(row)) for row in keep0.reshape(-1, keep0.shape[-1])}
  assert len(rows) == 8  # every image view its own subset
  again = np.asarray(objective.with_patch_dropout(batch, c, 0)["patch_keep"])
  np.testing.assert_array_equal(again, keep0)  # a resumed run draws the same
  keep1 = np.asarray(objective.with_patch_dropout(batch, c, 1)["patch_keep"])
  assert not np.array_equal(np.sort(keep1, -1), np.sort(keep0, -1))
  assert objective.with_patch_dropout(batch, config(0.0), 0) is batch
  # Not the stream nnx.Rngs(seed) initialised the parameters from.
  init_noise = jax.random.uniform(jax.random.fold_in(jax.random.key(c.seed), 0),
                                  keep0.shape[:2] + (patches,))
  assert not np.array_equal(keep0, np.asarray(jax.lax.top_k(init_noise, keep0.shape[-1])[1]))



def test_the_draw_is_the_top_k_of_the_steps_scores():
  """The K highest of each view's uniform scores, as lax.top_k picked them
  before the draw became a sort (top_k gathered the batch under a mesh): a
  run resumed from a checkpoint of then draws the subsets it would have."""
  c = config()
  c.batch_size = 8
  c.model.image.update(image_size=16, patch_size=2)  # 64 patches, 32 kept
  batch = {"images": jnp.zeros((8, 2, 1, 1, 3))}  # the draw reads only [B, M]
  for step in (0, 7):
    keep = np.asarray(objective.with_patch_dropout(batch, c, step)["patch_keep"])
    stream = jax.random.fold_in(jax.random.key(c.seed), objective.PATCH_DROPOUT_STREAM)
    noise = jax.random.uniform(jax.random.fold_in(stream, step), (8, 2, 64))
    np.testing.assert_array_equal(keep, jax.lax.top_k(noise, 32)[1])
    assert keep.dtype == np.int32

def partial_config(rate=0.5, unaligned=True):
  c = config(rate)
  c.batch_size = 4
  c.partial.update(enabled=True, unaligned_batch_size=8, unaligned_views=2,
                   unaligned_patch_dropout=unaligned)
  c.loss.ot_weight = 1.0
  c.ot.update(start_step=0, min_points=2)
  return c


def test_unaligned_images_draw_their_own_subsets_when_asked():
  c = partial_config()
  common.validate(c)
  batch = {k: jnp.asarray(v) for k, v in random_batch(c).items()}
  out = objective.with_patch_dropout(batch, c, 3)
  keep = np.asarray(out["unaligned_patch_keep"])
  patches = (c.model.image.image_size // c.model.image.patch_size) ** 2
  assert keep.shape == (8, 2, patches // 2)
  assert keep.min() >= 0 and keep.max() < patches
  assert all(len(set(row)) == row.size for row in keep.reshape(-1, keep.shape[-1]))
  assert len({tuple(sorted(row)) for row in keep.reshape(-1, keep.shape[-1])}) == 16
  # The aligned draw is the one without the flag, and a resumed run repeats both.
  np.testing.assert_array_equal(
      out["patch_keep"], objective.with_patch_dropout(batch, partial_config(unaligned=False), 3)["patch_keep"])
  np.testing.assert_array_equal(objective.with_patch_dropout(batch, c, 3)["unaligned_patch_keep"], keep)
  assert "unaligned_patch_keep" not in objective.with_patch_dropout(batch, partial_config(unaligned=False), 3)
  assert "unaligned_patch_keep" not in objective.with_patch_dropout(
      batch, objective.without_patch_dropout(c), 3)  # FLIP's unmasked phase encodes them whole


def test_only_kept_patches_reach_the_unaligned_embeddings(model):
  """R_ot's image measures under partial.unaligned_patch_dropout: a patch
  left out of an unaligned image changes nothing, a kept one does."""
  images_ = jnp.stack([images(seed=1), images(seed=2)], axis=1)  # [U=1, V=2, H, W, 3]
  batch = {"unaligned_images": images_, "unaligned_tokens": jnp.ones((1, 2, 8), jnp.int32),
           "unaligned_patch_keep": jnp.array([[[0, 5, 9, 14], [1, 2, 3, 4]]])}
  emb = lambda b: objective_ot.encode_unaligned(model, b)["unaligned_image_emb"]
  base = emb(batch)
  np.testing.assert_allclose(base[0, 0], model.image_features(images(seed=1), jnp.array([[0, 5, 9, 14]]))[0][0],
                             rtol=1e-5, atol=1e-6)
  dropped = emb({**batch, "unaligned_images": images_.at[:, 0].set(set_patch(images_[:, 0], 1, 0.7))})
  np.testing.assert_array_equal(dropped, base)
  kept = emb({**batch, "unaligned_images": images_.at[:, 0].set(set_patch(images_[:, 0], 5, 0.7))})
  assert float(jnp.max(jnp.abs(kept[0, 0] - base[0, 0]))) > 1e-3
  np.testing.assert_array_equal(kept[0, 1], base[0, 1])


@pytest.mark.parametrize("change, match", [
    (dict(rate=0.0), "is True but model.image.patch_dropout is 0"),
    (dict(enabled=False), "is True but partial.enabled is False"),
    (dict(value=None), "must be True or False, got None"),
])
def test_invalid_unaligned_patch_dropout_names_the_field(change, match):
  c = partial_config(rate=change.get("rate", 0.5))
  c.partial.enabled = change.get("enabled", True)
  if not c.partial.enabled:
    c.loss.ot_weight = 0.0
  c.partial.unaligned_patch_dropout = change.get("value", True)
  with pytest.raises(common.ConfigError, match=r"config\.partial\.unaligned_patch_dropout: " + match):
    common.validate(c)


@pytest.mark.parametrize("rate, size, patch, match", [
    (-0.1, 32, 4, r"must be in \[0, 1\), got -0.1"),
    (1.0, 32, 4, r"must be in \[0, 1\), got 1.0"),
    (0.9, 8, 4, "0.9 keeps no patch token of the 4 an image has"),
])
def test_invalid_rates_name_the_field(rate, size, patch, match):
  c = config(rate)
  c.model.image.update(image_size=size, patch_size=patch)
  with pytest.raises(common.ConfigError, match=r"config\.model\.image\.patch_dropout: " + match):
    common.validate(c)


@pytest.mark.parametrize("rate, final, match", [
    (0.5, 11, r"must be an integer in \[0, total_steps = 10\], got 11"),
    (0.5, -1, r"must be an integer in \[0, total_steps = 10\], got -1"),
    (0.0, 2, "is 2 but model.image.patch_dropout is 0"),
])
def test_invalid_unmasked_final_steps_name_the_field(rate, final, match):
  c = config(rate)
  c.total_steps = 10
  c.model.image.unmasked_final_steps = final
  with pytest.raises(common.ConfigError, match=r"config\.model\.image\.unmasked_final_steps: " + match):
    common.validate(c)


@pytest.mark.slow
def test_the_last_steps_train_on_every_patch(tmp_path, monkeypatch):
  """With unmasked_final_steps = 2 of 5, steps 1-3 run the patch-dropout step
  and steps 4-5 a second step compiled without it (FLIP's unmasked tuning);
  a run resumed inside the last phase takes the unmasked step at once."""
  real = train.make_train_step
  calls = []  # (patch_dropout, unmasked_final_steps) of the config each training step ran with

  def recording(graphdef, shardings, mesh, c):
    step_fn = real(graphdef, shardings, mesh, c)

    def run(state, batch):
      calls.append((c.model.image.patch_dropout, c.model.image.unmasked_final_steps))
      return step_fn(state, batch)
    run.lower = step_fn.lower  # the loop compiles a step ahead of its first call
    return run

  monkeypatch.setattr(train, "make_train_step", recording)
  c = config(0.5)
  c.total_steps, c.log_every_steps, c.eval_every_steps = 5, 5, 5
  c.checkpoint_every_steps = 4
  c.batch_size = 16
  c.data.num_train, c.data.num_eval = 128, 32
  c.eval.batch_size = 32
  c.model.image.unmasked_final_steps = 2
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(c, workdir)
  assert calls == [(0.5, 2)] * 3 + [(0.0, 0)] * 2
  # Resume from step 4's checkpoint: step 5 is in the unmasked phase.
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "5")
  calls.clear()
  train.train_and_evaluate(c, workdir)
  assert calls == [(0.0, 0)]


@pytest.mark.parametrize("image_size,patch_size,rate,kept", [
    (40, 4, 0.9, 10), (40, 4, 0.8, 20), (32, 4, 0.5, 32), (32, 4, 0.0, 64), (224, 16, 0.75, 49)])
def test_kept_patches_is_the_floor_of_the_kept_share(image_size, patch_size, rate, kept):
  """floor((1 - rate) x patches) exactly: (1 - 0.9) x 100 is 9.999... in floats."""
  image = common.base_config().model.image
  image.image_size, image.patch_size, image.patch_dropout = image_size, patch_size, rate
  assert vit.kept_patches(image) == kept
