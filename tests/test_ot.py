"""R_ot (ito_jax/losses/ot.py) against an independent float64 Sinkhorn, finite
differences, and closed-form values on constructed point sets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

from ito_jax.losses import ot


def _unit(rng, n, dim, dtype=np.float32):
  x = rng.normal(size=(n, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def _config(**overrides):
  cfg = ot.default_config()
  cfg.update(overrides)
  return cfg


# ---- independent reference: log-domain Sinkhorn in float64 -------------------


def _reference_ot(cost, epsilon):
  """Plan and W_eps = <P, C> + eps KL(P || a b^T) for uniform a, b, run to convergence."""
  n, m = cost.shape
  log_a, log_b = np.full(n, -np.log(n)), np.full(m, -np.log(m))
  f, g = np.zeros(n), np.zeros(m)
  for _ in range(100_000):  # P_ij = exp((f_i + g_j - C_ij) / eps)
    f = epsilon * log_a - epsilon * logsumexp((g[None, :] - cost) / epsilon, axis=1)
    g = epsilon * log_b - epsilon * logsumexp((f[:, None] - cost) / epsilon, axis=0)
    plan = np.exp((f[:, None] + g[None, :] - cost) / epsilon)
    if np.abs(plan.sum(1) - 1 / n).max() < 1e-15:
      break
  kl = np.sum(plan * (np.log(plan) - log_a[:, None] - log_b[None, :]))
  return plan, np.sum(plan * cost) + epsilon * kl


def _reference_cost_and_grads(x, y, cost):
  """C [n, m] and dC_ij/dx_i [n, m, d], dC_ij/dy_j [n, m, d], by hand."""
  if cost == "sqeuclidean":
    diff = x[:, None, :] - y[None, :, :]
    return np.sum(diff ** 2, -1), 2 * diff, -2 * diff
  nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
  xh, yh = x / nx[:, None], y / ny[:, None]
  cos = xh @ yh.T
  dx = -(yh[None, :, :] - cos[:, :, None] * xh[:, None, :]) / nx[:, None, None]
  dy = -(xh[:, None, :] - cos[:, :, None] * yh[None, :, :]) / ny[None, :, None]
  return 1 - cos, dx, dy


@pytest.mark.parametrize("cost,epsilon", [("cosine", 0.1), ("sqeuclidean", 0.2)])
def test_wasserstein_value_plan_and_danskin_gradient_match_reference(cost, epsilon):
  rng = np.random.default_rng(0)
  scales = rng.uniform(0.5, 2.0, size=(7, 1))  # cosine must ignore norms
  x, y = _unit(rng, 7, 5) * scales.astype(np.float32), _unit(rng, 6, 5)
  fn = jax.jit(jax.value_and_grad(
      lambda x, y: ot.wasserstein(x, y, cost=cost, epsilon=epsilon, num_iterations=500),
      argnums=(0, 1), has_aux=True))
  (value, plan), (gx, gy) = fn(jnp.asarray(x), jnp.asarray(y))
  assert value.dtype == jnp.float32

  c, dc_dx, dc_dy = _reference_cost_and_grads(x.astype(np.float64), y.astype(np.float64), cost)
  ref_plan, ref_value = _reference_ot(c, epsilon)
  np.testing.assert_allclose(value, ref_value, atol=1e-4)
  np.testing.assert_allclose(plan, ref_plan, atol=1e-5)
  # Danskin: dW/dx_i = sum_j P_ij dC_ij/dx_i with the optimal plan held fixed.
  np.testing.assert_allclose(gx, np.einsum("ij,ijd->id", ref_plan, dc_dx), atol=1e-4)
  np.testing.assert_allclose(gy, np.einsum("ij,ijd->jd", ref_plan, dc_dy), atol=1e-4)


@pytest.mark.parametrize("differentiate_plan", [False, True])
def test_every_solve_runs_exactly_num_iterations(differentiate_plan):
  # The unrolled solver avoids min == max (wrong gradients in ott 0.6.0) and
  # relies on ott stopping after min_iterations; this pins that down.
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  cost = jnp.asarray(np.random.default_rng(5).random((5, 4)), jnp.float32)
  for num_iterations in (1, 7):
    solver = ot._sinkhorn(num_iterations, differentiate_plan)
    n_iters = jax.jit(lambda c: solver(linear_problem.LinearProblem(
        geometry.Geometry(cost_matrix=c, epsilon=0.01))).n_iters)(cost)
    assert int(n_iters) == num_iterations


# ---- gradients of the full regularizers against finite differences ------------
# In float64 (scoped by jax.enable_x64), where central differences with h = 1e-5
# are accurate to ~1e-9, with every Sinkhorn solve converged: the Danskin and
# envelope gradients are exact only at convergence.


def _check_against_finite_differences(cfg, sizes, seed):
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    xs = [jnp.asarray(_unit(rng, n, 4, np.float64)) for n in sizes]
    fn = jax.jit(jax.value_and_grad(lambda xs: ot.ot_regularizer(xs, cfg)[0]))
    value, grads = fn(xs)
    assert value.dtype == jnp.float64
    h = 1e-5
    for _ in range(3):
      v = [jnp.asarray(rng.normal(size=x.shape)) for x in xs]
      plus, _ = fn([x + h * d for x, d in zip(xs, v)])
      minus, _ = fn([x - h * d for x, d in zip(xs, v)])
      directional = sum(jnp.vdot(g, d) for g, d in zip(grads, v))
      np.testing.assert_allclose(directional, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cost,epsilon,sizes", [("cosine", 0.1, (6, 5, 7)), ("sqeuclidean", 0.2, (6, 8))])
def test_loop_gradient_matches_finite_differences(cost, epsilon, sizes):
  # Includes the cycle term, differentiated through unrolled Sinkhorn plans;
  # K = 2 takes the one-solve (transposed plan) path.
  _check_against_finite_differences(
      _config(variant="loop", cost=cost, epsilon=epsilon, num_iterations=300, gamma=1.0), sizes, seed=1)


@pytest.mark.parametrize("cost,epsilon,outer", [("cosine", 0.3, 150), ("sqeuclidean", 1.0, 100)])
def test_barycenter_gradient_matches_finite_differences(cost, epsilon, outer):
  # The finite differences recompute nu*; the analytic gradient holds it fixed.
  # They agree only if nu* is a stationary point (envelope theorem), i.e.
  # once the outer fixed-point iteration has converged (slowest part here).
  cfg = _config(variant="barycenter", cost=cost, epsilon=epsilon, num_iterations=300,
                barycenter_iterations=outer, weights=(1.0, 2.0, 1.0))
  _check_against_finite_differences(cfg, (6, 5, 7), seed=2)


# ---- the cycle-consistency term -----------------------------------------------


_LOOP_CFG = _config(variant="loop", cost="cosine", epsilon=0.02, num_iterations=200, gamma=1.0)
_loop = jax.jit(lambda xs: ot.loop_regularizer(xs, _LOOP_CFG))


@pytest.mark.parametrize("num_measures", [2, 3])
def test_cycle_term_vanishes_for_permuted_copies_and_not_for_unrelated_sets(num_measures):
  rng = np.random.default_rng(3)
  n = 12
  base = _unit(rng, n, 32)
  copies = [base] + [base[rng.permutation(n)] for _ in range(num_measures - 1)]
  unrelated = [base] + [_unit(rng, n, 32) for _ in range(num_measures - 1)]

  value, aux = _loop([jnp.asarray(x) for x in copies])
  assert float(aux["cycle"]) < 1e-6
  # A sharp permutation plan: <P, C> = 0 and KL(P || a b^T) = log n.
  for k in range(num_measures):
    np.testing.assert_allclose(aux[f"w_{k}_{(k + 1) % num_measures}"], 0.02 * math.log(n), rtol=1e-4)
  np.testing.assert_allclose(value, aux["wasserstein"] + aux["cycle"], rtol=1e-6)

  _, aux = _loop([jnp.asarray(x) for x in unrelated])
  # K = 2: the round trip P~_01 P~_10 blurs points (costs between random
  # directions differ by ~eps); K = 3: the loop does not close.
  assert float(aux["cycle"]) > (0.1 if num_measures == 2 else 0.5)


def test_cycle_term_on_constructed_plans_is_the_squared_error_per_point():
  # Uniform plans [5, 3] and [3, 5] (every entry 1/15): as maps, every point
  # of mu_0 goes to every point of mu_1 with 1/3, and back with 1/5 each, so
  # the walk is the [5, 5] matrix of 1/5. Its distance to I: 5 diagonal
  # entries (1/5 - 1)^2 = 16/25 and 20 off-diagonal (1/5)^2 = 1/25, a total
  # of 100/25 = 4; per point of mu_0, 4/5.
  there, back = jnp.full((5, 3), 1 / 15), jnp.full((3, 5), 1 / 15)
  np.testing.assert_allclose(ot.cycle_consistency([there, back]), 0.8, rtol=1e-6)
  # A permutation there and its inverse back: the walk is I.
  perm = jnp.eye(4)[jnp.array([2, 0, 3, 1])] / 4
  np.testing.assert_allclose(ot.cycle_consistency([perm, perm.T]), 0.0, atol=1e-7)
  # K = 3, two identities and a cyclic shift: the loop sends point i to i+1,
  # 3 entries (-1)^2 on the diagonal and 3 of 1^2 off it, 6 / 3 points = 2.
  ident, shift = jnp.eye(3) / 3, jnp.roll(jnp.eye(3), 1, axis=1) / 3
  np.testing.assert_allclose(ot.cycle_consistency([ident, ident, shift]), 2.0, rtol=1e-6)


# ---- the barycenter -----------------------------------------------------------


def _match(a, b):
  """b's rows reordered to best match a's (Hungarian on squared distances)."""
  rows, cols = linear_sum_assignment(((a[:, None] - b[None]) ** 2).sum(-1))
  return b[cols[np.argsort(rows)]]


@pytest.mark.parametrize("cost,epsilon", [("cosine", 0.01), ("sqeuclidean", 0.02)])
def test_barycenter_of_identical_and_of_noisy_copies(cost, epsilon):
  rng = np.random.default_rng(4)
  n, num_measures = 8, 3
  cfg = _config(variant="barycenter", cost=cost, epsilon=epsilon, num_iterations=100,
                barycenter_iterations=5)
  support_fn = jax.jit(lambda xs: ot.free_support_barycenter(xs, cfg))
  value_and_grad = ot.value_and_grad_fn(cfg)
  base = _unit(rng, n, 16)

  # K shuffled copies of one measure: nu* is that measure, every plan a
  # permutation (<P, C> = 0, KL = log n), and the gradient vanishes.
  copies = [jnp.asarray(base[rng.permutation(n)]) for _ in range(num_measures)]
  support = np.asarray(support_fn(copies))
  np.testing.assert_allclose(_match(base, support), base, atol=1e-5)
  (value, aux), grads = value_and_grad(copies)
  np.testing.assert_allclose(value, epsilon * math.log(n), rtol=1e-4)
  assert max(float(jnp.abs(g).max()) for g in grads) < 1e-4
  (unrelated_value, _), _ = value_and_grad([jnp.asarray(_unit(rng, n, 16)) for _ in range(num_measures)])
  assert float(unrelated_value) > float(value) + 0.1

  # Noisy copies (shuffled): nu* is the per-point mean (normalised for cosine,
  # whose barycenter lives on the sphere).
  noisy = [base + 0.05 * rng.normal(size=base.shape).astype(np.float32) for _ in range(num_measures)]
  noisy = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in noisy]
  expected = np.mean(noisy, axis=0)
  if cost == "cosine":
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  support = np.asarray(support_fn([jnp.asarray(x[rng.permutation(n)]) for x in noisy]))
  np.testing.assert_allclose(_match(expected, support), expected, atol=1e-4)


# ---- configuration errors name the field --------------------------------------


@pytest.mark.parametrize("field,bad", [
    ("variant", "ring"), ("cost", "l1"), ("epsilon", 0.0), ("epsilon", -0.1),
    ("num_iterations", 0), ("num_iterations", -3), ("gamma", -1.0),
    ("weights", (1.0,)), ("weights", (1.0, -1.0)), ("barycenter_size", 0),
    ("barycenter_iterations", 0), ("barycenter_tolerance", 0.0), ("min_points", 0),
    ("marginal_tolerance", 0.0),
])
def test_invalid_config_names_the_field(field, bad):
  xs = [jnp.zeros((4, 3)), jnp.ones((4, 3))]
  with pytest.raises(ValueError, match=rf"config\.ot\.{field}:"):
    ot.ot_regularizer(xs, _config(**{field: bad}))


def test_invalid_measures_and_unknown_fields_are_rejected():
  xs = [jnp.ones((4, 3)), jnp.ones((5, 3))]
  with pytest.raises(ValueError, match=r"config\.ot\.barycenter_size:"):
    ot.ot_regularizer(xs, _config(variant="barycenter", barycenter_size=10))
  with pytest.raises(ValueError, match="measures"):
    ot.ot_regularizer(xs[:1], ot.default_config())
  with pytest.raises(ValueError, match="measures"):
    ot.ot_regularizer([jnp.ones((4, 3)), jnp.ones((4, 2))], ot.default_config())
  few = [jnp.ones((4, 3)), jnp.ones((1, 3))]
  for fn in (ot.ot_regularizer, ot.loop_regularizer, ot.barycenter_regularizer):  # each entry point
    cfg = _config(variant="barycenter" if fn is ot.barycenter_regularizer else "loop")
    with pytest.raises(ValueError, match=r"measures\[1\]: 1 points, fewer than config\.ot\.min_points = 2"):
      fn(few, cfg)
  cfg = ot.default_config()
  cfg.epsilom = 0.1
  with pytest.raises(ValueError, match=r"config\.ot\.epsilom:"):
    ot.ot_regularizer(xs, cfg)


@pytest.mark.parametrize("variant", ot.VARIANTS)
def test_unconverged_solves_are_counted(variant):
  """One Sinkhorn iteration at a small eps leaves the row marginals far off:
  every solve counts as unconverged, and so does nu* after one outer step
  (the next would move it 0.34). 300 iterations at a moderate eps converge,
  and 100 outer steps nu*."""
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  xs = [jnp.asarray(unit(rng.normal(size=(16, 8))), jnp.float32),
        jnp.asarray(unit(rng.normal(size=(12, 8))), jnp.float32)]
  _, rough = ot.ot_regularizer(xs, _config(variant=variant, epsilon=0.01, num_iterations=1,
                                           barycenter_iterations=1))
  # K = 2: one loop solve (its transpose is reused); two plans to nu*, and nu*.
  solves = 1 if variant == "loop" else 3
  assert float(rough["unconverged"]) == solves and float(rough["marginal_error"]) > 1e-2
  _, done = ot.ot_regularizer(xs, _config(variant=variant, epsilon=0.2, num_iterations=300,
                                          barycenter_iterations=100))
  assert float(done["unconverged"]) == 0 and float(done["marginal_error"]) < 1e-3


@pytest.mark.parametrize("cost,epsilon", [("cosine", 0.05), ("sqeuclidean", 0.1)])
def test_barycenter_residual_is_the_next_fixed_point_step(cost, epsilon):
  """barycenter_residual is how far ott's own next outer step moves nu*
  (free_support_barycenter run once more), and a residual above
  barycenter_tolerance adds nu* to the unconverged count."""
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(_unit(rng, 24, 8)), jnp.asarray(_unit(rng, 20, 8))]
  for outer in (1, 3):
    cfg = _config(variant="barycenter", cost=cost, epsilon=epsilon, num_iterations=200,
                  barycenter_iterations=outer)
    _, aux = ot.ot_regularizer(xs, cfg)
    now = ot.free_support_barycenter(xs, cfg)
    after = ot.free_support_barycenter(xs, _config(**{**cfg.to_dict(), "barycenter_iterations": outer + 1}))
    moved = float(jnp.max(jnp.linalg.norm(after - now, axis=-1)))
    assert moved > 0.05  # three steps are not enough on these sets
    np.testing.assert_allclose(float(aux["barycenter_residual"]), moved, rtol=1e-3)
    # 200 Sinkhorn iterations fit both plans to nu*: only nu* is unconverged.
    assert float(aux["marginal_error"]) < cfg.marginal_tolerance and float(aux["unconverged"]) == 1
    cfg.barycenter_tolerance = 2 * moved
    assert float(ot.ot_regularizer(xs, cfg)[1]["unconverged"]) == 0


@pytest.mark.parametrize("cost,epsilon", [("cosine", 0.05), ("sqeuclidean", 0.1)])
def test_barycenter_residual_is_the_next_step_on_a_short_sinkhorn_budget(cost, epsilon):
  """At 50 Sinkhorn iterations a plan depends on which side of the problem
  nu* is on; the residual must be ott's next step all the same, from a nu*
  that still moves (10 outer steps) to one that has settled (100). Solved
  with the measure first it read 0.026 for a nu* that moved 0.0000."""
  key = jax.random.split(jax.random.PRNGKey(3), 4)
  centres = jax.random.normal(key[0], (6, 16))
  x = centres[jax.random.randint(key[1], (128,), 0, 6)] + 0.5 * jax.random.normal(key[2], (128, 16))
  y = centres[jax.random.randint(key[3], (128,), 0, 6)] + 0.5 * jax.random.normal(key[0], (128, 16)) + 0.3
  xs = [x / jnp.linalg.norm(x, axis=1, keepdims=True), y / jnp.linalg.norm(y, axis=1, keepdims=True)]
  moves = []
  for outer in (10, 100):
    cfg = _config(variant="barycenter", cost=cost, epsilon=epsilon, num_iterations=50,
                  barycenter_iterations=outer)
    residual = float(ot.ot_regularizer(xs, cfg)[1]["barycenter_residual"])
    now = ot.free_support_barycenter(xs, cfg)
    after = ot.free_support_barycenter(xs, _config(**{**cfg.to_dict(), "barycenter_iterations": outer + 1}))
    moves.append(float(jnp.max(jnp.linalg.norm(after - now, axis=-1))))
    assert residual == pytest.approx(moves[-1], rel=1e-2, abs=1e-4)
  if cost == "cosine":  # the two cases the test is for: nu* still moving, then settled
    assert moves[0] > 2e-3 > moves[1]


# ---- the image-text coupling the partial trainer reads -------------------------


@pytest.mark.parametrize("variant", ot.VARIANTS)
def test_coupling_has_uniform_marginals_and_pairs_permuted_copies(variant):
  """The coupling of measures 0 and 1 is a transport plan between them (uniform
  marginals); for a shuffled copy it puts its mass on the true partners. For
  the loop variant it is the pair's own plan; for the barycenter, the plans to
  nu* glued through nu*."""
  rng = np.random.default_rng(7)
  n = 10
  x = _unit(rng, n, 16)
  perm = rng.permutation(n)
  cfg = _config(variant=variant, epsilon=0.01, num_iterations=200, gamma=0.0, barycenter_iterations=5)
  value, aux, coupling = jax.jit(lambda xs: ot.ot_regularizer_and_coupling(xs, cfg))(
      [jnp.asarray(x), jnp.asarray(x[perm])])
  coupling = np.asarray(coupling)
  np.testing.assert_allclose(coupling.sum(1), np.full(n, 1 / n), atol=1e-4)
  np.testing.assert_allclose(coupling.sum(0), np.full(n, 1 / n), atol=1e-4)
  # x[i] is x[perm][j] where perm[j] == i.
  partner = np.argsort(perm)
  assert np.all(np.argmax(coupling, axis=1) == partner)
  assert coupling[np.arange(n), partner].sum() > 0.95
  # The value and aux are ot_regularizer's.
  expected_value, expected_aux = ot.ot_regularizer([jnp.asarray(x), jnp.asarray(x[perm])], cfg)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  assert set(aux) == set(expected_aux)


def test_glue_composes_two_plans_through_the_shared_measure():
  """By hand: mu_0 -> nu is a permutation, nu -> mu_1 is another, so the glued
  coupling is their composition; a diffuse plan spreads mass by the product."""
  n = 4
  p0 = np.eye(n)[[1, 2, 3, 0]] / n  # mu_0 point i sits on nu point (i + 1) % 4
  p1 = np.eye(n)[[3, 0, 1, 2]] / n  # mu_1 point j sits on nu point (j + 3) % 4
  glued = np.asarray(ot.glue(jnp.asarray(p0), jnp.asarray(p1)))
  expected = np.zeros((n, n))
  for i in range(n):
    expected[i, (i + 2) % n] = 1 / n  # nu point (i + 1) % 4 is mu_1 point (i + 2) % 4
  np.testing.assert_allclose(glued, expected, atol=1e-7)
  uniform = np.full((n, n), 1 / n ** 2)
  np.testing.assert_allclose(np.asarray(ot.glue(jnp.asarray(p0), jnp.asarray(uniform))), uniform, atol=1e-7)
