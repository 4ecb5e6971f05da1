"""The λ_ot · R_ot term of the objective (README, "Objective"; config `ot`, `partial`).

Measures, by mode:
* partial.enabled: the embeddings of each view of the unaligned image batch
  and then of each view of the unaligned text batch, [U, E] each, run through
  the same towers in the same step (K = 2V, V = partial.unaligned_views). The
  loop's pairs are then image view v -> v + 1 (the same images), the last
  image view -> text view 0 (unaligned), the text views in turn (the same
  samples' captions), and the last text view -> image view 0. Every pair is
  an entropic Sinkhorn plan, the within-modality ones too: the code never
  imposes their known row-i-to-row-i pairing. That pairing enters only as the
  cycle term's target I, so with V >= 2 and gamma > 0 the walk through all
  the plans must bring each image back to itself. With
  ot.include_aligned (V = 1) the aligned batch's view-0 embeddings join the
  image and the text measure ([U + B, E] each).
* otherwise: every image view and every text view of the aligned batch
  (K = M + N measures of [B, E]).

With ot.stop_gradient = "image" (or "text") that modality's measures enter
R_ot as fixed targets: its gradient reaches only the other tower.

Before ot.start_step (optimizer steps) a traced `lax.cond` skips the term, so
it switches on mid-run without recompiling and costs nothing before. With
ot.debias the W_eps terms become Sinkhorn divergences (`self_transport`).

Bad input never reaches the parameters as NaN: if an unaligned image or any
point of a measure is non-finite, the image is zeroed before the tower, the
measures are replaced by finite stand-ins, the term's weight is zero (so its
gradient is exactly zero), `ot/nonfinite_points` counts the offenders, and the
term's other metrics read 0 (they would describe the stand-ins). A
non-finite R_ot (or plan contrast) value from finite points is dropped the same
way and counted in `ot/nonfinite_value`. With ot.debias the self-transport
solves count towards `ot/unconverged` and `ot/marginal_error` too. One case
is beyond this term: a finite unaligned image that overflows inside a tower
makes the backward pass NaN at any weight (0 · inf), which
optim.skip_nonfinite catches by skipping the step (train/nonfinite_steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from configs import ot_sections
from ito_jax.losses import ot as ot_lib


UNALIGNED_INPUTS = ("unaligned_images", "unaligned_tokens")  # [U, V, H, W, 3], [U, V, L]
UNALIGNED_OUTPUTS = ("unaligned_image_emb", "unaligned_text_emb")  # [U, V, E] each
UNALIGNED_KEEP = "unaligned_patch_keep"  # [U, V, K]: objective.with_patch_dropout


def measures(model, batch: dict, out: dict, config: ml_collections.ConfigDict):
  """R_ot's measures, each [n_k, E] (module docstring), and the number of
  non-finite unaligned images, which are zeroed before the tower (a NaN
  inside the tower would make its gradient NaN even at zero weight). `out` is
  objective.embed_batch's result for the aligned batch; when it also holds
  `encode_unaligned`'s outputs (ito_jax.accumulation encodes the unaligned
  batches in microbatches), those are used instead of running the towers."""
  if not config.partial.enabled:
    m, n = out["image_emb"].shape[1], out["text_emb"].shape[1]
    views = [out["image_emb"][:, i] for i in range(m)] + [out["text_emb"][:, j] for j in range(n)]
    return _hold_fixed(views, m, config.ot.stop_gradient), jnp.int32(0)
  for key in UNALIGNED_INPUTS:
    if key not in batch:
      raise ValueError(f"batch[{key!r}]: missing; config.partial.enabled needs the partial pipeline "
                       "(ito_jax.data.partial)")
    if batch[key].shape[0] == 0:
      raise ValueError(f"batch[{key!r}]: empty unaligned batch, shape {batch[key].shape}")
  encoded = out if UNALIGNED_OUTPUTS[0] in out else encode_unaligned(model, batch)
  image, text = (encoded[k] for k in UNALIGNED_OUTPUTS)  # [U, V, E] each
  v = image.shape[1]
  if config.ot.include_aligned:  # validated: V == 1
    image = jnp.concatenate([image, out["image_emb"][:, :1]])  # [U + B, 1, E]
    text = jnp.concatenate([text, out["text_emb"][:, :1]])  # [U + B, 1, E]
  views = [image[:, i] for i in range(v)] + [text[:, i] for i in range(v)]
  return _hold_fixed(views, v, config.ot.stop_gradient), jnp.sum(~_finite_rows(batch))


def _finite_rows(batch: dict) -> jax.Array:
  """[U, V]: whether each unaligned image view is finite everywhere."""
  return jnp.all(jnp.isfinite(batch["unaligned_images"]), axis=(2, 3, 4))


def encode_unaligned(model, batch: dict) -> dict:
  """The towers over the unaligned batches: UNALIGNED_OUTPUTS, [U, V, E]
  each. A non-finite image view is zeroed first (`measures` counts it); with
  batch[UNALIGNED_KEEP] each image view encodes only those patch tokens."""
  images, tokens = (batch[k] for k in UNALIGNED_INPUTS)
  u, v = images.shape[:2]
  images = jnp.where(_finite_rows(batch)[..., None, None, None], images, 0.0)
  keep = batch.get(UNALIGNED_KEEP)  # [U, V, K] with partial.unaligned_patch_dropout
  keep = None if keep is None else keep.reshape(u * v, keep.shape[-1])
  image = model.image_features(images.reshape(u * v, *images.shape[2:]), keep)[0].reshape(u, v, -1)
  text = model.encode_text(tokens.reshape(u * v, tokens.shape[-1])).reshape(u, v, -1)
  return dict(zip(UNALIGNED_OUTPUTS, (image, text)))


def is_active(config: ml_collections.ConfigDict, step) -> jax.Array | bool:
  """Whether R_ot is on at `step` (optimizer steps taken; None: always)."""
  if step is None or config.ot.start_step <= 0:
    return True
  return step >= config.ot.start_step


def when_active(active, fn):
  """fn() when `active` is True; otherwise a traced `lax.cond` that runs fn
  only if `active` holds and else returns zeros of fn's output shapes (so
  before ot.start_step nothing of fn is computed)."""
  if active is True:
    return fn()
  off = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn))
  return jax.lax.cond(active, fn, off)


def uses_unaligned(config: ml_collections.ConfigDict) -> bool:
  """Whether the objective encodes the unaligned batches (R_ot in partial mode)."""
  return bool(config.partial.enabled
              and (config.loss.ot_weight or config.loss.ot_plan_contrast_weight))


def _hold_fixed(views: list[jax.Array], num_image: int, modality: str) -> list[jax.Array]:
  """views: the image measures (the first num_image), then the text measures;
  those of `modality` ("image" | "text" | "": none) without gradient."""
  fixed = {"image": range(num_image), "text": range(num_image, len(views)), "": ()}[modality]
  return [jax.lax.stop_gradient(x) if k in fixed else x for k, x in enumerate(views)]


def self_transport(xs: list[jax.Array], solver: ml_collections.ConfigDict,
                   solves: list[tuple] | None = None) -> list[jax.Array]:
  """The debiasing terms that turn R_ot's W_eps into Sinkhorn divergences,
  S(a, b) = W_eps(a, b) - W_eps(a, a) / 2 - W_eps(b, b) / 2: for each measure,
  (its number of pair terms, or its barycenter weight) / 2 * W_eps(mu_k, mu_k).

  Why: W_eps(mu, mu) > 0 grows with the spread of mu (the entropic term), so
  plain W_eps keeps pulling both modalities inwards even once their
  distributions match, which with trainable towers on both sides ends in
  collapse; S is zero, with zero gradient, when they match. For the
  barycenter the constant -W_eps(nu*, nu*) / 2 (no gradient) is left out.
  `solves`: `self_solves(xs, solver)` when the caller already has them.
  """
  num = len(xs)
  if solver.variant == "loop":
    counts = [2.0] * num  # mu_k is in the pairs (k-1, k) and (k, k+1); for K = 2 the pair counts twice
  else:
    w = solver.weights or (1.0,) * num
    counts = [v / sum(w) for v in w]
  solves = solves if solves is not None else self_solves(xs, solver)
  return [0.5 * c * value for c, (value, _) in zip(counts, solves)]


def self_solves(xs: list[jax.Array], solver: ml_collections.ConfigDict) -> list[tuple]:
  """(W_eps(mu_k, mu_k), its plan) for each measure: the solves behind
  `self_transport`, whose plans count towards `ot/unconverged` like R_ot's."""
  return [ot_lib.wasserstein(x, x, cost=solver.cost, epsilon=solver.epsilon,
                             num_iterations=solver.num_iterations) for x in xs]


