"""The OT regularizer's config section: defaults and validation (for
ito_jax.losses.ot, which re-exports both; configs/ot_sections.py checks
the trainer's own `ot` fields). Validation runs in Python, before anything
compiles, and names the field.

Config (`default_config()`; every field is read):
  variant                'loop' | 'barycenter'.
  cost                   'cosine' (1 - cos) | 'sqeuclidean' (||x - y||^2;
                         on unit vectors = 2 (1 - cos), so use ~2x the eps).
  epsilon                entropic regularisation, in units of the cost (> 0).
  num_iterations         Sinkhorn iterations per solve (>= 1).
  gamma                  loop: weight of the cycle-consistency term (>= 0).
  weights                barycenter: per-measure weights w_k (length K,
                         positive, normalised to sum 1); None = uniform.
  barycenter_size        barycenter: support points of nu*; None = mean n_k.
  barycenter_iterations  barycenter: outer fixed-point iterations for nu*.
  barycenter_tolerance   barycenter: nu* counts as one more unconverged solve
                         when one further fixed-point step would move a support
                         point by more than this (Euclidean distance; aux
                         `barycenter_residual` is the largest such move).
  min_points             fewest points a measure may have (>= 1); a smaller
                         measure is a ValueError naming this field.
  marginal_tolerance     a solve whose plan misses its marginals by more than
                         this (L1, rows + columns) after num_iterations counts as not
                         converged: aux `unconverged` (count of solves) and
                         `marginal_error` (the largest); counted, not fatal.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

VARIANTS = ("loop", "barycenter")
COSTS = ("cosine", "sqeuclidean")
_FIELDS = ("variant", "cost", "epsilon", "num_iterations", "gamma", "weights",
           "barycenter_size", "barycenter_iterations", "barycenter_tolerance", "min_points",
           "marginal_tolerance")


def default_config() -> ml_collections.ConfigDict:
  """Defaults for L2-normalised embeddings. Cosine costs lie in [0, 2]; at
  eps = 0.05 plans between aligned sets are near-permutations, and 100
  iterations leave an L1 marginal error <= ~1e-3 on 1024 x 256 embeddings,
  from unrelated to tightly aligned (measured)."""
  c = ml_collections.ConfigDict()
  c.variant = "loop"
  c.cost = "cosine"
  c.epsilon = 0.05
  c.num_iterations = 100
  c.gamma = 1.0
  c.weights = None  # barycenter only; None = uniform over the K measures.
  c.barycenter_size = None  # barycenter only; None = mean of the n_k.
  c.barycenter_iterations = 10
  # Measured on 128 held-out image and 128 unrelated caption embeddings of a
  # trained tower (ot_partial_tiny_cpu, contrastive-only, seed 0; dim 128,
  # eps 0.05, 50 Sinkhorn iterations): after 3 / 10 / 30 / 100 outer steps the
  # next step moves nu* 0.117 / 0.018 / 0.022 / 0.0007 (= barycenter_residual)
  # and the gradient is 20% / 15% / 11% / 11% off a converged one (500 Sinkhorn
  # iterations, 300 outer steps): from ~30 outer steps the Sinkhorn budget dominates.
  c.barycenter_tolerance = 1e-2
  c.min_points = 2  # one point carries no distribution to align
  c.marginal_tolerance = 1e-2
  return c


# ---- validation (runs in Python, before anything compiles) --------------------


def _require(ok: bool, field: str, message: str, prefix: str) -> None:
  if not ok:
    name = f"{prefix}.{field}" if prefix else field
    raise ValueError(f"config.{name}: {message}")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_config(cfg: ml_collections.ConfigDict, num_measures: int | None = None,
                    total_points: int | None = None, prefix: str = "ot") -> None:
  """Raises ValueError naming the first invalid field ("config.ot.epsilon: ...").

  `num_measures` (K) and `total_points` (sum n_k) enable the checks that need
  the batch; the regularizers pass them at trace time.
  """
  unknown = sorted(set(cfg.keys()) - set(_FIELDS))
  _require(not unknown, unknown[0] if unknown else "", f"unknown OT field; known: {_FIELDS}", prefix)
  for field in _FIELDS:
    _require(field in cfg, field, "missing (see ito_jax.losses.ot.default_config)", prefix)
  _require(cfg.variant in VARIANTS, "variant", f"expected one of {VARIANTS}, got {cfg.variant!r}", prefix)
  _require(cfg.cost in COSTS, "cost", f"expected one of {COSTS}, got {cfg.cost!r}", prefix)
  _require(_is_real(cfg.epsilon) and cfg.epsilon > 0, "epsilon",
           f"must be a positive number, got {cfg.epsilon!r}", prefix)
  _require(_is_int(cfg.num_iterations) and cfg.num_iterations >= 1, "num_iterations",
           f"must be an integer >= 1, got {cfg.num_iterations!r}", prefix)
  _require(_is_real(cfg.gamma) and cfg.gamma >= 0, "gamma", f"must be >= 0, got {cfg.gamma!r}", prefix)
  _require(_is_int(cfg.barycenter_iterations) and cfg.barycenter_iterations >= 1,
           "barycenter_iterations", f"must be an integer >= 1, got {cfg.barycenter_iterations!r}", prefix)
  _require(_is_real(cfg.barycenter_tolerance) and cfg.barycenter_tolerance > 0, "barycenter_tolerance",
           f"must be a positive number, got {cfg.barycenter_tolerance!r}", prefix)
  _require(_is_int(cfg.min_points) and cfg.min_points >= 1, "min_points",
           f"must be an integer >= 1, got {cfg.min_points!r}", prefix)
  _require(_is_real(cfg.marginal_tolerance) and cfg.marginal_tolerance > 0, "marginal_tolerance",
           f"must be a positive number, got {cfg.marginal_tolerance!r}", prefix)
  size = cfg.barycenter_size
  _require(size is None or (_is_int(size) and size >= 1), "barycenter_size",
           f"must be None or an integer >= 1, got {size!r}", prefix)
  if size is not None and total_points is not None:
    _require(size <= total_points, "barycenter_size",
             f"{size} exceeds the {total_points} points of all measures together", prefix)
  w = cfg.weights
  if w is not None:
    ok = isinstance(w, (tuple, list)) and len(w) > 0 and all(_is_real(v) and v > 0 for v in w)
    _require(ok, "weights", f"must be None or a tuple of positive numbers, got {w!r}", prefix)
    if num_measures is not None:
      _require(len(w) == num_measures, "weights",
               f"has {len(w)} entries for {num_measures} measures", prefix)
  if num_measures is not None and num_measures < 2:
    raise ValueError(f"measures: the OT regularizer needs K >= 2 measures, got {num_measures}")
