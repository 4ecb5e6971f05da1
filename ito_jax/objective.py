"""The training objective L = L_align + λ_itm·L_itm + λ_anchor·L_anchor (+ λ_ot·R_ot).

One function for every experiment: CLIP, SigLIP, ITO and the OT variants are
selected by config, never by forking the trainer.

The towers and the fusion head run under GSPMD (parameters sharded by their
logical axes, the batch over ('data', 'fsdp')). The terms that compare every
sample with every other one come from `ito_jax.losses.sharded`, written per
batch shard: with a mesh and `config.loss.sharded` they run under shard_map
(local rows against gathered columns, no [B, B] on any device); without a
mesh they run on the whole batch as a single shard.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding

from ito_jax import objective_ot, sharding
from ito_jax.losses import fusion as fusion_losses
from ito_jax.losses import sharded
from ito_jax.losses.sharded import BATCH, REPLICATED
from ito_jax.models import vit
from ito_jax.models.ito import ItoModel


def embed_batch(model: ItoModel, batch: dict):
  """Runs both towers over all views.

  batch['images']: [B, M, H, W, 3]; batch['tokens']: [B, N, L]; optionally
  batch['patch_keep']: [B, M, K], the patch tokens each image view keeps
  (with_patch_dropout). Returns image_emb [B, M, E], text_emb [B, N, E] and
  the view-0 token sequences.
  """
  images, tokens = batch["images"], batch["tokens"]
  b, m = images.shape[:2]
  n = tokens.shape[1]
  keep = batch.get("patch_keep")  # [B, M, K] with patch dropout (with_patch_dropout)
  keep = None if keep is None else keep.reshape(b * m, keep.shape[-1])
  image_emb, image_tokens = model.image_features(images.reshape(b * m, *images.shape[2:]), keep)
  text_emb, text_tokens, text_mask = model.text_features(tokens.reshape(b * n, tokens.shape[2]))
  return dict(
      image_emb=image_emb.reshape(b, m, -1),  # [B, M, E]
      text_emb=text_emb.reshape(b, n, -1),  # [B, N, E]
      image_tokens=image_tokens.reshape(b, m, *image_tokens.shape[1:])[:, 0],  # [B, P, Dv]
      text_tokens=text_tokens.reshape(b, n, *text_tokens.shape[1:])[:, 0],  # [B, L, Dt]
      text_mask=text_mask.reshape(b, n, -1)[:, 0],  # [B, L]
  )


# Folded into key(config.seed) before the step: nnx.Rngs(config.seed) draws
# its initialisers from fold_in(key(seed), count), which the masks of the
# first steps would otherwise repeat.
PATCH_DROPOUT_STREAM = 0x70617463  # "patc"


def with_patch_dropout(batch: dict, config: ml_collections.ConfigDict, step, mesh=None) -> dict:
  """`batch` plus "patch_keep" [B, M, K]: for each aligned image view, the K
  patch tokens it keeps under model.image.patch_dropout (FLIP, Li et al.
  2023), drawn uniformly without replacement from config.seed and `step`, so
  a resumed run draws what the uninterrupted one did. Unchanged at rate 0.
  With partial.unaligned_patch_dropout, also "unaligned_patch_keep" [U, V, K]
  for R_ot's unaligned images (a draw of their own); otherwise those are
  encoded whole."""
  image = config.model.image
  if not image.patch_dropout:
    return batch
  stream = jax.random.fold_in(jax.random.key(config.seed), PATCH_DROPOUT_STREAM)
  stream = jax.random.fold_in(stream, step)

  def draw(key, images):
    noise = jax.random.uniform(key, (*images.shape[:2], (image.image_size // image.patch_size) ** 2))
    # The indices of the K largest scores, as lax.top_k gives them (ties to the
    # lower index). Not top_k itself: GSPMD does not split top_k over the batch
    # and gathers every row's scores onto every device each step.
    order = jnp.argsort(-noise, axis=-1, stable=True)  # [rows, views, patches]
    keep = order[..., :vit.kept_patches(image)].astype(jnp.int32)  # [rows, views, K]
    if mesh is not None:
      keep = jax.lax.with_sharding_constraint(keep, NamedSharding(mesh, BATCH))
    return keep

  batch = {**batch, "patch_keep": draw(stream, batch["images"])}
  if config.partial.enabled and config.partial.unaligned_patch_dropout:
    batch["unaligned_patch_keep"] = draw(jax.random.fold_in(stream, 1), batch["unaligned_images"])
  return batch


def without_patch_dropout(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of model.image.unmasked_final_steps' phase: every training
  image encodes all of its patch tokens."""
  config = copy.deepcopy(config)
  config.model.image.patch_dropout = 0.0
  config.model.image.unmasked_final_steps = 0
  config.partial.unaligned_patch_dropout = False
  return config


