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


def accuracy_by_group(image_emb, class_emb, labels, unseen_classes) -> dict:
  """Generalised zero-shot accuracy: every image is classified among *all*
  classes, and accuracy is reported over images of seen and of unseen classes
  apart, with their harmonic mean (the usual GZSL summary)."""
  predictions = np.argmax(image_emb @ class_emb.T, axis=-1)
  correct = predictions == labels
  unseen = np.isin(labels, np.asarray(unseen_classes, dtype=np.asarray(labels).dtype))
  seen_acc = float(np.mean(correct[~unseen])) if (~unseen).any() else float("nan")
  unseen_acc = float(np.mean(correct[unseen])) if unseen.any() else float("nan")
  harmonic = 0.0 if seen_acc + unseen_acc == 0 else 2 * seen_acc * unseen_acc / (seen_acc + unseen_acc)
  return {"zeroshot/seen_accuracy": seen_acc, "zeroshot/unseen_accuracy": unseen_acc,
          "zeroshot/harmonic_mean": harmonic}
