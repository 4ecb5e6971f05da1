"""Modality-gap and saturation diagnostics on embedding arrays (no model).

ITO claims that training-time fusion removes the modality gap (image and text
embeddings living in separate regions of the sphere) and keeps contrastive
training from saturating early. These functions measure both:

* the gap metrics are host-side NumPy (float64) on evaluation embeddings
  `img [n, E]`, `txt [n, E]` (row i of each is a true pair) and return floats;
  inputs are L2-normalised here, so raw tower outputs may be passed.
* `saturation` is written in jax.numpy so the train step can log it from the
  batch logits inside `jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _unit(x):
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f'embeddings must be [n, E], got shape {x.shape}.')
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def centroid_distance(img, txt) -> float:
  """‖mean(img) − mean(txt)‖ of the L2-normalised embeddings; 0 means no gap."""
  img, txt = _unit(img), _unit(txt)
  return float(np.linalg.norm(img.mean(axis=0) - txt.mean(axis=0)))


def matched_vs_random_cosine(img, txt, rng) -> tuple[float, float]:
  """(mean cosine of true pairs, mean cosine of random non-matching pairs).

  rng: a `np.random.Generator` or an int seed. Image i is paired with text
  (i + k_i) mod n, k_i uniform in [1, n-1]: a uniformly random partner that is
  never its own caption.
  """
  img, txt = _unit(img), _unit(txt)
  n = img.shape[0]
  if txt.shape != img.shape or n < 2:
    raise ValueError(
        f'matched_vs_random_cosine needs paired [n, E] arrays with n >= 2, got '
        f'{img.shape} and {txt.shape}.')
  rng = np.random.default_rng(rng)
  partner = (np.arange(n) + rng.integers(1, n, size=n)) % n
  matched = np.sum(img * txt, axis=1)
  random = np.sum(img * txt[partner], axis=1)
  return float(matched.mean()), float(random.mean())


def _split_half(x, order):
  half = x.shape[0] // 2
  return x[order[:half]], x[order[half:]]


def modality_classifier_accuracy(img, txt, *, seed=0, ridge=1e-4) -> float:
  """Held-out accuracy of a linear classifier telling images from texts.

  Each modality is split 50/50 (train/test) with `seed`. Arrays with as many
  rows are taken as pairs (row i of `txt` captions row i of `img`, as
  gap_metrics passes them) and split by one order, so that no text is scored
  against the classifier that saw its own image in training: with the pairs
  split apart, a memorised image labels its nearby caption "image" and a
  small gap reads well below 0.5 (identical embeddings read 0.21 at n = 128,
  E = 128). The classifier is
  ridge least squares on ±1 labels (Fisher's linear discriminant up to
  scale): closed form, so deterministic with no step size to tune. The ridge
  term, relative to the train size, keeps the solve well posed when the
  embeddings are rank deficient or E exceeds the train size. The reported
  accuracy is class-balanced: 1.0 = fully separable (a large gap), 0.5 = the
  modalities are indistinguishable.
  """
  img, txt = _unit(img), _unit(txt)
  if min(img.shape[0], txt.shape[0]) < 2:
    raise ValueError('modality_classifier_accuracy needs >= 2 rows per modality.')
  rng = np.random.default_rng(seed)
  img_order = rng.permutation(img.shape[0])
  txt_order = img_order if txt.shape[0] == img.shape[0] else rng.permutation(txt.shape[0])
  img_train, img_test = _split_half(img, img_order)
  txt_train, txt_test = _split_half(txt, txt_order)
  x = np.concatenate([img_train, txt_train])  # [n_train, E]
  y = np.concatenate([np.ones(len(img_train)), -np.ones(len(txt_train))])
  x_mean, y_mean = x.mean(axis=0), y.mean()
  xc = x - x_mean
  gram = xc.T @ xc + ridge * len(x) * np.eye(x.shape[1])
  w = np.linalg.solve(gram, xc.T @ (y - y_mean))  # [E]

  def says_image(z):
    return (z - x_mean) @ w + y_mean > 0

  return float(0.5 * (says_image(img_test).mean() + (~says_image(txt_test)).mean()))


def saturation(logits):
  """How saturated the image→text softmax is, from a [B, B] logit matrix.

  Rows are images, columns texts, true pairs on the diagonal. Returns
  `frac_positive_prob_gt_099`: share of rows whose positive gets > 0.99 of the
  row softmax; `mean_margin`: mean over rows of (positive logit − hardest
  negative logit). Both as jnp scalars; jit-safe.
  """
  logits = jnp.asarray(logits, jnp.float32)
  batch = logits.shape[0]
  if logits.ndim != 2 or logits.shape[1] != batch or batch < 2:
    raise ValueError(f'saturation needs a square [B, B] logit matrix with B >= 2, '
                     f'got shape {logits.shape}.')
  positive = jnp.diagonal(logits)  # [B]
  positive_prob = jnp.diagonal(jax.nn.softmax(logits, axis=1))  # [B]
  negatives = jnp.where(jnp.eye(batch, dtype=bool), -jnp.inf, logits)
  margin = positive - jnp.max(negatives, axis=1)  # [B]
  return {
      'frac_positive_prob_gt_099': jnp.mean(positive_prob > 0.99),
      'mean_margin': jnp.mean(margin),
  }


def gap_metrics(img, txt, *, seed=0) -> dict:
  """All gap diagnostics for paired evaluation embeddings, as `gap/...` floats."""
  matched, random = matched_vs_random_cosine(img, txt, seed)
  return {
      'gap/centroid_distance': centroid_distance(img, txt),
      'gap/matched_cosine': matched,
      'gap/random_cosine': random,
      'gap/modality_classifier_acc': modality_classifier_accuracy(
          img, txt, seed=seed),
  }
