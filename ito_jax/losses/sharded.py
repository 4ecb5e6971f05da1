"""Batch-level loss terms written per batch shard: local rows, gathered columns.

Every term of the objective that compares all samples of the batch with each
other (alignment, saturation, ITM mining, the fused anchor) is written here as
a function of one shard's rows and the batch's columns. The train step runs
them under `jax.shard_map` over the batch axes ('data', 'fsdp'), so no device
ever holds a global [B, B] matrix: device d scores its b = B / shards rows
against the gathered B columns ([b, B]), or, for the ring sigmoid, against
one b-row chunk at a time ([b, b]). This is open_clip's
`ClipLoss(local_loss=True, gather_with_grad=True)`: `all_gather`'s transpose
is a reduce-scatter, so every device's use of a gathered column sends its
gradient back to the device that owns the row.

The same functions run unsharded with `axis=None` (one shard holding the whole
batch): that is the single-device objective, and the sharded one is equal to
it up to float summation order (tests/test_sharding.py). One exception: ITM
hard negatives never cross a shard, so with `loss.itm_negative_pool = 0` (the
whole shard) they are mined among B / shards samples, and the ITM term changes
with the mesh. A fixed pool that divides every shard makes it
mesh-independent.

Within a shard, sample i of the shard has global sample id
`shard_index * b + i`, matching the layout of a batch split over
P(('data', 'fsdp')).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ito_jax.losses import contrastive
from ito_jax.losses import fusion as fusion_losses
from ito_jax.sharding import BATCH_AXES

SIGMOID_VARIANTS = ("gather", "ring")
BATCH = P(BATCH_AXES)  # leading axis split over the batch shards
REPLICATED = P()


# =============================================================================
# Collectives that degrade to the identity on a single shard (axis=None)
# =============================================================================
def num_shards(axis) -> int:
  return 1 if axis is None else jax.lax.axis_size(axis)


def shard_index(axis):
  return 0 if axis is None else jax.lax.axis_index(axis)


def gather_rows(x, axis):
  """[b, ...] on each shard -> [B, ...] (all shards' rows, in shard order).

  Differentiable: the cotangent of the gathered array is reduce-scattered
  back to the shards that own the rows (open_clip's gather_with_grad)."""
  return x if axis is None else jax.lax.all_gather(x, axis, axis=0, tiled=True)


def shard_sum(x, axis):
  return x if axis is None else jax.lax.psum(x, axis)


def global_ids(local_ids, samples_per_shard: int, axis):
  """Sample ids within a shard -> ids within the global batch."""
  return local_ids + shard_index(axis) * samples_per_shard


def gather_batch(x, mesh):
  """A batch-sharded array, replicated on every device (gradients flow back
  to the owning shards). For terms that need the whole batch on each device,
  such as the OT regularizer; `mesh=None` is the identity."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def on_batch_shards(fn, mesh, in_specs, out_specs):
  """fn(*args, axis=...) run per batch shard under shard_map over ('data', 'fsdp');
  with `mesh=None`, fn on the whole batch with axis=None. Specs: BATCH for
  arrays split on their leading axis, REPLICATED for the rest (scalars)."""
  if mesh is None:
    return functools.partial(fn, axis=None)
  return jax.shard_map(functools.partial(fn, axis=BATCH_AXES), mesh=mesh,
                       in_specs=in_specs, out_specs=out_specs)


# =============================================================================
# Alignment: multi-view InfoNCE and SigLIP on local rows
# =============================================================================
def softmax_alignment(image_emb, text_emb, scale, *, axis):
  """Shard-local multi-positive InfoNCE (`contrastive.softmax_loss`).

  image_emb [b, M, E], text_emb [b, N, E] of this shard. Local image rows are
  scored against all texts, local text rows against all images; each
  direction's mean over global rows is the psum of local means / shards."""
  b = image_emb.shape[0]
  images, image_ids = contrastive.flatten_views(image_emb)  # [b*M, E], [b*M]
  texts, text_ids = contrastive.flatten_views(text_emb)  # [b*N, E], [b*N]
  image_ids = global_ids(image_ids, b, axis)
  text_ids = global_ids(text_ids, b, axis)
  i2t = contrastive.multi_positive_nce(
      images, gather_rows(texts, axis), image_ids, gather_rows(text_ids, axis), scale)
  t2i = contrastive.multi_positive_nce(
      texts, gather_rows(images, axis), text_ids, gather_rows(image_ids, axis), scale)
  return shard_sum(0.5 * (i2t + t2i), axis) / num_shards(axis)


def sigmoid_alignment(image_emb, text_emb, scale, bias, *, axis):
  """Shard-local SigLIP (`contrastive.sigmoid_loss`), local images against all
  gathered texts: [b*M, B*N] logits per device."""
  b = image_emb.shape[0]
  images, image_ids = contrastive.flatten_views(image_emb)
  texts, text_ids = contrastive.flatten_views(text_emb)
  total = contrastive.sigmoid_pair_loss_sum(
      images, gather_rows(texts, axis), global_ids(image_ids, b, axis),
      gather_rows(global_ids(text_ids, b, axis), axis), scale, bias)
  return shard_sum(total, axis) / (images.shape[0] * num_shards(axis))


def sigmoid_alignment_ring(image_emb, text_emb, scale, bias, *, axis):
  """Shard-local SigLIP that never gathers: text chunks travel round the ring
  of batch shards (`ppermute`, as big_vision's chunked SigLIP), and each step
  scores the local images against one [b*N] chunk, so the largest logit
  block is [b*M, b*N]. The step is rematerialised, so the backward pass keeps
  only the chunks (B*N x E per device), never the logits."""
  b = image_emb.shape[0]
  images, image_ids = contrastive.flatten_views(image_emb)
  texts, chunk_ids = contrastive.flatten_views(text_emb)  # chunk_ids: local ids 0..b-1
  image_ids = global_ids(image_ids, b, axis)
  shards = num_shards(axis)
  me = shard_index(axis)

  @jax.checkpoint
  def visit(carry, hop):
    chunk, total = carry
    owner = (me - hop) % shards  # the chunk arriving at hop k started k shards back
    total = total + contrastive.sigmoid_pair_loss_sum(
        images, chunk, image_ids, chunk_ids + owner * b, scale, bias)
    if axis is not None:
      chunk = jax.lax.ppermute(chunk, axis, [(i, (i + 1) % shards) for i in range(shards)])
    return (chunk, total), None

  # The running sum has the dtype of one step's sum (float64 under x64): a
  # float32 carry would not match the scan body's output there.
  step_sum = jax.eval_shape(contrastive.sigmoid_pair_loss_sum, images, texts, image_ids,
                            chunk_ids, scale, bias)
  total = jnp.zeros((), step_sum.dtype)
  if axis is not None:
    total = jax.lax.pcast(total, axis, to="varying")  # a per-shard partial sum
  (_, total), _ = jax.lax.scan(visit, (texts, total), jnp.arange(shards))
  return shard_sum(total, axis) / (images.shape[0] * shards)


def alignment(name: str, sigmoid_variant: str, image_emb, text_emb, scale, bias, *, axis):
  if name == "softmax":
    return softmax_alignment(image_emb, text_emb, scale, axis=axis)
  if name == "sigmoid" and sigmoid_variant == "gather":
    return sigmoid_alignment(image_emb, text_emb, scale, bias, axis=axis)
  if name == "sigmoid" and sigmoid_variant == "ring":
    return sigmoid_alignment_ring(image_emb, text_emb, scale, bias, axis=axis)
  raise ValueError(f"config.loss: unknown alignment {name!r}/{sigmoid_variant!r}")


# =============================================================================
# View-0 statistics and ITM negatives
# =============================================================================
def saturation_rows(logits, positive_column):
  """`gap.saturation` summed over a block of rows: logits [r, C] (image rows
  against all C texts), positive_column [r]. Divide by B for the means."""
  logits = logits.astype(jnp.float32)
  columns = jnp.arange(logits.shape[1])
  is_positive = columns[None, :] == positive_column[:, None]  # [r, C]
  positive = jnp.sum(jnp.where(is_positive, logits, 0.0), axis=1)  # [r]
  positive_prob = jnp.exp(positive - jax.nn.logsumexp(logits, axis=1))
  hardest = jnp.max(jnp.where(is_positive, -jnp.inf, logits), axis=1)
  return {"frac_positive_prob_gt_099": jnp.sum(positive_prob > 0.99),
          "mean_margin": jnp.sum(positive - hardest)}


def saturation(image_emb0, text_emb0, scale, *, axis):
  """Saturation of the view-0 image->text softmax (`gap.saturation`) from the
  local image rows against all gathered texts ([b, B]); no gradient."""
  b = image_emb0.shape[0]
  image_emb0, text_emb0, scale = jax.lax.stop_gradient((image_emb0, text_emb0, scale))
  logits = scale * contrastive.similarity(image_emb0, gather_rows(text_emb0, axis))  # [b, B]
  sums = saturation_rows(logits, shard_index(axis) * b + jnp.arange(b))
  return {k: shard_sum(v, axis) / (b * num_shards(axis)) for k, v in sums.items()}


def mine_in_pools(similarity, pool: int):
  """Hard negatives within consecutive pools of `pool` samples.

  similarity [b, b] (image rows, text columns), pool divides b. Pairs across
  pools are masked out, so this is `fusion.mine_hard_negatives` on each
  diagonal [pool, pool] block (indices into the b samples). A pool of fewer
  than 2, or one that does not divide b, would leave a sample with no
  candidate but itself; it is refused here (configs/common.py refuses it
  by name first)."""
  b = similarity.shape[0]
  if pool < 2 or b % pool:
    raise ValueError(f"ITM negatives: a pool of {pool} samples must be >= 2 and divide the "
                     f"shard's {b} samples, or some sample's only candidate is itself")
  group = jnp.arange(b) // pool
  same_pool = group[:, None] == group[None, :]
  return fusion_losses.mine_hard_negatives(jnp.where(same_pool, similarity, -jnp.inf))


def itm_negatives(image_emb0, text_emb0, scale, text_tokens, text_mask, image_tokens,
                  *, pool: int, axis):
  """The ITM hard negatives of each local sample, mined (without gradient)
  from the view-0 similarity of the shard's own [b, b] block, in pools of
  `pool` samples (0: the whole shard).

  Negatives stay on the shard because the fusion head must read the
  negative's tokens, and fetching them from other devices would cost
  B x tokens x width per device. (ALBEF mines on the local batch too.)

  image_emb0/text_emb0 [b, E]; text_tokens [b, T, Dt], text_mask [b, T],
  image_tokens [b, P, Dv]. Returns the tokens of the hardest text for each
  image and of the hardest image for each text: ([b, T, Dt], [b, T], [b, P, Dv])."""
  similarity = scale * contrastive.similarity(image_emb0, text_emb0)  # [b, b]
  neg_text, neg_image = mine_in_pools(similarity, pool or image_emb0.shape[0])
  return text_tokens[neg_text], text_mask[neg_text], image_tokens[neg_image]


# =============================================================================
# Fused-anchor alignment
# =============================================================================
def anchor_alignment(image_emb0, text_emb0, anchor, scale, *, axis):
  """`fusion.anchor_loss` per shard: image and text embeddings [b, E] each
  contrasted against the fused anchors [b, E], both directions, local rows
  against gathered columns."""
  b = image_emb0.shape[0]
  ids = global_ids(jnp.arange(b), b, axis)
  all_ids = gather_rows(ids, axis)

  def symmetric(x):
    rows = contrastive.multi_positive_nce(x, gather_rows(anchor, axis), ids, all_ids, scale)
    cols = contrastive.multi_positive_nce(anchor, gather_rows(x, axis), ids, all_ids, scale)
    return 0.5 * (rows + cols)

  local = 0.5 * (symmetric(image_emb0) + symmetric(text_emb0))
  return shard_sum(local, axis) / num_shards(axis)