def ot_loss(model, batch: dict, out: dict, config: ml_collections.ConfigDict, step=None):
  """Returns (λ_ot · R_ot, metrics), or zeros before ot.start_step. `step`:
  optimizer steps taken so far (a traced scalar), or None to apply the term
  unconditionally.

  Before ot.start_step a `lax.cond` skips the term's whole computation: the
  unaligned batches are not encoded (no compute, and no gradient path through
  the towers that a bad input could make NaN), and its metrics read 0."""
  return when_active(is_active(config, step), lambda: _ot_loss(model, batch, out, config))


def _ot_loss(model, batch: dict, out: dict, config: ml_collections.ConfigDict):
  """ot_loss's term and metrics, the term switched on."""
  xs, bad_images = measures(model, batch, out, config)
  bad = bad_images + sum(jnp.sum(~jnp.all(jnp.isfinite(x), axis=-1)) for x in xs)
  finite = bad == 0
  # A constant stand-in keeps Sinkhorn finite; `where` sends zero cotangent to x.
  xs = [jnp.where(finite, x, jnp.full_like(x, x.shape[-1] ** -0.5)) for x in xs]
  solver = ot_sections.ot_solver_config(config)
  value, aux, coupling = ot_lib.ot_regularizer_and_coupling(xs, solver)
  if config.ot.debias:
    solves = self_solves(xs, solver)
    self_terms = self_transport(xs, solver, solves)
    value = value - sum(self_terms)
    aux["self_transport"] = sum(self_terms)
    checked = ot_lib.convergence([plan for _, plan in solves], solver.marginal_tolerance)
    aux["unconverged"] = aux["unconverged"] + checked["unconverged"]
    aux["marginal_error"] = jnp.maximum(aux["marginal_error"], checked["marginal_error"])
  # A non-finite value from finite points (an overflowing solve) is counted in
  # `ot/nonfinite_value` and its term dropped: zero weight, so zero gradient.
  value_ok = jnp.isfinite(value)
  weight = config.loss.ot_weight * (finite & value_ok).astype(jnp.float32)
  value = jnp.where(value_ok, value, 0.0)
  metrics = {"loss/ot": value, "ot/weight": weight, "ot/nonfinite_points": bad,
             "ot/nonfinite_value": (~value_ok).astype(jnp.int32)}
  term = weight * value
  if config.loss.ot_plan_contrast_weight:
    contrast, contrast_aux = plan_contrast(xs[0], xs[1], coupling, jax.lax.stop_gradient(model.logit_scale))
    contrast_ok = jnp.isfinite(contrast)
    contrast = jnp.where(contrast_ok, contrast, 0.0)
    term = term + (config.loss.ot_plan_contrast_weight
                   * (finite & contrast_ok).astype(jnp.float32) * contrast)
    metrics["ot/nonfinite_value"] = metrics["ot/nonfinite_value"] + (~contrast_ok).astype(jnp.int32)
    metrics["loss/ot_plan_contrast"] = contrast
    metrics.update({f"ot/{k}": v for k, v in contrast_aux.items()})
  metrics.update({f"ot/{k}": jax.lax.stop_gradient(v) for k, v in aux.items()})
  if config.partial.enabled:
    half = len(xs) // 2  # image views, then text views
    gap = jnp.mean(jnp.concatenate(xs[:half]), axis=0) - jnp.mean(jnp.concatenate(xs[half:]), axis=0)
    metrics["gap/unaligned_centroid_distance"] = jnp.linalg.norm(jax.lax.stop_gradient(gap))
  # On a step whose measures are stand-ins, what the solves measured describes
  # the stand-ins (e.g. a cycle term of (n - 1) / n): those metrics read 0, as
  # before ot.start_step, and the counters say why.
  counters = ("ot/weight", "ot/nonfinite_points", "ot/nonfinite_value")
  metrics = {k: v if k in counters else jnp.where(finite, v, jnp.zeros_like(v))
             for k, v in metrics.items()}
  return term, metrics


