"""Zero-shot classification from class-name prompts."""

from __future__ import annotations

import numpy as np


def class_embeddings(prompt_emb) -> np.ndarray:
  """prompt_emb: [classes, templates, D] -> mean over templates, renormalised [classes, D]."""
  mean = prompt_emb.mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def accuracy(image_emb, class_emb, labels) -> dict:
  """image_emb: [E, D]; class_emb: [classes, D]; labels: [E] int."""
  predictions = np.argmax(image_emb @ class_emb.T, axis=-1)
  return {"zeroshot/accuracy": float(np.mean(predictions == labels)),
          "zeroshot/chance": 1.0 / class_emb.shape[0]}
