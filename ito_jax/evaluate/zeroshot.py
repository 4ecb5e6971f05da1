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


def _harmonic(a: float, b: float) -> float:
  return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _class_mean(right: np.ndarray, labels: np.ndarray) -> float:
  """Mean over the classes present of each class's accuracy; nan for none."""
  classes = np.unique(labels)
  return float(np.mean([right[labels == c].mean() for c in classes])) if classes.size else float("nan")


def accuracy_by_group(image_emb, class_emb, labels, unseen_classes) -> dict:
  """Generalised zero-shot accuracy: every image is classified among *all*
  classes, and accuracy is reported over images of seen and of unseen classes
  apart, with their harmonic mean. Two averages of each:

  * `{seen,unseen}_accuracy`, `harmonic_mean`: over images;
  * `{seen,unseen}_class_mean_accuracy`, `class_mean_harmonic_mean`: the mean of
    per-class accuracies, the GZSL benchmarks' convention (Xian et al., 2018),
    so a frequent class counts no more than a rare one.
  """
  right = correct(image_emb, class_emb, labels)
  labels = np.asarray(labels)
  unseen = np.isin(labels, np.asarray(unseen_classes, dtype=labels.dtype))
  seen_acc = float(np.mean(right[~unseen])) if (~unseen).any() else float("nan")
  unseen_acc = float(np.mean(right[unseen])) if unseen.any() else float("nan")
  seen_cls = _class_mean(right[~unseen], labels[~unseen])
  unseen_cls = _class_mean(right[unseen], labels[unseen])
  return {"zeroshot/seen_accuracy": seen_acc, "zeroshot/unseen_accuracy": unseen_acc,
          "zeroshot/harmonic_mean": _harmonic(seen_acc, unseen_acc),
          "zeroshot/seen_class_mean_accuracy": seen_cls,
          "zeroshot/unseen_class_mean_accuracy": unseen_cls,
          "zeroshot/class_mean_harmonic_mean": _harmonic(seen_cls, unseen_cls)}