def fuse(head, text_tokens, text_mask, image_tokens, chunks: int = 1, mesh=None):
  """head(text_tokens [N, T, Dt], text_mask [N, T], image_tokens [N, P, Dv])
  -> fused [N, W], over the N pairs in `chunks` rematerialised chunks (rows
  strided as sharding.split_microbatches lays them out): the backward pass
  keeps one chunk's activations at a time and recomputes them, the head's
  forward run twice. The same values as one call; chunks = 1 is one call.
  The trainer passes fusion_chunks(config)."""
  if chunks == 1:
    return head(text_tokens, text_mask, image_tokens)
  graphdef, state = nnx.split(head)

  @jax.checkpoint
  def one(xs):
    return nnx.merge(graphdef, state)(*xs)

  xs = tuple(sharding.split_microbatches(x, chunks, mesh) for x in (text_tokens, text_mask, image_tokens))
  return sharding.merge_microbatches(jax.lax.map(one, xs), mesh)


def fusion_chunks(config: ml_collections.ConfigDict) -> int:
  """model.fusion.remat_chunks, or optim.accumulation_steps where it is 0:
  under accumulation the head's activations then shrink with A like the
  towers'."""
  return config.model.fusion.remat_chunks or config.optim.accumulation_steps


def itm_through_head(head, out: dict, negatives, chunks: int = 1, mesh=None):
  """ITM on the true pairs and the mined negatives, and the true pairs' fused
  vectors (reused by the anchor loss).

  The three pairs of sample i are stacked on a new axis ([B, 3, ...]) rather
  than concatenated along the batch, so a batch-sharded input stays sharded
  the same way through the head: (image i, text i) label 1, (image i, its
  hardest text) and (its text's hardest image, text i) label 0."""
  neg_text_tokens, neg_text_mask, neg_image_tokens = negatives
  text_tokens, text_mask, image_tokens = out["text_tokens"], out["text_mask"], out["image_tokens"]
  texts = jnp.stack([text_tokens, neg_text_tokens, text_tokens], axis=1)  # [B, 3, T, Dt]
  masks = jnp.stack([text_mask, neg_text_mask, text_mask], axis=1)  # [B, 3, T]
  images = jnp.stack([image_tokens, image_tokens, neg_image_tokens], axis=1)  # [B, 3, P, Dv]
  pairs = lambda x: x.reshape(-1, *x.shape[2:])  # [B*3, ...]
  b = text_tokens.shape[0]
  fused = fuse(head, pairs(texts), pairs(masks), pairs(images), chunks, mesh).reshape(b, 3, -1)  # [B, 3, W]
  logits = head.match_logit(fused)  # [B, 3]
  loss, aux = fusion_losses.itm_loss_from_logits(logits[:, 0], logits[:, 1:].reshape(-1))
  return loss, aux, fused[:, 0]


def compute_loss(model: ItoModel, batch: dict, config: ml_collections.ConfigDict, mesh=None, *,
                 step=None):
  """Returns (loss, metrics) for one batch; metrics are scalars for logging.

  mesh: the device mesh the batch is split over ('data' x 'fsdp'); None runs
  every term on the whole batch (a single shard).
  step: optimizer steps taken so far (traced); gates R_ot at ot.start_step."""
  return loss_from_outputs(model, batch, encode(model, batch, mesh), config, mesh, step=step)


def encode(model: ItoModel, batch: dict, mesh=None) -> dict:
  """embed_batch's outputs, kept split by sample over the mesh's batch axes."""
  out = embed_batch(model, batch)
  if mesh is not None:  # the towers' outputs stay split by sample, whatever GSPMD prefers inside
    out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, BATCH))
  return out


