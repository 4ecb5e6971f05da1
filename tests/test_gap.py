"""Modality-gap and saturation diagnostics against hand-computed values."""

import jax
import numpy as np
import pytest

from ito_jax.evaluate import gap


def _unit_rows(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------ centroid --------


def test_centroid_distance_is_zero_for_identical_sets():
  x = np.random.default_rng(0).normal(size=(50, 8))
  assert gap.centroid_distance(x, x) == pytest.approx(0.0, abs=1e-12)
  # Order and scale do not matter: same set of directions, permuted and rescaled.
  assert gap.centroid_distance(x, 3.0 * x[::-1]) == pytest.approx(0.0, abs=1e-12)


def test_centroid_distance_of_mirrored_sets():
  # Images at angles ±θ around +x, texts at ±θ around −x: centroids (±cos θ, 0).
  theta = 0.3
  img = np.array([[np.cos(theta), np.sin(theta)], [np.cos(theta), -np.sin(theta)]])
  txt = -img
  # Unnormalised input (different norms per row) is normalised first.
  img_scaled = img * np.array([[2.0], [0.5]])
  assert gap.centroid_distance(img_scaled, txt) == pytest.approx(2 * np.cos(theta))


def test_centroid_distance_of_disjoint_axes():
  img = np.tile([1.0, 0.0, 0.0], (4, 1))
  txt = np.tile([0.0, 5.0, 0.0], (4, 1))
  assert gap.centroid_distance(img, txt) == pytest.approx(np.sqrt(2.0))


# ------------------------------------------------------------ cosines ---------


def test_matched_vs_random_cosine_on_orthonormal_pairs():
  # Pair i is (e_i, e_i): matched cosine 1, any *other* pairing cosine 0, so a
  # random pairing that ever hit its own caption would show up as > 0.
  n = 16
  img = np.eye(n)
  matched, random = gap.matched_vs_random_cosine(img, 2.0 * img, np.random.default_rng(0))
  assert matched == pytest.approx(1.0)
  assert random == pytest.approx(0.0, abs=1e-12)


def test_matched_vs_random_cosine_hand_values():
  # Every text is the image rotated by 60° in its plane; images all distinct
  # directions in separate planes, so random pairs are orthogonal.
  angle = np.pi / 3
  img = np.zeros((3, 6))
  txt = np.zeros((3, 6))
  for i in range(3):
    img[i, 2 * i] = 1.0
    txt[i, 2 * i], txt[i, 2 * i + 1] = np.cos(angle), np.sin(angle)
  matched, random = gap.matched_vs_random_cosine(img, txt, 1)
  assert matched == pytest.approx(0.5)
  assert random == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------ classifier ------


def test_classifier_separates_well_separated_clusters():
  rng = np.random.default_rng(1)
  d = 16
  shift = np.zeros(d)
  shift[0] = 3.0
  img = rng.normal(size=(400, d)) * 0.3 + shift
  txt = rng.normal(size=(400, d)) * 0.3 - shift
  assert gap.modality_classifier_accuracy(img, txt) == 1.0


def test_classifier_separates_when_dimension_exceeds_train_size():
  # 10 train rows per class in 64 dims: the ridge term keeps the solve defined.
  rng = np.random.default_rng(2)
  d = 64
  img = _unit_rows(rng.normal(size=(20, d)) * 0.2 + np.eye(d)[0])
  txt = _unit_rows(rng.normal(size=(20, d)) * 0.2 + np.eye(d)[1])
  assert gap.modality_classifier_accuracy(img, txt) == 1.0


def test_classifier_is_at_chance_for_one_distribution():
  # Both "modalities" drawn from the same distribution. The test set is m = 1000
  # rows per class, independent of the fit, so the balanced accuracy is
  # 0.5 + (p_img - p_txt)/2 with p_* empirical rates of two independent
  # Binomial(m, p)/m: mean 0.5, sd <= sqrt(2 * 0.25 / m) / 2 ≈ 0.011.
  # A 0.05 tolerance is > 4 sd; and it is seed-fixed, so not flaky.
  rng = np.random.default_rng(3)
  img = rng.normal(size=(2000, 16))
  txt = rng.normal(size=(2000, 16))
  acc = gap.modality_classifier_accuracy(img, txt, seed=0)
  assert abs(acc - 0.5) < 0.05
  # A real but partial gap lands in between (not stuck at either end).
  shifted = txt + 1.0 * np.eye(16)[0]  # d-prime ~1: Bayes accuracy ~0.69
  partial = gap.modality_classifier_accuracy(img, shifted, seed=0)
  assert 0.55 < partial < 0.95


def test_classifier_accuracy_is_measured_on_held_out_rows():
  # One distribution again, but 60 + 60 training rows in 128 dims: any such
  # set is linearly separable, so the ridge fit labels its own training rows
  # (almost) perfectly. On the other, independent halves it can only guess:
  # balanced accuracy mean 0.5, sd sqrt(2 * 0.25 / 60) / 2 ≈ 0.046, and 0.2 is
  # > 4 sd (seed-fixed). Scored on the training rows it would read ~1.0.
  rng = np.random.default_rng(4)
  img = rng.normal(size=(120, 128))
  txt = rng.normal(size=(120, 128))
  assert abs(gap.modality_classifier_accuracy(img, txt, seed=0) - 0.5) < 0.2



def test_a_text_that_is_its_image_cannot_be_told_apart():
  """Pairs split apart would put an image in training and its own caption in
  the test half, where the memorised image makes the classifier say "image"
  (0.21 with E = n = 128, not 0.5). Split by pair, identical embeddings read
  exactly chance, and captions at a small distance from their images near it
  (test halves of 250: sd ~0.022, and 0.1 is > 4 sd, seed-fixed)."""
  rng = np.random.default_rng(5)
  img = rng.normal(size=(128, 128))
  assert gap.modality_classifier_accuracy(img, img.copy(), seed=0) == 0.5
  img = rng.normal(size=(500, 128))
  txt = img + 0.1 * rng.normal(size=img.shape)
  assert abs(gap.modality_classifier_accuracy(img, txt, seed=0) - 0.5) < 0.1


# ------------------------------------------------------------ saturation ------


HAND_LOGITS = np.array([
    [10.0, 0.0, 0.0],  # p_pos = e^10 / (e^10 + 2) ≈ 0.99991 > 0.99; margin 10
    [0.0, 1.0, 0.0],   # p_pos = e / (e + 2) ≈ 0.576;               margin 1
    [2.0, 3.0, 0.0],   # p_pos = 1 / (e^2 + e^3 + 1) ≈ 0.035;        margin −3
])


def test_saturation_on_hand_built_logits():
  out = gap.saturation(HAND_LOGITS)
  np.testing.assert_allclose(out['frac_positive_prob_gt_099'], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(out['mean_margin'], (10 + 1 - 3) / 3, rtol=1e-6)


def test_saturation_runs_under_jit_and_the_threshold_sits_at_0_99():
  # Row 0 sits just under the threshold: p_pos = e^a / (e^a + 1) is 0.99 at
  # a = log 99, so a slightly smaller a must not count; row 1 saturates. (Whether
  # exactly 0.99 counts is not pinned: softmax rarely gives it exactly in float32.)
  a = np.log(99.0) - 1e-3
  logits = np.array([[a, 0.0], [0.0, 20.0]], np.float32)
  out = jax.jit(gap.saturation)(logits)
  np.testing.assert_allclose(out['frac_positive_prob_gt_099'], 0.5)
  np.testing.assert_allclose(out['mean_margin'], (a + 20.0) / 2, rtol=1e-6)


# ------------------------------------------------------------ combined --------


def test_gap_metrics_combines_the_parts():
  rng = np.random.default_rng(4)
  img = rng.normal(size=(64, 8)) + 2.0
  txt = img + 0.1 * rng.normal(size=(64, 8))
  metrics = gap.gap_metrics(img, txt)
  assert set(metrics) == {'gap/centroid_distance', 'gap/matched_cosine',
                          'gap/random_cosine', 'gap/modality_classifier_acc'}
  assert metrics['gap/centroid_distance'] == pytest.approx(
      gap.centroid_distance(img, txt))
  assert metrics['gap/modality_classifier_acc'] == pytest.approx(
      gap.modality_classifier_accuracy(img, txt, seed=0))
  assert metrics['gap/matched_cosine'] > metrics['gap/random_cosine']
