"""R_ot: the optimal-transport regularizer that aligns the latent distributions
of modalities/views (README, "Objective"), built on ott-jax.

A measure is the set of embeddings of one modality or view in a batch,
`[n_k, dim]`, uniform weights 1/n_k. Two variants, chosen by `cfg.variant`:

* loop:       sum_k W_eps(mu_k, mu_{k+1 mod K})
              + gamma * ||P~_01 P~_12 ... P~_{K-1,0} - I||_F^2 / n_0
* barycenter: sum_k w_k W_eps(mu_k, nu*), nu* the free-support barycenter,
              held fixed (no gradient).

W_eps is ott's `reg_ot_cost`: for the optimal entropic plan P between a and b,

    W_eps(a, b) = <P, C> + eps * KL(P || a b^T),   KL(P||Q) = sum P log(P/Q) - P + Q

(the last two terms cancel for balanced plans). Its gradient with respect to
the points is Danskin's: <P, dC/dx> with P held fixed (ott's default), cheap and
stable. The cycle term differentiates *through* plans, by unrolling a fixed
number of Sinkhorn iterations (`implicit_diff=None`): implicit differentiation
through the plan failed at small eps with the pinned ott-jax 0.6.0.
Every solve runs exactly `num_iterations` iterations, so cost and compiled
code are the same every step (see `_sinkhorn` for an ott 0.6.0 bug in unrolled
gradients at min_iterations == max_iterations, and how it is avoided).

Config: ito_jax/losses/ot_config.py (`default_config()`, every field read).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from ott.geometry import costs, geometry, pointcloud
from ott.problems.linear import barycenter_problem, linear_problem
from ott.solvers.linear import continuous_barycenter, sinkhorn

# Re-exported: callers configure and validate through ito_jax.losses.ot.
from ito_jax.losses.ot_config import COSTS, VARIANTS, default_config, validate_config  # noqa: F401

Aux = Dict[str, jax.Array]


def _check_measures(measures: Sequence[jax.Array]) -> list[jax.Array]:
  measures = list(measures)
  for k, x in enumerate(measures):
    if jnp.ndim(x) != 2 or x.shape[0] < 1:
      raise ValueError(f"measures[{k}]: expected a [n_k, dim] array of points, got shape {jnp.shape(x)}")
  dims = {x.shape[1] for x in measures}
  if len(dims) > 1:
    raise ValueError(f"measures: all measures need the same dim, got {[x.shape for x in measures]}")
  # bf16 embeddings are promoted: Sinkhorn in bf16 is not accurate enough.
  return [jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32)) for x in measures]


def _check_min_points(measures: Sequence[jax.Array], cfg: ml_collections.ConfigDict) -> None:
  for k, x in enumerate(measures):
    if x.shape[0] < cfg.min_points:
      raise ValueError(f"measures[{k}]: {x.shape[0]} points, fewer than config.ot.min_points = "
                       f"{cfg.min_points}")


# ---- pairwise entropic OT -----------------------------------------------------


def _cost_fn(cost: str) -> costs.CostFn:
  if cost == "cosine":
    return costs.Cosine()
  if cost == "sqeuclidean":
    return costs.SqEuclidean()
  raise ValueError(f"cost: expected one of {COSTS}, got {cost!r}")


def _sinkhorn(num_iterations: int, differentiate_plan: bool) -> sinkhorn.Sinkhorn:
  """A Sinkhorn that runs exactly `num_iterations` iterations."""
  if not differentiate_plan:
    # min = max: a scan whose error is evaluated once, at the last step. ott
    # runs max // inner blocks of `inner` steps; a divisor keeps every step.
    inner = max(i for i in range(1, 11) if num_iterations % i == 0)
    return sinkhorn.Sinkhorn(min_iterations=num_iterations, max_iterations=num_iterations,
                             inner_iterations=inner, use_danskin=True)
  # Unrolled (implicit_diff=None). ott 0.6.0 gets this backward pass wrong when
  # min == max: fixpoint_iter_bwd's scan branch starts from the first
  # checkpoint instead of the last (tests/test_ot.py catches it against finite
  # differences). So: the while-loop branch, with max = N + 1. The error of
  # step N - 1 is not computed (ott stores inf), which ott reads as "stop", so
  # exactly N steps run and no error is ever evaluated. One step per block:
  # checkpoints of [n] + [m] floats, and the fastest backward measured.
  return sinkhorn.Sinkhorn(min_iterations=num_iterations, max_iterations=num_iterations + 1,
                           inner_iterations=1, use_danskin=True, implicit_diff=None)


def wasserstein(x: jax.Array, y: jax.Array, *, cost: str, epsilon: float, num_iterations: int,
                differentiate_plan: bool = False) -> Tuple[jax.Array, jax.Array]:
  """Entropic OT between uniform measures on x [n, dim] and y [m, dim].

  Returns (W_eps, plan [n, m]); W_eps is ott's `reg_ot_cost` (module
  docstring), differentiated by Danskin. The plan sums to 1 and carries
  gradient (by unrolling) only if `differentiate_plan`; otherwise it is
  returned under stop_gradient, so that no caller silently gets ott's implicit
  differentiation through it.
  """
  (x, y) = _check_measures((x, y))
  cloud = pointcloud.PointCloud(x, y, cost_fn=_cost_fn(cost), epsilon=epsilon)
  # Materialise the [n, m] cost once: a PointCloud recomputes it (and, when
  # unrolled, its gradient) in every Sinkhorn step, 4-5x slower at n = 1024.
  geom = geometry.Geometry(cost_matrix=cloud.cost_matrix, epsilon=epsilon)
  out = _sinkhorn(num_iterations, differentiate_plan)(linear_problem.LinearProblem(geom))
  plan = out.matrix  # [n, m]
  if not differentiate_plan:
    plan = jax.lax.stop_gradient(plan)
  return out.reg_ot_cost, plan


# ---- loop variant -------------------------------------------------------------


def convergence(plans: Sequence[jax.Array], tolerance: float) -> Aux:
  """How far the plans [n, m] (uniform marginals) are from their marginals
  after the fixed iteration budget, under stop_gradient: `marginal_error`
  (the largest L1 error, rows plus columns) and `unconverged` (how many plans
  exceed `tolerance`). Sinkhorn's last half-step fits one side exactly, so
  the other side carries the remaining error."""
  def error(p):
    rows = jnp.sum(jnp.abs(jnp.sum(p, axis=1) - 1.0 / p.shape[0]))
    cols = jnp.sum(jnp.abs(jnp.sum(p, axis=0) - 1.0 / p.shape[1]))
    return rows + cols
  errors = jnp.stack([error(p) for p in jax.lax.stop_gradient(list(plans))])
  return {"marginal_error": jnp.max(errors),
          "unconverged": jnp.sum(errors > tolerance).astype(jnp.float32)}


def row_stochastic(plan: jax.Array) -> jax.Array:
  """The plan as a map: row i is where point i goes (rows sum to 1)."""
  return plan / jnp.sum(plan, axis=1, keepdims=True)


def cycle_consistency(plans: Sequence[jax.Array]) -> jax.Array:
  """||P~_01 P~_12 ... P~_{K-1,0} - I||_F^2 / n_0 for plans [n_k, n_{k+1}].

  Defined on mu_0's points, so sizes may differ. For K = 2 with a symmetric
  cost P_10 = P_01^T and the term penalises diffuse (non-bijective) plans; for
  K >= 3 it also penalises loops that do not close.
  """
  walk = row_stochastic(plans[0])
  for plan in plans[1:]:
    walk = walk @ row_stochastic(plan)  # [n_0, n_{k+1}]
  n0 = walk.shape[0]
  return jnp.sum((walk - jnp.eye(n0, dtype=walk.dtype)) ** 2) / n0


def loop_regularizer(measures: Sequence[jax.Array], cfg: ml_collections.ConfigDict) -> Tuple[jax.Array, Aux]:
  """sum_k W_eps(mu_k, mu_{k+1 mod K}) + gamma * cycle term.

  aux: `w_{k}_{k+1}` per pair (0-indexed), `wasserstein` (their sum), `cycle`
  (before gamma).
  """
  return _loop(measures, cfg)[:2]


def _loop(measures, cfg) -> Tuple[jax.Array, Aux, jax.Array]:
  """loop_regularizer, plus the plan of mu_0 and mu_1 under stop_gradient."""
  measures = _check_measures(measures)
  _check_min_points(measures, cfg)
  num = len(measures)
  validate_config(cfg, num_measures=num)
  solve = lambda x, y: wasserstein(x, y, cost=cfg.cost, epsilon=cfg.epsilon,
                                   num_iterations=cfg.num_iterations,
                                   differentiate_plan=cfg.gamma > 0)
  if num == 2:
    # Both costs are symmetric, so the return leg is the transposed problem:
    # one solve instead of two (row_stochastic re-normalises its rows).
    value, plan = solve(measures[0], measures[1])
    values, plans = [value, value], [plan, plan.T]
  else:
    values, plans = [], []
    for k in range(num):
      value, plan = solve(measures[k], measures[(k + 1) % num])
      values.append(value)
      plans.append(plan)
  aux = {f"w_{k}_{(k + 1) % num}": v for k, v in enumerate(values)}
  aux["wasserstein"] = sum(values)
  # With gamma == 0 the plans are under stop_gradient: logged, not trained.
  aux["cycle"] = cycle_consistency(plans)
  aux.update(convergence(plans[:1] if num == 2 else plans, cfg.marginal_tolerance))
  return aux["wasserstein"] + cfg.gamma * aux["cycle"], aux, jax.lax.stop_gradient(plans[0])


# ---- barycenter variant -------------------------------------------------------


def _normalise(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@jax.tree_util.register_pytree_node_class
class _CosineEuclideanMean(costs.Cosine):
  """Cosine cost with the Euclidean mean as its `barycenter` (ott has none).

  FreeWassersteinBarycenter iterates y_j <- sum_k w_k T_k(y_j), T_k the
  barycentric projection (a plan-weighted mean) of mu_k. The cosine plans
  depend only on y_j's direction, so this is the spherical iteration
  y_j <- normalise(sum_k w_k T_k(y_j)), whose fixed points are exactly the
  stationary points, over support on the unit sphere, of
  sum_k w_k W_eps(mu_k, nu): the gradient of <P, 1 - <x, y/|y|>> w.r.t. y_j is
  the part of -sum_i P_ij x_i orthogonal to y_j. The envelope theorem then
  holds for cosine as it does for sqeuclidean. (Running sqeuclidean with
  2 eps on unit vectors instead gives plans exp(<x, y>/eps) at |y| < 1, i.e.
  at the wrong temperature, and a normalised nu* off the stationary point:
  10-20% gradient error against finite differences.)
  """

  def barycenter(self, weights: jax.Array, xs: jax.Array) -> Tuple[jax.Array, None]:
    return jnp.average(xs, weights=weights, axis=0), None


def _measure_weights(cfg: ml_collections.ConfigDict, num: int) -> Tuple[float, ...]:
  w = (1.0,) * num if cfg.weights is None else tuple(float(v) for v in cfg.weights)
  return tuple(v / sum(w) for v in w)


def free_support_barycenter(measures: Sequence[jax.Array], cfg: ml_collections.ConfigDict) -> jax.Array:
  """nu*: the free-support entropic barycenter of the measures, [m, dim], no gradient.

  ott's FreeWassersteinBarycenter (uniform weights on nu's m points, a fixed
  `barycenter_iterations` outer steps of `num_iterations`-step Sinkhorn
  solves). It is not differentiable, hence stop_gradient; it needs a cost
  with a closed-form barycenter: sqeuclidean has one, cosine gets
  `_CosineEuclideanMean`, and its support is projected onto the unit sphere
  (the cost only sees directions; the iterate is a mean of unit vectors,
  inside the ball).
  """
  measures = [jax.lax.stop_gradient(x) for x in _check_measures(measures)]
  num = len(measures)
  sizes = tuple(x.shape[0] for x in measures)
  validate_config(cfg, num_measures=num, total_points=sum(sizes))
  weights = _measure_weights(cfg, num)
  cosine = cfg.cost == "cosine"
  if cosine:
    measures = [_normalise(x) for x in measures]
  bar_size = cfg.barycenter_size or max(1, round(sum(sizes) / num))

  # Start from the support of the heaviest measure (then the others): a
  # deterministic start without duplicate points. ott's default, sampling from
  # all measures pooled, picks the same point twice when measures coincide,
  # and the entropic fixed point never separates duplicates.
  first = max(range(num), key=lambda k: weights[k])
  order = [first] + [k for k in range(num) if k != first]
  x_init = jnp.concatenate([measures[k] for k in order])[:bar_size]  # [m, dim]

  problem = barycenter_problem.FreeBarycenterProblem(
      y=jnp.concatenate(measures),  # [sum n_k, dim]
      b=jnp.concatenate([jnp.full((n,), 1.0 / n, measures[0].dtype) for n in sizes]),
      weights=jnp.asarray(weights, measures[0].dtype),
      cost_fn=_CosineEuclideanMean() if cosine else costs.SqEuclidean(),
      epsilon=cfg.epsilon, num_per_segment=sizes)
  solver = continuous_barycenter.FreeWassersteinBarycenter(
      _sinkhorn(cfg.num_iterations, differentiate_plan=False),
      min_iterations=cfg.barycenter_iterations, max_iterations=cfg.barycenter_iterations)
  support = solver(problem, bar_size=bar_size, x_init=x_init).x
  if cosine:
    support = _normalise(support)
  return jax.lax.stop_gradient(support)


def barycenter_regularizer(measures: Sequence[jax.Array],
                           cfg: ml_collections.ConfigDict) -> Tuple[jax.Array, Aux]:
  """sum_k w_k W_eps(mu_k, nu*) with nu* held fixed.

  By the envelope theorem the gradient of min_nu sum_k w_k W_eps(mu_k, nu)
  w.r.t. mu_k is that of W_eps(mu_k, nu*) with nu* fixed, so nu* needs no
  gradient (exact once the barycenter iteration has converged).

  aux: `w_{k}` = W_eps(mu_k, nu*) per measure (unweighted), `wasserstein` (the
  weighted sum).
  """
  return _barycenter(measures, cfg)[:2]


def _barycenter(measures, cfg) -> Tuple[jax.Array, Aux, jax.Array]:
  """barycenter_regularizer, plus mu_0's and mu_1's plans to nu* glued (`glue`)."""
  measures = _check_measures(measures)
  _check_min_points(measures, cfg)
  support = free_support_barycenter(measures, cfg)
  weights = _measure_weights(cfg, len(measures))
  aux, plans = {}, []
  for k, x in enumerate(measures):
    # nu* on the first side, as FreeWassersteinBarycenter solves it: the plans
    # are then those of its next fixed-point step, so barycenter_residual is
    # exactly how far that step would move nu* (with the measure first, a
    # fixed Sinkhorn budget gives a different plan, and the residual read
    # 0.026 for a nu* that no longer moved). W_eps is symmetric.
    aux[f"w_{k}"], plan = wasserstein(support, x, cost=cfg.cost, epsilon=cfg.epsilon,
                                      num_iterations=cfg.num_iterations)
    plans.append(plan.T)  # [n_k, m]
  aux["wasserstein"] = sum(w * aux[f"w_{k}"] for k, w in enumerate(weights))
  aux.update(convergence(plans, cfg.marginal_tolerance))
  # nu* itself is a solve too: count it when it is not yet a fixed point.
  aux["barycenter_residual"] = barycenter_residual(measures, support, plans, cfg)
  aux["unconverged"] = aux["unconverged"] + (
      aux["barycenter_residual"] > cfg.barycenter_tolerance).astype(jnp.float32)
  return aux["wasserstein"], aux, glue(plans[0], plans[1])


def barycenter_residual(measures: Sequence[jax.Array], support: jax.Array,
                        plans: Sequence[jax.Array], cfg: ml_collections.ConfigDict) -> jax.Array:
  """How far nu* [m, dim] is from the fixed point free_support_barycenter
  iterates towards: the largest distance one more step would move a support
  point, given the plans [n_k, m] from each measure to it (no gradient).

  The step is FreeWassersteinBarycenter's: y_j <- sum_k w_k T_k(y_j), T_k the
  plan-weighted mean of mu_k's points (unit vectors under the cosine cost,
  whose support is then projected back onto the sphere). The envelope-theorem
  gradient of barycenter_regularizer is exact only at residual 0."""
  measures, plans = jax.lax.stop_gradient((list(measures), list(plans)))
  cosine = cfg.cost == "cosine"
  step = 0.0
  for w, x, plan in zip(_measure_weights(cfg, len(measures)), measures, plans):
    x = _normalise(x) if cosine else x
    mass = jnp.maximum(jnp.sum(plan, axis=0), 1e-30)[:, None]  # [m, 1]
    step = step + w * (plan.T @ x) / mass  # [m, dim]
  step = _normalise(step) if cosine else step
  return jnp.max(jnp.linalg.norm(step - support, axis=-1))


def glue(plan_0: jax.Array, plan_1: jax.Array) -> jax.Array:
  """The coupling of mu_0 and mu_1 through a shared measure nu: plans
  [n_0, m] and [n_1, m] to nu give P_0 diag(1 / nu) P_1^T, [n_0, n_1] (the
  gluing construction: each nu point passes its mass from mu_0 on to mu_1 in
  proportion to its plan with mu_1). Its marginals are those of the two plans."""
  nu = jnp.sum(plan_1, axis=0)  # [m], ~1/m
  return (plan_0 / jnp.maximum(nu, 1e-30)[None, :]) @ plan_1.T


# ---- entry points -------------------------------------------------------------


def ot_regularizer(measures: Sequence[jax.Array], cfg: ml_collections.ConfigDict) -> Tuple[jax.Array, Aux]:
  """R_ot for measures [n_k, dim] (K >= 2), by `cfg.variant`; returns (value, aux)."""
  value, aux, _ = ot_regularizer_and_coupling(measures, cfg)
  return value, aux


def ot_regularizer_and_coupling(measures: Sequence[jax.Array],
                                cfg: ml_collections.ConfigDict) -> Tuple[jax.Array, Aux, jax.Array]:
  """R_ot as `ot_regularizer`, plus the coupling of measures 0 and 1 that its
  solves found, [n_0, n_1] under stop_gradient: loop, their plan; barycenter,
  the two plans to nu* glued through it (`glue`). The partially aligned
  trainer reads it as soft pairings of unaligned images and texts."""
  validate_config(cfg, num_measures=len(measures))
  if cfg.variant == "loop":
    return _loop(measures, cfg)
  return _barycenter(measures, cfg)


def value_and_grad_fn(cfg: ml_collections.ConfigDict):
  """jit(value_and_grad(R_ot)) w.r.t. the measures: `fn(measures) -> ((value, aux), grads)`.

  What the trainer differentiates, and what benchmarks time.
  """
  validate_config(cfg)
  return jax.jit(jax.value_and_grad(lambda xs: ot_regularizer(xs, cfg), has_aux=True))
