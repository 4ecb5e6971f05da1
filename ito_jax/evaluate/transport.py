"""How semantically right R_ot's matching is, on held-out data.

In partially aligned training R_ot transports a batch of unpaired images onto
a batch of unpaired texts; it can only teach the towers something true where
its plan joins images and texts of the same class. Here the held-out split is
cut into two halves, as the training pools are (images of one half, captions
of the other, so no true pair exists), and the entropic plan between them is
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
  half = min(len(labels) // 2, max_points)
  images, image_labels = image_emb[:half], labels[:half]  # [h, D]
  texts, text_labels = text_emb[half:2 * half], labels[half:2 * half]  # [h, D]
  same = image_labels[:, None] == text_labels[None, :]  # [h, h]
  _, plan = ot_lib.wasserstein(jnp.asarray(images), jnp.asarray(texts), cost=cfg.cost,
                               epsilon=cfg.epsilon, num_iterations=cfg.num_iterations)
  plan = np.asarray(plan)
  nearest = np.argmax(images @ texts.T, axis=1)
  return {"transport/plan_class_purity": float(np.sum(plan * same) / np.sum(plan)),
          "transport/nearest_class_purity": float(np.mean(same[np.arange(half), nearest]))}
