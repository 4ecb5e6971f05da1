"""Image<->text retrieval recall@K on a held-out set where each image has C captions."""

from __future__ import annotations

import numpy as np


def ranks(image_emb, caption_emb) -> tuple[np.ndarray, np.ndarray]:
  """0-based ranks: of each image's best-ranked true caption [E], and of each
  caption's image [E*C] (caption c of image i at i*C + c)."""
  num_images, num_captions = caption_emb.shape[:2]
  captions = caption_emb.reshape(num_images * num_captions, -1)  # [E*C, D]
  caption_owner = np.repeat(np.arange(num_images), num_captions)  # [E*C]
  sim = image_emb @ captions.T  # [E, E*C]

  # Rank of the best-ranked true caption for each image.
  order = np.argsort(-sim, axis=1)
  hits = caption_owner[order] == np.arange(num_images)[:, None]  # [E, E*C]
  i2t_rank = hits.argmax(axis=1)
  # Rank of the true image for each caption.
  order_t = np.argsort(-sim.T, axis=1)  # [E*C, E]
  t2i_rank = (order_t == caption_owner[:, None]).argmax(axis=1)
  return i2t_rank, t2i_rank


def recall_at_k(image_emb, caption_emb, ks=(1, 5, 10)) -> dict:
  """image_emb: [E, D]; caption_emb: [E, C, D] (caption c of image i), both
  L2-normalised. An image query is correct at K if any of its captions ranks
  in the top K; a caption query is correct if its image does."""
  num_images = caption_emb.shape[0]
  i2t_rank, t2i_rank = ranks(image_emb, caption_emb)
  out = {}
  for k in ks:
    out[f"retrieval/i2t_r{k}"] = float(np.mean(i2t_rank < k))
    out[f"retrieval/t2i_r{k}"] = float(np.mean(t2i_rank < k))
  # Under a random ranking both directions hit at rank 1 with probability 1/E.
  out["retrieval/r1_chance"] = 1.0 / num_images
  return out


def recall_by_group(image_emb, caption_emb, labels, unseen_classes, ks=(1,)) -> dict:
  """recall@K over the queries of seen and of unseen classes apart, each
  against the whole gallery (images/captions of every class), as in
  generalised zero-shot evaluation. labels: [E], the class of image i and of
  its captions."""
  num_captions = caption_emb.shape[1]
  i2t_rank, t2i_rank = ranks(image_emb, caption_emb)
  unseen = np.isin(labels, np.asarray(unseen_classes, dtype=np.asarray(labels).dtype))  # [E]
  caption_unseen = np.repeat(unseen, num_captions)  # [E*C]
  out = {}
  for group, image_mask, caption_mask in (("seen", ~unseen, ~caption_unseen),
                                          ("unseen", unseen, caption_unseen)):
    for k in ks:
      out[f"retrieval/{group}_i2t_r{k}"] = (
          float(np.mean(i2t_rank[image_mask] < k)) if image_mask.any() else float("nan"))
      out[f"retrieval/{group}_t2i_r{k}"] = (
          float(np.mean(t2i_rank[caption_mask] < k)) if caption_mask.any() else float("nan"))
  return out
