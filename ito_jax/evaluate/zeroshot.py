"""Zero-shot classification from class-name prompts."""

from __future__ import annotations

import numpy as np


def class_embeddings(prompt_emb) -> np.ndarray:
  """prompt_emb: [classes, templates, D] -> mean over templates, renormalised [classes, D]."""
  mean = prompt_emb.mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def correct(image_emb, class_emb, labels) -> np.ndarray:
  """[E] bool: the image's own class scores strictly above every other class.
  A tie counts against the image, as in retrieval's ranks: argmax would give
  it to the lowest class index, so a collapsed model would score that class's
  share instead of zero."""
  scores = image_emb @ class_emb.T  # [E, classes]
  labels = np.asarray(labels)
  own = np.take_along_axis(scores, labels[:, None], axis=1)  # [E, 1]
  return np.sum(scores >= own, axis=1) == 1


def accuracy(image_emb, class_emb, labels) -> dict:
  """image_emb: [E, D]; class_emb: [classes, D]; labels: [E] int."""
  return {"zeroshot/accuracy": float(np.mean(correct(image_emb, class_emb, labels))),
          "zeroshot/chance": 1.0 / class_emb.shape[0]}


def accuracy_by_group(image_emb, class_emb, labels, unseen_classes) -> dict:
  """Generalised zero-shot accuracy: every image is classified among *all*
  classes, and accuracy is reported over images of seen and of unseen classes
  apart, with their harmonic mean (the usual GZSL summary)."""
  right = correct(image_emb, class_emb, labels)
  unseen = np.isin(labels, np.asarray(unseen_classes, dtype=np.asarray(labels).dtype))
  seen_acc = float(np.mean(right[~unseen])) if (~unseen).any() else float("nan")
  unseen_acc = float(np.mean(right[unseen])) if unseen.any() else float("nan")
  harmonic = 0.0 if seen_acc + unseen_acc == 0 else 2 * seen_acc * unseen_acc / (seen_acc + unseen_acc)
  return {"zeroshot/seen_accuracy": seen_acc, "zeroshot/unseen_accuracy": unseen_acc,
          "zeroshot/harmonic_mean": harmonic}
