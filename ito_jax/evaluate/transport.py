"""How semantically right R_ot's matching is, on held-out data.

In partially aligned training R_ot transports a batch of unpaired images onto
a batch of unpaired texts; it can only teach the towers something true where
its plan joins images and texts of the same class. Here the held-out split is
cut into two random halves, as the training pools are (images of one half,
captions of the other, so no true pair exists), and the entropic plan between them is
scored by the share of its mass on same-class pairs, next to the same share
for each image's nearest caption. Chance is about 1 / number of classes.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np

from ito_jax.losses import ot as ot_lib


def plan_class_purity(image_emb, text_emb, labels, cfg: ml_collections.ConfigDict,
                      max_points: int = 256) -> dict:
  """image_emb, text_emb: [E, D] (image i, one caption of image i); labels [E].
  cfg: the OT solver config (cost, epsilon, num_iterations)."""
  labels = np.asarray(labels)
  half = min(len(labels) // 2, max_points)
  # Halves drawn at random (fixed seed), not by position: a held-out set
  # ordered by class (sorted ids of a converted source) would otherwise put
  # different classes in the two halves and score any model near zero.
  order = np.random.default_rng(0).permutation(len(labels))
  image_rows, text_rows = order[:half], order[half:2 * half]
  images, image_labels = np.asarray(image_emb)[image_rows], labels[image_rows]  # [h, D]
  texts, text_labels = np.asarray(text_emb)[text_rows], labels[text_rows]  # [h, D]
  same = image_labels[:, None] == text_labels[None, :]  # [h, h]
  _, plan = ot_lib.wasserstein(jnp.asarray(images), jnp.asarray(texts), cost=cfg.cost,
                               epsilon=cfg.epsilon, num_iterations=cfg.num_iterations)
  plan = np.asarray(plan)
  nearest = np.argmax(images @ texts.T, axis=1)
  return {"transport/plan_class_purity": float(np.sum(plan * same) / np.sum(plan)),
          "transport/nearest_class_purity": float(np.mean(same[np.arange(half), nearest]))}
