"""Held-out evaluation: embeds the eval split once and reports zero-shot
accuracy, retrieval recall@K and modality-gap figures."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ito_jax import sharding
from ito_jax.evaluate import gap, retrieval, transport, zeroshot


def _whole(emb):
  """`emb` replicated on every device of the mesh it is traced under (none:
  unchanged): a batch split over processes comes back to each of them, which
  all rank every held-out example against every other."""
  return emb if jax.sharding.get_abstract_mesh().empty else jax.lax.with_sharding_constraint(emb, P())


@nnx.jit
def _embed_images(model, images):
  return _whole(model.encode_image(images))


@nnx.jit
def _embed_texts(model, tokens):
  return _whole(model.encode_text(tokens))


def model_mesh(model):
  """The mesh the model's parameters are laid out on, if it has the batch
  axes (a model from train.create_model_and_optimizer); None for one on a
  single device (serving's, tests')."""
  leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
  placement = getattr(leaf, "sharding", None)
  if isinstance(placement, NamedSharding) and set(sharding.BATCH_AXES) <= set(placement.mesh.axis_names):
    return placement.mesh
  return None


def embed_in_batches(fn, model, array, batch_size: int) -> np.ndarray:
  """Applies fn over the leading axis in fixed-size batches of batch_size
  rows, or one batch of the whole array when it is shorter (the last one is
  padded with copies of its last row, dropped again, so a single compiled
  shape serves every call).

  On the model's mesh each batch is split over data x fsdp as a training
  batch is (batch_size rounded up to a multiple of their product) and fn runs
  with the mesh set, so each device embeds its share, not the whole batch.
  Every process holds the whole held-out set, so each fills the shards of its
  own devices from it; fn must return its embeddings replicated (as
  _embed_images and _embed_texts do) for every process to read them."""
  if len(array) == 0:
    raise ValueError("embed_in_batches: the array has no rows to embed")
  mesh = model_mesh(model)
  shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  # A set smaller than batch_size is one batch of its own length: padding 128
  # examples to an eval.batch_size of 500 would embed 4x as many rows.
  size = -(-min(batch_size, len(array)) // shards) * shards
  out = []
  pending = None  # the previous batch's (embeddings still on device, rows kept)
  for start in range(0, len(array), size):
    chunk = np.asarray(array[start:start + size])
    n = len(chunk)
    if n < size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
    if mesh is None:
      emb = fn(model, jnp.asarray(chunk))
    else:
      placed = jax.make_array_from_callback(chunk.shape, sharding.batch_sharding(mesh),
                                            lambda index, chunk=chunk: chunk[index])
      with jax.set_mesh(mesh):  # the towers' batch constraints (sharding.constrain_batch)
        emb = fn(model, placed)
    # Batch k is dispatched before batch k-1 is read back, so the host slices
    # and places batch k while the device embeds k-1; no more than one batch
    # waits unread, which keeps device memory bounded.
    if pending is not None:
      out.append(np.asarray(pending[0])[:pending[1]])
    pending = (emb, n)
  out.append(np.asarray(pending[0])[:pending[1]])
  return np.concatenate(out)


class Evaluator:
  """Evaluator(config, eval_data, class_names, tokenizer).run(model) -> {name: value}.

  Zero-shot needs class names and a label on every example; retrieval and the
  gap need captions (eval_data tokens [E, C, L] with C >= 1) and run on the
  examples that have them (eval_data "captioned" [E], default all). An
  evaluation set (a converted source) may have either; what it lacks is not
  reported.
  """

  def __init__(self, config: ml_collections.ConfigDict, eval_data: dict, class_names, tokenizer):
    self.config = config
    self.data = eval_data
    names = list(class_names)
    self.zeroshot = bool(names) and bool((eval_data["labels"] >= 0).all())
    captioned = np.asarray(eval_data.get("captioned", np.ones(len(eval_data["tokens"]), bool)))
    # Rows of the examples with captions: retrieval's images and queries.
    self.retrieval_rows = (np.flatnonzero(captioned) if eval_data["tokens"].shape[1] > 0
                           else np.zeros(0, np.int64))  # [R]
    self.retrieval = len(self.retrieval_rows) > 0
    if not (self.zeroshot or self.retrieval):
      raise ValueError("evaluation set has neither class names with labels nor captions")
    if self.retrieval:  # before training, not at its first evaluation
      retrieval.check_gallery(config.eval.retrieval_gallery, len(self.retrieval_rows))
    prompts = [t.format(n) for n in names for t in config.eval.templates]
    self.prompt_tokens = tokenizer.encode_batch(prompts, config.model.text.context_length)
    self.num_classes, self.num_templates = len(names), len(config.eval.templates)
    self.last_embeddings: dict | None = None

  def embed(self, model) -> dict:
    bs = self.config.eval.batch_size
    images = self.data["images"]  # [E, H, W, 3]
    captions = self.data["tokens"][self.retrieval_rows]  # [R, C, L]
    r, c, length = captions.shape
    image_emb = embed_in_batches(_embed_images, model, images, bs)
    out = dict(image=image_emb)
    if self.retrieval:
      caption_emb = embed_in_batches(_embed_texts, model, captions.reshape(r * c, length), bs)
      out["caption"] = caption_emb.reshape(r, c, -1)  # [R, C, D], row i: image retrieval_rows[i]
    if self.zeroshot:
      prompt_emb = embed_in_batches(_embed_texts, model, self.prompt_tokens, bs)
      out["prompt"] = prompt_emb.reshape(self.num_classes, self.num_templates, -1)
    return out

  def run(self, model) -> dict:
    emb = self.last_embeddings = self.embed(model)  # kept: the run's end saves a sample of them
    metrics = {}
    if self.zeroshot:
      metrics.update(zeroshot.accuracy(emb["image"], zeroshot.class_embeddings(emb["prompt"]),
                                       self.data["labels"]))
    rows = self.retrieval_rows
    if self.retrieval:
      metrics.update(retrieval.recall_at_k(emb["image"][rows], emb["caption"],
                                           gallery=self.config.eval.retrieval_gallery))
      metrics.update(gap.gap_metrics(emb["image"][rows], emb["caption"][:, 0]))
    unseen = tuple(self.config.partial.unseen_classes) if "partial" in self.config else ()
    if unseen and self.zeroshot:  # generalised zero-shot: seen and unseen classes apart
      metrics.update(zeroshot.accuracy_by_group(
          emb["image"], zeroshot.class_embeddings(emb["prompt"]), self.data["labels"], unseen))
    if unseen and self.zeroshot and self.retrieval:  # labels valid on every example
      metrics.update(retrieval.recall_by_group(emb["image"][rows], emb["caption"],
                                               self.data["labels"][rows], unseen,
                                               gallery=self.config.eval.retrieval_gallery))
    if "partial" in self.config and self.config.partial.enabled and self.zeroshot and self.retrieval:
      from configs import ot_sections  # pylint: disable=g-import-not-at-top
      metrics.update(transport.plan_class_purity(
          emb["image"][rows], emb["caption"][:, 0], self.data["labels"][rows],
          ot_sections.ot_solver_config(self.config)))
    return metrics
