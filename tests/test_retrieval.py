"""Retrieval recall@K over fixed-size galleries (eval.retrieval_gallery)."""

import numpy as np
import pytest

from configs import common, tiny_cpu
from ito_jax.evaluate import evaluator, retrieval


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_gallery_ranks_each_query_within_its_own_gallery_by_hand():
  # Four images, one caption each, in galleries {0, 1} and {2, 3}. Caption 2
  # sits closest to image 0 and caption 0 closest to image 2; every other image
  # is nearest its own caption. Against all four, images 0 and 2 miss at rank 1;
  # within their own gallery each finds its caption.
  image = np.eye(4, dtype=np.float32)
  caption = _unit(np.array([[0.5, 0, 0.9, 0], [0, 1, 0, 0], [0.9, 0, 0.5, 0], [0, 0, 0, 1]],
                           np.float32))[:, None]
  whole = retrieval.recall_at_k(image, caption, ks=(1,))
  assert whole["retrieval/i2t_r1"] == 0.5 and whole["retrieval/t2i_r1"] == 0.5
  assert whole["retrieval/r1_chance"] == 0.25
  split = retrieval.recall_at_k(image, caption, ks=(1,), gallery=2)
  assert split["retrieval/i2t_r1"] == 1.0 and split["retrieval/t2i_r1"] == 1.0
  assert split["retrieval/r1_chance"] == 0.5
  by_group = retrieval.recall_by_group(image, caption, np.array([0, 1, 2, 3]), (2,), gallery=2)
  assert by_group["retrieval/unseen_i2t_r1"] == 1.0
  assert retrieval.recall_by_group(image, caption, np.array([0, 1, 2, 3]), (2,))[
      "retrieval/unseen_i2t_r1"] == 0.0


def test_gallery_ranks_are_the_ranks_of_each_slice():
  rng = np.random.default_rng(0)
  image = _unit(rng.normal(size=(12, 8)).astype(np.float32))
  caption = _unit(rng.normal(size=(12, 3, 8)).astype(np.float32))
  i2t, t2i = retrieval.gallery_ranks(image, caption, gallery=4)
  for g in range(3):
    want_i2t, want_t2i = retrieval.ranks(image[4 * g:4 * g + 4], caption[4 * g:4 * g + 4])
    np.testing.assert_array_equal(i2t[4 * g:4 * g + 4], want_i2t)
    np.testing.assert_array_equal(t2i[12 * g:12 * g + 12], want_t2i)  # 4 images x 3 captions
  for got, want in zip(retrieval.gallery_ranks(image, caption, gallery=12), retrieval.ranks(image, caption)):
    np.testing.assert_array_equal(got, want)
  assert retrieval.recall_at_k(image, caption, gallery=12) == retrieval.recall_at_k(image, caption)


def _sorted_ranks(image, caption):
  """The ranks by sorting every row, for data without ties."""
  num_images, num_captions = caption.shape[:2]
  owner = np.repeat(np.arange(num_images), num_captions)
  sim = image @ caption.reshape(num_images * num_captions, -1).T
  i2t = (owner[np.argsort(-sim, axis=1)] == np.arange(num_images)[:, None]).argmax(axis=1)
  t2i = (np.argsort(-sim.T, axis=1) == owner[:, None]).argmax(axis=1)
  return i2t, t2i


def test_ranks_are_those_of_a_sort_when_nothing_ties():
  rng = np.random.default_rng(1)
  image = _unit(rng.normal(size=(40, 8)))
  caption = _unit(rng.normal(size=(40, 3, 8)))
  for got, want in zip(retrieval.ranks(image, caption), _sorted_ranks(image, caption)):
    np.testing.assert_array_equal(got, want)


def test_ties_count_against_the_query():
  """Captions 0 and 1 are one text (identical embeddings), so image 0's own
  caption ties with image 1's: rank 1, not the 0 a sort could hand it. Images
  2 and 3 are identical, so caption 2 ties between them: rank 1 too. A
  collapsed model scores 0 at every K below the gallery size."""
  image = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1], [0, 0, 1]], np.float64)
  caption = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], np.float64)[:, None]
  # Similarities, image rows x caption columns:
  #   [1, 1, 0, 0], [.6, .6, 0, .8], [0, 0, 1, 0], [0, 0, 1, 0]
  i2t, t2i = retrieval.ranks(image, caption)
  np.testing.assert_array_equal(i2t, [1, 2, 0, 3])
  np.testing.assert_array_equal(t2i, [0, 1, 1, 3])
  collapsed = retrieval.recall_at_k(np.ones((5, 2)) / 2 ** 0.5, np.ones((5, 1, 2)) / 2 ** 0.5, ks=(1, 4))
  assert collapsed["retrieval/i2t_r1"] == collapsed["retrieval/t2i_r1"] == 0.0
  assert collapsed["retrieval/i2t_r4"] == collapsed["retrieval/t2i_r4"] == 0.0


def test_a_gallery_that_does_not_divide_the_split_is_an_error():
  image = np.eye(4, dtype=np.float32)
  with pytest.raises(ValueError, match="eval.retrieval_gallery: 3 does not divide the 4"):
    retrieval.recall_at_k(image, image[:, None], gallery=3)
  config = tiny_cpu.get_config()
  config.data.num_eval = 500
  config.eval.retrieval_gallery = 300
  with pytest.raises(ValueError, match="eval.retrieval_gallery.*does not divide data.num_eval = 500"):
    common.validate(config, num_devices=1)
  config.eval.retrieval_gallery = 250
  common.validate(config, num_devices=1)


def test_the_evaluator_rejects_a_gallery_that_does_not_divide_its_eval_set_before_training():
  # A converted eval source is not sized by the config, so validate() cannot check it.
  config = tiny_cpu.get_config()
  config.eval.retrieval_gallery = 4
  eval_data = {"images": np.zeros((6, 8, 8, 3), np.uint8), "tokens": np.zeros((6, 2, 5), np.int32),
               "labels": np.zeros(6, np.int32)}
  with pytest.raises(ValueError, match="eval.retrieval_gallery: 4 does not divide the 6"):
    evaluator.Evaluator(config, eval_data, ["a", "b"], tokenizer=None)