def uses_tokens(model: ItoModel, config: ml_collections.ConfigDict) -> bool:
  """Whether loss_from_outputs reads the towers' token sequences (the fusion
  head's ITM or anchor terms), not only the pooled embeddings."""
  return model.fusion_head is not None and bool(config.loss.itm_weight or config.loss.anchor_weight)


def loss_from_outputs(model: ItoModel, batch: dict, out: dict, config: ml_collections.ConfigDict,
                      mesh=None, *, step=None):
  """compute_loss after the towers: every term from `out` (encode's outputs
  for the aligned batch), the fusion head, and R_ot (which encodes the
  unaligned batches in `batch` itself, unless `out` already holds them:
  objective_ot.encode_unaligned)."""
  l = config.loss
  shard_mesh = mesh if l.sharded else None
  on_shards = functools.partial(sharded.on_batch_shards, mesh=shard_mesh)
  scale, bias = model.logit_scale, model.logit_bias[...]
  image0, text0 = out["image_emb"][:, 0], out["text_emb"][:, 0]  # [B, E] view 0

  align = on_shards(functools.partial(sharded.alignment, l.name, l.sigmoid_variant),
                    in_specs=(BATCH, BATCH, REPLICATED, REPLICATED), out_specs=REPLICATED)(
                        out["image_emb"], out["text_emb"], scale, bias)
  loss = align
  metrics = {"loss/align": align}
  saturation = on_shards(sharded.saturation, in_specs=(BATCH, BATCH, REPLICATED),
                         out_specs=REPLICATED)(image0, text0, scale)
  metrics.update({f"saturation/{k}": v for k, v in saturation.items()})
  centroid_gap = jnp.mean(out["image_emb"], axis=(0, 1)) - jnp.mean(out["text_emb"], axis=(0, 1))
  metrics["gap/batch_centroid_distance"] = jnp.linalg.norm(jax.lax.stop_gradient(centroid_gap))

  head = model.fusion_head
  if head is not None and (l.itm_weight or l.anchor_weight):
    fused = None
    chunks = fusion_chunks(config)
    if l.itm_weight:
      negatives = on_shards(
          functools.partial(sharded.itm_negatives, pool=l.itm_negative_pool),
          in_specs=(BATCH,) * 2 + (REPLICATED,) + (BATCH,) * 3, out_specs=(BATCH,) * 3)(
              jax.lax.stop_gradient(image0), jax.lax.stop_gradient(text0),
              jax.lax.stop_gradient(scale), out["text_tokens"], out["text_mask"],
              out["image_tokens"])
      itm, itm_aux, fused = itm_through_head(head, out, negatives, chunks, mesh)
      loss = loss + l.itm_weight * itm
      metrics["loss/itm"] = itm
      metrics.update({f"fusion/{k}": v for k, v in itm_aux.items()})
    if l.anchor_weight:
      if fused is None:
        fused = fuse(head, out["text_tokens"], out["text_mask"], out["image_tokens"], chunks,
                     mesh)  # [B, W]
      anchors = head.anchor(fused)  # [B, E]
      # The anchor contrast reads the temperature but does not train it: the
      # fused anchor sees both modalities, so its contrast is easier than the
      # image-text one and, left to it, drives the shared logit scale higher
      # than L_align wants (tiny_cpu: temperature 0.072 alone, 0.039 with it).
      anchor = on_shards(sharded.anchor_alignment, in_specs=(BATCH,) * 3 + (REPLICATED,),
                         out_specs=REPLICATED)(image0, text0, anchors,
                                               jax.lax.stop_gradient(scale))
      # A per-sample mean: GSPMD keeps it sharded, no shard_map needed.
      pull = fusion_losses.anchor_pull(image0, text0, anchors)
      loss = loss + l.anchor_weight * (anchor + l.anchor_pull_weight * pull)
      metrics["loss/anchor"] = anchor
      metrics["fusion/anchor_pull"] = pull

  if config.loss.ot_weight or config.loss.ot_plan_contrast_weight:
    ot_term, ot_metrics = objective_ot.ot_loss(model, batch, out, config, step)
    loss = loss + ot_term
    metrics.update(ot_metrics)

  metrics["loss"] = loss
  return loss, metrics