def plan_contrast(image: jax.Array, text: jax.Array, coupling: jax.Array, scale: jax.Array):
  """InfoNCE on the unaligned batches with the OT coupling as soft targets.

  image [U, E] and text [V, E] are L2-normalised embeddings of *unrelated*
  batches; coupling [U, V] (no gradient) is R_ot's plan between them. Each
  image's target distribution over the texts is its row of the plan rescaled
  to sum 1, and each text's over the images its column; the loss is the
  cross-entropy of the scaled similarities against those targets, both ways
  (a pseudo-labelled contrast, as in OT self-labelling). Unlike W_eps, which
  only pulls each point towards its plan-weighted partners, it also pushes
  the non-partners away, and the plan's balanced marginals keep every point
  of both batches in play. The temperature is read, not trained (as in the
  fused-anchor contrast). Returns (loss, aux).
  """
  logits = scale * image @ text.T  # [U, V]
  rows = coupling / jnp.maximum(jnp.sum(coupling, axis=1, keepdims=True), 1e-30)
  cols = coupling.T / jnp.maximum(jnp.sum(coupling, axis=0)[:, None], 1e-30)
  i2t = -jnp.mean(jnp.sum(rows * jax.nn.log_softmax(logits, axis=1), axis=1))
  t2i = -jnp.mean(jnp.sum(cols * jax.nn.log_softmax(logits.T, axis=1), axis=1))
  entropy_of = lambda t: -jnp.mean(jnp.sum(t * jnp.log(jnp.maximum(t, 1e-30)), axis=1))
  # Averaged both ways like the loss, so the loss minus it is the mean KL to
  # the targets: 0 when the model's softmax reproduces the plan both ways.
  entropy = 0.5 * (entropy_of(rows) + entropy_of(cols))
  return 0.5 * (i2t + t2i), {"plan_target_entropy": entropy,
                             "plan_top1_mass": jnp.mean(jnp.max(rows, axis=1))}
