"""Image<->text retrieval recall@K on a held-out set where each image has C captions.

`gallery` = N > 0 cuts the set into consecutive galleries of N images (with
their captions) and ranks every query within its own gallery only, as COCO's
"1K test" averages five folds of its 5K images: recall at a fixed gallery size,
measured over more queries than one gallery holds. 0 ranks against the whole set.
"""

from __future__ import annotations

import numpy as np


def ranks(image_emb, caption_emb) -> tuple[np.ndarray, np.ndarray]:
  """0-based ranks: of each image's best-ranked true caption [E], and of each
  caption's image [E*C] (caption c of image i at i*C + c).

  A rank is the number of wrong candidates scoring at least as high as the
  true one: ties count against the query. Identical captions of different
  images (templated captions repeat) therefore give neither image a hit at
  rank 0, and a collapsed model scores 0, not whatever a sort's tie order
  would hand it."""
  num_images, num_captions = caption_emb.shape[:2]
  captions = caption_emb.reshape(num_images * num_captions, -1)  # [E*C, D]
  caption_owner = np.repeat(np.arange(num_images), num_captions)  # [E*C]
  sim = image_emb @ captions.T  # [E, E*C]
  true = caption_owner[None, :] == np.arange(num_images)[:, None]  # [E, E*C]

  best_true = sim.reshape(num_images, num_images, num_captions)[np.arange(num_images), np.arange(num_images)]
  best_true = best_true.max(axis=1)  # [E]: each image's best true caption
  i2t_rank = np.sum((sim >= best_true[:, None]) & ~true, axis=1)
  true_image = sim[caption_owner, np.arange(num_images * num_captions)]  # [E*C]
  t2i_rank = np.sum((sim >= true_image[None, :]) & ~true, axis=0)
  return i2t_rank, t2i_rank


def check_gallery(gallery: int, num_images: int) -> None:
  """Raises unless `gallery` is 0 or cuts `num_images` into equal galleries."""
  if gallery < 0 or (gallery and num_images % gallery):
    raise ValueError(f"eval.retrieval_gallery: {gallery} does not divide the {num_images} "
                     "held-out images into equal galleries (0 ranks against all of them)")


def gallery_ranks(image_emb, caption_emb, gallery: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`ranks` within consecutive galleries of `gallery` images (0: one gallery of
  all E), concatenated in query order: [E] and [E*C]."""
  num_images = caption_emb.shape[0]
  check_gallery(gallery, num_images)
  if gallery == 0:
    return ranks(image_emb, caption_emb)
  parts = [ranks(image_emb[s:s + gallery], caption_emb[s:s + gallery])
           for s in range(0, num_images, gallery)]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def recall_at_k(image_emb, caption_emb, ks=(1, 5, 10), gallery: int = 0) -> dict:
  """image_emb: [E, D]; caption_emb: [E, C, D] (caption c of image i), both
  L2-normalised. An image query is correct at K if any of its captions ranks
  in the top K; a caption query is correct if its image does. `gallery`: see
  the module doc."""
  num_images = gallery or caption_emb.shape[0]
  i2t_rank, t2i_rank = gallery_ranks(image_emb, caption_emb, gallery)
  out = {}
  for k in ks:
    out[f"retrieval/i2t_r{k}"] = float(np.mean(i2t_rank < k))
    out[f"retrieval/t2i_r{k}"] = float(np.mean(t2i_rank < k))
  # Under a random ranking both directions hit at rank 1 with probability 1/E.
  out["retrieval/r1_chance"] = 1.0 / num_images
  return out


def recall_by_group(image_emb, caption_emb, labels, unseen_classes, ks=(1,), gallery: int = 0) -> dict:
  """recall@K over the queries of seen and of unseen classes apart, each
  against its whole gallery (images/captions of every class), as in
  generalised zero-shot evaluation. labels: [E], the class of image i and of
  its captions."""
  num_captions = caption_emb.shape[1]
  i2t_rank, t2i_rank = gallery_ranks(image_emb, caption_emb, gallery)
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
