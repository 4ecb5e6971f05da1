"""Generalised zero-shot evaluation in partially aligned mode (issue 4):
zero-shot accuracy, retrieval and transport purity split by seen and unseen
classes, by hand and through the Evaluator."""

import numpy as np
import pytest

from ito_jax import sharding, train
from ito_jax.data import pipeline
from ito_jax.evaluate import evaluator, retrieval, transport, zeroshot
from ito_jax.losses import ot as ot_lib

from partial_helpers import UNSEEN, data_config


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
  # Per class: seen classes 1, 2, 3 are 1, 0 and 2/3 right -> 5/9, not 3/5 over images.
  assert out["zeroshot/seen_class_mean_accuracy"] == pytest.approx(5 / 9)
  assert out["zeroshot/unseen_class_mean_accuracy"] == pytest.approx(1.0)
  assert out["zeroshot/class_mean_harmonic_mean"] == pytest.approx(2 * (5 / 9) / (1 + 5 / 9))



def test_a_zero_shot_tie_counts_against_the_image():
  """As retrieval's ranks do: a collapsed model, every image equally close to
  every class, classifies nothing right (argmax would credit class 0's
  images), and a tie between the own class and another is a miss."""
  class_emb = np.eye(3, dtype=np.float32)
  labels = np.array([0, 0, 1, 2])
  collapsed = np.full((4, 3), 1 / np.sqrt(3), np.float32)
  assert zeroshot.accuracy(collapsed, class_emb, labels)["zeroshot/accuracy"] == 0.0
  out = zeroshot.accuracy_by_group(collapsed, class_emb, labels, (0,))
  assert (out["zeroshot/seen_accuracy"], out["zeroshot/unseen_accuracy"]) == (0.0, 0.0)
  between = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]], np.float32)  # images 0, 2 tie
  assert zeroshot.accuracy(between, class_emb, labels)["zeroshot/accuracy"] == 0.5  # 1 and 3


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


def test_evaluator_reports_seen_and_unseen_keys(partial_data, monkeypatch):
  data_dir, _, tok = partial_data
  c = data_config(data_dir)
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
