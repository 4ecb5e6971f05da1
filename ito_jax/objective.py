"""The training objective L = L_align + λ_itm·L_itm + λ_anchor·L_anchor (+ λ_ot·R_ot).

One function for every experiment: CLIP, SigLIP, ITO and the OT variants are
selected by config, never by forking the trainer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ito_jax.evaluate import gap
from ito_jax.losses import contrastive
from ito_jax.losses import fusion as fusion_losses
from ito_jax.models.ito import ItoModel


def embed_batch(model: ItoModel, batch: dict):
  """Runs both towers over all views.

  batch['images']: [B, M, H, W, 3]; batch['tokens']: [B, N, L].
  Returns image_emb [B, M, E], text_emb [B, N, E] and the view-0 token sequences.
  """
  images, tokens = batch["images"], batch["tokens"]
  b, m = images.shape[:2]
  n = tokens.shape[1]
  image_emb, image_tokens = model.image_features(images.reshape(b * m, *images.shape[2:]))
  text_emb, text_tokens, text_mask = model.text_features(tokens.reshape(b * n, tokens.shape[2]))
  return dict(
      image_emb=image_emb.reshape(b, m, -1),  # [B, M, E]
      text_emb=text_emb.reshape(b, n, -1),  # [B, N, E]
      image_tokens=image_tokens.reshape(b, m, *image_tokens.shape[1:])[:, 0],  # [B, P, Dv]
      text_tokens=text_tokens.reshape(b, n, *text_tokens.shape[1:])[:, 0],  # [B, L, Dt]
      text_mask=text_mask.reshape(b, n, -1)[:, 0],  # [B, L]
  )


def compute_loss(model: ItoModel, batch: dict, config: ml_collections.ConfigDict):
  """Returns (loss, metrics) for one batch; metrics are scalars for logging."""
  out = embed_batch(model, batch)
  scale, bias = model.logit_scale, model.logit_bias[...]
  align = contrastive.alignment_loss(config.loss.name, out["image_emb"], out["text_emb"], scale, bias)
  loss = align
  metrics = {"loss/align": align}

  view0_logits = scale * out["image_emb"][:, 0] @ out["text_emb"][:, 0].T  # [B, B]
  metrics.update({f"saturation/{k}": v
                  for k, v in gap.saturation(jax.lax.stop_gradient(view0_logits)).items()})
  centroid_gap = jnp.mean(out["image_emb"], axis=(0, 1)) - jnp.mean(out["text_emb"], axis=(0, 1))
  metrics["gap/batch_centroid_distance"] = jnp.linalg.norm(jax.lax.stop_gradient(centroid_gap))

  if model.fusion_head is not None and (config.loss.itm_weight or config.loss.anchor_weight):
    head = model.fusion_head
    fused = None
    if config.loss.itm_weight:
      itm, itm_aux = fusion_losses.itm_loss(
          head, out["text_tokens"], out["text_mask"], out["image_tokens"], view0_logits)
      fused = itm_aux.pop("fused_positive")
      loss = loss + config.loss.itm_weight * itm
      metrics["loss/itm"] = itm
      metrics.update({f"fusion/{k}": v for k, v in itm_aux.items()})
    if config.loss.anchor_weight:
      if fused is None:
        fused = head(out["text_tokens"], out["text_mask"], out["image_tokens"])
      anchor, anchor_aux = fusion_losses.anchor_loss(
          out["image_emb"][:, 0], out["text_emb"][:, 0], head.anchor(fused), scale,
          pull_weight=config.loss.anchor_pull_weight)
      loss = loss + config.loss.anchor_weight * anchor
      metrics["loss/anchor"] = anchor
      metrics["fusion/anchor_pull"] = anchor_aux["anchor_pull"]

  metrics["loss"] = loss
  return loss, metrics
