"""Contrastive alignment losses over multiple views (ITO's *multiple alignment*).

A batch holds B samples with M image views and N text views each. Every
(image view of sample i, text view of sample j) pair is a logit and pairs with
i == j are positives. With M = N = 1 both losses are exactly CLIP's symmetric
InfoNCE and SigLIP's sigmoid loss.

The losses are written over *rows* (anchors) scored against *columns*
(candidates) with per-row/column sample ids, so the sharded variants in
`ito_jax.losses.sharded` reuse them on device-local rows against gathered
columns without a global [B, B] buffer on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def similarity(rows, columns):
  """rows @ columns.T accumulated in at least float32 (bf16 inputs stay exact enough)."""
  out_dtype = jnp.promote_types(rows.dtype, jnp.float32)
  return jnp.dot(rows, columns.T, preferred_element_type=out_dtype)


def flatten_views(emb):
  """[batch, views, dim] -> ([batch*views, dim], sample ids [batch*views])."""
  b, v, d = emb.shape
  ids = jnp.repeat(jnp.arange(b), v)
  return emb.reshape(b * v, d), ids


def multi_positive_nce(anchors, candidates, anchor_ids, candidate_ids, scale):
  """Mean over anchors of the mean −log softmax probability of their positives.

  anchors: [R, dim], candidates: [C, dim] (L2-normalised), ids: [R], [C].
  Every anchor must have at least one positive among the candidates.
  """
  logits = scale * similarity(anchors, candidates)  # [R, C]
  log_p = jax.nn.log_softmax(logits, axis=-1)
  positive = anchor_ids[:, None] == candidate_ids[None, :]  # [R, C]
  per_anchor = -jnp.sum(jnp.where(positive, log_p, 0.0), axis=-1) / jnp.sum(positive, axis=-1)
  return jnp.mean(per_anchor)


def sigmoid_pair_loss_sum(rows, columns, row_ids, column_ids, scale, bias):
  """Σ −log σ(z_ij · (scale·cos_ij + bias)) with z = +1 on same-sample pairs, −1 otherwise."""
  logits = scale * similarity(rows, columns) + bias  # [R, C]
  labels = jnp.where(row_ids[:, None] == column_ids[None, :], 1.0, -1.0)
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def softmax_loss(image_emb, text_emb, scale):
  """Multi-positive symmetric InfoNCE.

  image_emb: [B, M, dim], text_emb: [B, N, dim], L2-normalised; scale: exp(t).
  """
  images, image_ids = flatten_views(image_emb)
  texts, text_ids = flatten_views(text_emb)
  i2t = multi_positive_nce(images, texts, image_ids, text_ids, scale)
  t2i = multi_positive_nce(texts, images, text_ids, image_ids, scale)
  return 0.5 * (i2t + t2i)


def sigmoid_loss(image_emb, text_emb, scale, bias):
  """SigLIP with +1 labels on same-sample pairs, normalised per image row
  (for M = 1 that is SigLIP's per-example normalisation)."""
  images, image_ids = flatten_views(image_emb)
  texts, text_ids = flatten_views(text_emb)
  return sigmoid_pair_loss_sum(images, texts, image_ids, text_ids, scale, bias) / images.shape[0]


def alignment_loss(name: str, image_emb, text_emb, scale, bias):
  if name == "softmax":
    return softmax_loss(image_emb, text_emb, scale)
  if name == "sigmoid":
    return sigmoid_loss(image_emb, text_emb, scale, bias)
  raise ValueError(f"config.loss.name: unknown loss {name!r}")
