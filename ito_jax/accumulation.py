"""The loss and its gradient, with the towers run in microbatches.

`optim.accumulation_steps` = A > 1 trades compute for activation memory
without changing what is optimised: the gradient is that of the global batch's
loss, every sample contrasted with all B - 1 others, not the mean of A smaller
batches' losses (which would see B/A - 1 negatives each). It is gradient
caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"; open_clip's --accum-freq):

1. the towers encode the batch in A microbatches, without gradient, and only
   their outputs are kept (pooled embeddings, and the view-0 token sequences
   when the fusion head needs them);
2. every term that couples samples (the alignment loss, ITM with its mined
   negatives, the anchor terms, R_ot) runs once on the whole batch of outputs,
   giving the loss, its metrics, the gradient of the parameters it uses
   directly (temperature, bias, the fusion head) and the gradient with respect
   to each output;
3. the towers run again, one microbatch at a time, and each microbatch's
   parameter gradient is its vector-Jacobian product with that output
   gradient; the sum over microbatches is the towers' gradient.

The towers' activations exist for one microbatch at a time; the price is a
second forward pass of the towers (about a third more tower compute). The
towers draw nothing at random themselves (patch dropout's token subsets come
in the batch as `patch_keep` and are split with the images), so both passes
compute the same function. R_ot's unaligned image and text batches
(partial mode) are outputs of the towers like the aligned ones: encoded in A
microbatches in steps 1 and 3, before ot.start_step not at all, and coupled
whole only by R_ot in step 2. In step 2 the fusion head runs in A
rematerialised chunks too (objective.fuse), so its activations are one
chunk's; what still takes the whole batch is the towers' outputs themselves
(the view-0 token sequences the head reads among them) and the Sinkhorn
solves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ito_jax import objective, objective_ot, sharding
from ito_jax.models.ito import trainable_filter

ALIGNED_INPUTS = ("images", "tokens", "patch_keep")  # the batch entries embed_batch reads


def value_and_grad(model, batch: dict, config: ml_collections.ConfigDict, mesh=None, *,
                   step=None):
  """((loss, metrics), grads) of objective.compute_loss with respect to the
  model's nnx.Param leaves, with the towers run in optim.accumulation_steps
  microbatches (1: in one pass, as nnx.value_and_grad)."""
  loss_fn = lambda m: objective.compute_loss(m, batch, config, mesh, step=step)
  steps = config.optim.accumulation_steps
  # Only the trained parameters are differentiated: a locked tower
  # (optim.locked) gets no backward pass at all.
  trainable = trainable_filter(config.optim.locked)
  if steps == 1:
    return nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)(model)

  graphdef, params, rest = nnx.split(model, trainable, ...)
  keys = ["image_emb", "text_emb"]
  if objective.uses_tokens(model, config):
    keys += ["image_tokens", "text_tokens", "text_mask"]
  # A locked tower's outputs need no gradient, so no second pass through it.
  differentiable = [k for k in keys
                    if k != "text_mask" and k.split("_")[0] not in config.optim.locked]
  inputs = [k for k in ALIGNED_INPUTS if k in batch]
  pools = objective_ot.uses_unaligned(config)
  if pools:
    inputs += list(objective_ot.UNALIGNED_INPUTS)
    inputs += [objective_ot.UNALIGNED_KEEP] * (objective_ot.UNALIGNED_KEEP in batch)
    # A modality held fixed by ot.stop_gradient needs no second pass.
    differentiable += [k for k, modality in zip(objective_ot.UNALIGNED_OUTPUTS, ("image", "text"))
                       if modality != config.ot.stop_gradient
                       and modality not in config.optim.locked]
  # Before ot.start_step the unaligned batches are not encoded (as in one pass).
  active = objective_ot.is_active(config, step)

  def encode(p, r, micro):
    model = nnx.merge(graphdef, p, r)
    out = objective.encode(model, micro, mesh)
    out = {k: out[k] for k in keys}
    if pools:
      out.update(objective_ot.when_active(active, lambda: objective_ot.encode_unaligned(model, micro)))
    return out

  micro = {k: sharding.split_microbatches(batch[k], steps, mesh) for k in inputs}

  # The loop bodies take the model's state through their carry, not from the
  # enclosing trace: nnx transforms inside the towers (model.scan_layers)
  # refuse variables of an outer trace level.
  # 1. Outputs of every microbatch, no gradient.
  def forward(carry, mb):
    return carry, encode(*carry, mb)

  _, outs = jax.lax.scan(forward, (params, rest), micro)
  out = {k: sharding.merge_microbatches(v, mesh) for k, v in outs.items()}

  # 2. The loss on the whole batch of outputs: its gradient w.r.t. the
  #    parameters used after the towers and w.r.t. the outputs.
  def from_outputs(p, diff_out):
    return objective.loss_from_outputs(nnx.merge(graphdef, p, rest), batch, {**out, **diff_out},
                                       config, mesh, step=step)

  (loss, metrics), (grads, out_grads) = jax.value_and_grad(from_outputs, argnums=(0, 1),
                                                           has_aux=True)(
      params, {k: out[k] for k in differentiable})

  # 3. The towers again, a microbatch at a time, pulling the output gradient
  #    back to the parameters.
  def tower_grads(carry, xs):
    (p, r), acc = carry
    mb, cotangent = xs
    # The rest of the state (a locked tower's parameters among it) enters the
    # vjp as an input of its own, without gradient: read from the enclosing
    # scan's trace instead, the towers' nnx.scan / nnx.remat refuse it.
    def outputs(q, s):
      out = encode(q, jax.lax.stop_gradient(s), mb)
      return {k: out[k] for k in differentiable}

    _, pull = jax.vjp(outputs, p, r)
    g, _ = pull(cotangent)
    return ((p, r), jax.tree.map(jnp.add, acc, g)), None

  cotangents = {k: sharding.split_microbatches(v, steps, mesh) for k, v in out_grads.items()}
  (_, grads), _ = jax.lax.scan(tower_grads, ((params, rest), grads), (micro, cotangents))
  return (loss, metrics), grads
