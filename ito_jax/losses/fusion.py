"""The two L_fuse losses of ITO (README, "Objective"): ITM and fused anchor.

Convention for every [B, B] matrix here: row i is image i, column j is text j,
and the true pairs are on the diagonal.

Each loss is split into the part that calls the head and a pure function of
logits/embeddings (`itm_loss_from_logits`, `anchor_loss`), so the math can be
checked against a hand computation without a model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _at_least_f32(x):
  """Loss math runs in float32 at least (bf16 logits are upcast, f64 kept)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def mine_hard_negatives(similarity):
  """Hardest off-diagonal partner of every image and every text.

  similarity: [B, B], row = image, column = text (contrastive scores). Mining
  is done under `stop_gradient`: it only picks indices, and the contrastive
  loss already owns the gradient of these scores.

  Returns (neg_text_for_image [B] int32, neg_image_for_text [B] int32):
  neg_text_for_image[i] = argmax_{j != i} S[i, j] and
  neg_image_for_text[j] = argmax_{i != j} S[i, j].
  """
  if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
    raise ValueError(
        f'mine_hard_negatives needs a square [B, B] similarity, got shape '
        f'{similarity.shape}.')
  batch = similarity.shape[0]
  if batch < 2:
    raise ValueError(
        f'mine_hard_negatives needs a batch of at least 2 to find a negative, '
        f'got B={batch} (per fusion-loss call).')
  sim = jax.lax.stop_gradient(similarity).astype(jnp.float32)
  # The lowest finite value rather than -inf keeps argmax well defined. A row
  # with no finite off-diagonal entry would pick the diagonal, the positive
  # itself: callers that mask entries with -inf (sharded.mine_in_pools) must
  # leave every sample another candidate.
  off_diagonal = jnp.where(
      jnp.eye(batch, dtype=bool), jnp.finfo(jnp.float32).min, sim)
  neg_text_for_image = jnp.argmax(off_diagonal, axis=1).astype(jnp.int32)
  neg_image_for_text = jnp.argmax(off_diagonal, axis=0).astype(jnp.int32)
  return neg_text_for_image, neg_image_for_text


def itm_loss_from_logits(pos_logits, neg_logits):
  """Class-balanced binary cross-entropy: pos_logits [B] (label 1), neg [2B] (label 0).

  Positives and negatives each carry half the loss. With the raw 1:2 ratio the
  loss would be minimised by a prior that leans towards "no match" (a constant
  logit of -log 2, scoring 2/3 accuracy without looking at the pair); balancing
  makes logit 0 the decision boundary and log 2 the value of a blind head,
  however many negatives are mined. `itm_accuracy` is balanced the same way,
  so 0.5 is chance.
  """
  pos_logits = _at_least_f32(pos_logits)
  neg_logits = _at_least_f32(neg_logits)
  # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x).
  pos_loss = jnp.mean(jax.nn.softplus(-pos_logits))
  neg_loss = jnp.mean(jax.nn.softplus(neg_logits))
  accuracy = 0.5 * (jnp.mean(pos_logits > 0) + jnp.mean(neg_logits <= 0))
  aux = {
      'itm_accuracy': accuracy,
      'itm_pos_loss': pos_loss,
      'itm_neg_loss': neg_loss,
  }
  return 0.5 * (pos_loss + neg_loss), aux


def itm_loss(head, text_tokens, text_mask, image_tokens, similarity):
  """Image–text matching through the fusion head on true pairs and hard negatives.

  text_tokens [B,T,Dt], text_mask [B,T] bool, image_tokens [B,P,Dv],
  similarity [B,B] (image rows, text columns). The head sees 3B pairs in one
  call: (image i, text i) label 1; (image i, hardest text for i) and
  (hardest image for text j, text j) label 0. aux['fused_positive'] [B, width]
  holds the true pairs' fused vectors.
  """
  neg_text, neg_image = mine_hard_negatives(similarity)  # [B], [B]
  texts = jnp.concatenate(
      [text_tokens, text_tokens[neg_text], text_tokens], axis=0)  # [3B,T,Dt]
  masks = jnp.concatenate(
      [text_mask, text_mask[neg_text], text_mask], axis=0)  # [3B,T]
  images = jnp.concatenate(
      [image_tokens, image_tokens, image_tokens[neg_image]], axis=0)  # [3B,P,Dv]
  fused = head(texts, masks, images)  # [3B, width]
  logits = head.match_logit(fused)  # [3B]
  batch = text_tokens.shape[0]
  loss, aux = itm_loss_from_logits(logits[:batch], logits[batch:])
  # The true pairs' fused vectors, so the anchor loss need not run the head again.
  aux['fused_positive'] = fused[:batch]
  return loss, aux


def _symmetric_info_nce(logits):
  """Mean of row-wise and column-wise cross-entropy with diagonal targets, [B,B] -> []."""
  logits = _at_least_f32(logits)
  diagonal = jnp.diagonal(logits)
  rows = jax.nn.logsumexp(logits, axis=1) - diagonal
  cols = jax.nn.logsumexp(logits, axis=0) - diagonal
  return 0.5 * (jnp.mean(rows) + jnp.mean(cols))


def anchor_pull(image_emb, text_emb, anchor):
  """Mean (1 - cos) of image and of text embeddings [B, E] to their own anchor."""
  image_emb, text_emb, anchor = (_at_least_f32(x) for x in (image_emb, text_emb, anchor))
  return 0.5 * (jnp.mean(1.0 - jnp.sum(image_emb * anchor, axis=-1)) +
                jnp.mean(1.0 - jnp.sum(text_emb * anchor, axis=-1)))


def anchor_loss(image_emb, text_emb, anchor, temperature, pull_weight=0.0):
  """Both modalities contrasted against the fused anchor as a shared target.

  image_emb, text_emb, anchor: [B, E], already L2-normalised (dot products are
  cosines). temperature: scalar scale on the cosine logits (CLIP's exp(t)).

  Anchor i is the positive for image i and text i; the other anchors of the
  batch are negatives, in both directions (embedding->anchors and
  anchor->embeddings). The anchor is not stop-gradiented: the head's
  projection has to learn a target both towers can reach, and the negatives
  keep it from collapsing.

  InfoNCE is invariant to a constant offset between the image and the text
  embeddings (it only ranks similarities), so on its own it cannot close the
  modality gap. `pull_weight` adds mean(1 - cos) of each embedding to its own
  anchor: both modalities are drawn onto one shared point per sample, which
  removes the offset.
  """
  anchor = _at_least_f32(anchor)
  scale = _at_least_f32(temperature)
  image_emb, text_emb = _at_least_f32(image_emb), _at_least_f32(text_emb)
  image_logits = scale * (image_emb @ anchor.T)  # [B, B]
  text_logits = scale * (text_emb @ anchor.T)  # [B, B]
  image_loss = _symmetric_info_nce(image_logits)
  text_loss = _symmetric_info_nce(text_logits)
  pull = anchor_pull(image_emb, text_emb, anchor)
  aux = {'anchor_image_loss': image_loss, 'anchor_text_loss': text_loss, 'anchor_pull': pull}
  return 0.5 * (image_loss + text_loss) + pull_weight * pull, aux
