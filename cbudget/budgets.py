"""Learned per-dimension perturbation budgets eps(x).

Threat model: the box ``[x - eps(x), x + eps(x)] ∩ [0, 1]``.

Vocabulary
----------
* **Budget**: ``eps ∈ R^d_{>0}``, one half-width per input dimension.
* **Robustness volume**: ``∏_i eps_i``.  We handle it as the *log-volume per
  dimension* ``mean_i log eps_i`` and report it as the *equivalent uniform
  eps* ``exp(mean_i log eps_i)`` (the uniform budget with the same volume).
* **Range constraint**: ``eps_min <= eps_i <= eps_max`` with
  ``eps_min = a * eps0`` and ``eps_max = b * eps0``, ``0 < a <= 1 <= b``.

The budget model (a generator, or a learned global map: ``cbudget.models.generators``) decides
the *shape* of the budget as raw log-budgets; the scalar ``eps0`` (from a schedule) sets the
*scale*.  :func:`budgets` combines the two with :func:`project_rows`, an exact shift-and-clip
projection that enforces ``mean log eps == log eps0`` and the range constraint, and that is
differentiable with its true (almost everywhere) Jacobian.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cbudget.bounds import Box

__all__ = [
  "BudgetRangeError",
  "BudgetConfig",
  "BUDGET_MODES",
  "make_budget_config",
  "project_rows",
  "budgets",
  "budget_stats",
]

BUDGET_MODES = ("uniform", "global", "contextual")


class BudgetRangeError(ValueError):
  """Invalid or infeasible budget configuration (range not containing 1, ...)."""


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _concrete(x) -> np.ndarray | None:
  """``x`` as a numpy array if its value is known now, else ``None`` (tracer)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _float_dtype(*xs) -> Any:
  """The floating dtype to compute in: the first floating input's dtype."""
  for x in xs:
    dt = jnp.asarray(x).dtype
    if jnp.issubdtype(dt, jnp.floating):
      return dt
  return jnp.asarray(0.0).dtype  # default float (float32, or float64 under x64)


# ----------------------------------------------------------------------------
# Exact projection onto {v : mean(v) = t, lo <= v <= hi} along a shift
# ----------------------------------------------------------------------------


def _solve_rows(r: jax.Array, t: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Exact ``v = clip(r + tau, lo, hi)`` with ``mean(v) = t``, row-wise.

  ``r`` is ``[B, d]``; ``t, lo, hi`` are ``[B]``.

  ``f(tau) = mean_i clip(r_i + tau, lo, hi)`` is continuous, piecewise linear
  and nondecreasing, with breakpoints ``lo - r_i`` (coordinate i leaves the
  lower bound) and ``hi - r_i`` (coordinate i reaches the upper bound); on the
  segment where f crosses t, with F the unclipped set and L / U the sets
  clipped at lo / hi,

      tau = (d t - |L| lo - |U| hi - sum_F r) / |F|.

  The segment is found by bisection on ``[lo - max r, hi - min r]`` (where f
  goes from lo to hi) down to the float resolution of the dtype, then tau is
  solved on it with the formula above ("polish", with fresh pairwise sums), so
  mean(v) == t to float precision.  Bisection costs a fixed number of passes
  over ``r`` (24 + mantissa bits), and no sort (``bench/README.md`` says why).
  """
  _, d = r.shape
  dt = r.dtype
  lo_c, hi_c, t_c = lo[:, None], hi[:, None], t[:, None]

  def f_below_t(tau):
    return jnp.mean(jnp.clip(r + tau[:, None], lo_c, hi_c), axis=-1) < t

  def halve(_, bracket):
    a, b = bracket
    m = 0.5 * (a + b)
    below = f_below_t(m)
    return jnp.where(below, m, a), jnp.where(below, b, m)

  # Infinite bounds (no clipping on that side) would make an infinite bracket: start those ends
  # at the other end's value shifted by the spread of r, which still brackets the root.
  r_max, r_min = jnp.max(r, axis=-1), jnp.min(r, axis=-1)
  a = jnp.where(jnp.isfinite(lo), lo - r_max, t - r_max)
  b = jnp.where(jnp.isfinite(hi), hi - r_min, t - r_min)
  iterations = 24 + jnp.finfo(dt).nmant
  a, b = jax.lax.fori_loop(0, iterations, halve, (a, b))
  tau = 0.5 * (a + b)

  # Polish: re-solve tau exactly on the active set of the current solution.
  v = jnp.clip(r + tau[:, None], lo_c, hi_c)
  free = (v > lo_c) & (v < hi_c)
  n = jnp.sum(free, axis=-1).astype(dt)
  # tau = (d t - sum_{not F} v - sum_F r) / |F|, written as sums of (t - .) so
  # that a large common offset (|t| >> the spread) cancels before summing.
  resid = jnp.sum(jnp.where(free, t_c - r, t_c - v), axis=-1)
  tau2 = resid / jnp.where(n > 0, n, 1.0)
  tau = jnp.where(n > 0, tau2, tau)
  v = jnp.clip(r + tau[:, None], lo_c, hi_c)

  # All coordinates clipped: only when t == lo or t == hi; then v is the constant t.
  # (Under jit, infeasible targets cannot raise; they are clamped to this constant.)
  v = jnp.where(t_c <= lo_c, lo_c, v)
  v = jnp.where(t_c >= hi_c, hi_c, v)
  return v.astype(dt)


@jax.custom_jvp
def project_rows(r, t, lo, hi):
  """Shift-and-clip projection of rows onto an exact mean: ``v = clip(r + tau, lo, hi)``.

  ``r`` is ``[B, d]`` (raw log-budgets, one row per example); ``t, lo, hi`` are ``[B]`` with
  ``lo <= t <= hi``. The shift ``tau`` (one per row) makes ``mean(v) == t`` exactly, to float
  precision (see :func:`_solve_rows`). Gradients use the true Jacobian (a custom JVP from implicit
  differentiation; nothing is differentiated through the solver): on the unclipped set F,
  ``dv_i/dr_j = delta_ij - 1/|F|``, ``dv_i/dt = d/|F|``, ``dv_i/dlo = -|L|/|F|``,
  ``dv_i/dhi = -|U|/|F|``; a coordinate clipped at ``lo`` (``hi``) has derivative 1 w.r.t. that
  bound and 0 w.r.t. everything else.

  Edge cases: ties in ``r`` and ``d == 1`` (then ``v == t``) need no special treatment; if ``t``
  equals ``lo`` or ``hi`` every coordinate is clipped and ``v`` is that constant. Infeasible targets
  cannot raise under jit; they are clamped to that constant (:class:`BudgetConfig` validates the
  range that :func:`budgets` passes).
  """
  return _solve_rows(r, t, lo, hi)


@project_rows.defjvp
def _project_rows_jvp(primals, tangents):
  """True Jacobian via implicit differentiation of ``sum_i v_i = d t``.

  With F the unclipped set, L / U the sets clipped at lo / hi, ``v_i = r_i + tau``
  on F and ``|F| tau + sum_F r + |L| lo + |U| hi = d t``, so

      dtau = (d dt - |L| dlo - |U| dhi - sum_{j in F} dr_j) / |F|
      dv_i = dr_i + dtau   (i in F),   dlo (i in L),   dhi (i in U),

  i.e. ``dv_i/dr_j = delta_ij - 1/|F|`` on F, ``dv/dt = d/|F|`` on F.  If F is
  empty (t == lo or t == hi, a kink) we return the derivative of the constant
  solution: clipped derivatives plus the uniform correction
  ``dt - (|L| dlo + |U| dhi)/d`` that keeps ``mean(dv) == dt``.
  """
  r, t, lo, hi = primals
  dr, dt_, dlo, dhi = tangents
  v = project_rows(r, t, lo, hi)
  d = r.shape[-1]
  fdt = v.dtype
  lo_c, hi_c = lo[:, None], hi[:, None]
  at_lo = v <= lo_c
  at_hi = (v >= hi_c) & ~at_lo
  free = ~(at_lo | at_hi)
  n = jnp.sum(free, axis=-1).astype(fdt)
  n_lo = jnp.sum(at_lo, axis=-1).astype(fdt)
  n_hi = jnp.sum(at_hi, axis=-1).astype(fdt)
  has_free = n > 0

  dtau = (
    d * dt_ - n_lo * dlo - n_hi * dhi - jnp.sum(jnp.where(free, dr, 0.0), axis=-1)
  ) / jnp.where(has_free, n, 1.0)
  dv_clipped = jnp.where(at_lo, dlo[:, None], 0.0) + jnp.where(at_hi, dhi[:, None], 0.0)
  dv_free = jnp.where(free, dr + dtau[:, None], 0.0)
  corr = dt_ - (n_lo * dlo + n_hi * dhi) / d
  dv = jnp.where(has_free[:, None], dv_free + dv_clipped, dv_clipped + corr[:, None])
  return v, dv.astype(fdt)


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
  """How budgets are formed (hashable: usable as a static jit argument).

  Attributes:
    mode: ``'uniform'`` (eps = eps0 everywhere), ``'global'`` (one learned
      map shared by all inputs: ``cbudget.models.generators.GlobalBudget``) or ``'contextual'``
      (a generator maps each input to its own budget shape).
    ratio_min: ``a`` with ``eps_min = a * eps0``, ``0 < a <= 1``.
    ratio_max: ``b`` with ``eps_max = b * eps0``, ``b >= 1``.
    per_pixel: one budget per pixel shared by all channels (raw maps have one
      channel) instead of one per element.

  Validated on construction (see :func:`make_budget_config`).
  """

  mode: str = "uniform"
  ratio_min: float = 1.0
  ratio_max: float = 1.0
  per_pixel: bool = True

  def __post_init__(self):
    if self.mode not in BUDGET_MODES:
      raise BudgetRangeError(
        f"unknown budget mode {self.mode!r}; valid modes: {', '.join(BUDGET_MODES)}"
      )
    a, b = self.ratio_min, self.ratio_max
    try:
      a, b = float(a), float(b)
    except (TypeError, ValueError) as e:
      raise BudgetRangeError(f"budget range must be two numbers, got ({a!r}, {b!r})") from e
    if not (math.isfinite(a) and math.isfinite(b)):
      raise BudgetRangeError(f"budget range [{a}, {b}] must be finite")
    if a <= 0:
      raise BudgetRangeError(
        f"budget range [{a}, {b}]: the lower ratio a must be > 0 (log-budgets), got a={a}"
      )
    if a > 1:
      raise BudgetRangeError(f"budget range [{a}, {b}] must contain 1: lower ratio a={a} > 1")
    if b < 1:
      raise BudgetRangeError(f"budget range [{a}, {b}] must contain 1: upper ratio b={b} < 1")
    object.__setattr__(self, "ratio_min", a)
    object.__setattr__(self, "ratio_max", b)
    object.__setattr__(self, "per_pixel", bool(self.per_pixel))


def make_budget_config(
  mode: str, budget_range: tuple[float, float] | None = None, per_pixel: bool = True
) -> BudgetConfig:
  """Validated :class:`BudgetConfig`.

  Args:
    mode: 'uniform', 'global' or 'contextual'.
    budget_range: ``(a, b)`` with ``0 < a <= 1 <= b``: ``a*eps0 <= eps_i <= b*eps0``.
      Required for 'global' and 'contextual'; optional (and unused) for
      'uniform', where it defaults to ``(1, 1)``.
    per_pixel: share one budget across the channels of each pixel.

  Raises:
    BudgetRangeError: unknown mode, missing range for a learned mode,
      ``a <= 0``, ``a > 1``, ``b < 1`` or non-finite bounds.
  """
  if mode not in BUDGET_MODES:
    raise BudgetRangeError(f"unknown budget mode {mode!r}; valid modes: {', '.join(BUDGET_MODES)}")
  if budget_range is None:
    if mode != "uniform":
      raise BudgetRangeError(
        f"budget mode {mode!r} requires budget_range=(a, b) with 0 < a <= 1 <= b"
      )
    budget_range = (1.0, 1.0)
  try:
    a, b = budget_range
  except (TypeError, ValueError) as e:
    raise BudgetRangeError(f"budget_range must be a pair (a, b), got {budget_range!r}") from e
  return BudgetConfig(mode=mode, ratio_min=a, ratio_max=b, per_pixel=per_pixel)


# ----------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------


def budgets(config: BudgetConfig, eps0, raw_log_budgets, input_shape: Sequence[int]) -> jax.Array:
  """Per-element budgets ``eps`` of shape ``input_shape`` with exact volume.

  For every example ``n``: ``mean_i log eps[n, i] == log eps0[n]`` and
  ``a*eps0 <= eps <= b*eps0``.

  * uniform: ``eps = eps0`` everywhere (exactly; ``raw_log_budgets`` ignored).
  * global / contextual: ``log eps = project_rows(raw, log eps0,
    log(a eps0), log(b eps0))`` per example.  Computed through the scale identity

        clip(raw + tau, log a + log eps0, log b + log eps0)
            = log eps0 + clip(raw + tau', log a, log b),   tau' = tau - log eps0,

    (the constraint ``mean = log eps0`` becomes ``mean = 0``), i.e.
    ``eps = eps0 * exp(project_rows(raw, 0, log a, log b))``.  The
    normalised shape does not depend on eps0, no ``log eps0`` is ever formed,
    and ``eps0 == 0`` (start of a warm-up) gives ``eps == 0`` with finite
    gradients w.r.t. raw (zero) and eps0 (``exp(shape)``).

  With ``per_pixel`` the raw map has one channel (last axis of size 1) and the
  budget is broadcast over channels; the per-element log-volume then equals
  the per-pixel one.

  Args:
    config: a :class:`BudgetConfig`.
    eps0: scalar or per-example ``[N]`` budget scale, ``>= 0`` (may be traced).
    raw_log_budgets: ``[N, ..., 1]`` (per_pixel) or ``[N, ...]`` raw
      log-budgets (any batch axis broadcastable to N), or None in uniform mode.
    input_shape: the full input shape ``[N, ...]`` including the batch axis.
  """
  input_shape = tuple(int(s) for s in input_shape)
  if len(input_shape) < 1:
    raise ValueError("input_shape must include the batch axis")
  n = input_shape[0]
  dtype = _float_dtype(*(() if raw_log_budgets is None else (raw_log_budgets,)), eps0)
  eps0 = jnp.asarray(eps0, dtype)
  if eps0.ndim > 1 or (eps0.ndim == 1 and eps0.shape[0] not in (1, n)):
    raise ValueError(f"eps0 must be a scalar or of shape [N]={[n]}, got shape {eps0.shape}")
  c = _concrete(eps0)
  if c is not None and (np.any(c < 0) or np.any(np.isnan(c))):
    raise ValueError(f"eps0 must be >= 0, got {c}")
  scale = jnp.broadcast_to(eps0, (n,)).reshape((n,) + (1,) * (len(input_shape) - 1))

  if config.mode == "uniform":
    return jnp.broadcast_to(scale, input_shape)

  if raw_log_budgets is None:
    raise ValueError(f"budget mode {config.mode!r} needs raw_log_budgets (got None)")
  raw = jnp.asarray(raw_log_budgets, dtype)
  expected = input_shape[:-1] + (1,) if config.per_pixel else input_shape
  if raw.ndim != len(expected):
    raise ValueError(
      f"raw_log_budgets of shape {raw.shape} does not match the expected {expected} "
      f"(per_pixel={config.per_pixel}, input_shape={input_shape})"
    )
  try:
    raw = jnp.broadcast_to(raw, expected)
  except ValueError as e:
    raise ValueError(
      f"raw_log_budgets of shape {raw.shape} is not broadcastable to {expected} "
      f"(per_pixel={config.per_pixel}, input_shape={input_shape})"
    ) from e

  return _scaled_budgets(
    scale, raw, math.log(config.ratio_min), math.log(config.ratio_max), input_shape
  )


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _scaled_budgets(scale, raw, log_a, log_b, input_shape):
  """``eps0 * exp(project(raw, 0, log a, log b))`` broadcast to ``input_shape``.

  The target 0 and range ``[log a, log b]`` are feasible by construction of
  the config (``a <= 1 <= b``), so no validation is needed here.
  """
  n = raw.shape[0]
  rows = raw.reshape(n, -1)
  t = jnp.zeros((n,), raw.dtype)
  shape = project_rows(rows, t, jnp.full((n,), log_a, raw.dtype), jnp.full((n,), log_b, raw.dtype))
  return jnp.broadcast_to(scale * jnp.exp(shape.reshape(raw.shape)), input_shape)


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------


def budget_stats(eps, x=None, domain: tuple[float, float] = (0.0, 1.0)) -> dict:
  """Summary statistics of budgets ``eps [N, ...]``, each averaged over the batch.

  Per example (reducing all axes but 0), then averaged over the batch:

  * ``equivalent_eps``: ``exp(mean_i log eps_i)`` (0 if any eps_i is 0).
  * ``min``, ``max``: ``min_i eps_i`` and ``max_i eps_i``.
  * ``effective_equivalent_eps`` (only when ``x`` is given): the equivalent
    eps of the box actually threatened, ``[x - eps, x + eps] ∩ domain``,
    whose half-width is the radius of ``Box.from_budget(x, eps, domain)``.  The
    half-width is clamped below at the smallest positive normal float
    (``finfo.tiny``) so that a zero-width coordinate gives a finite log
    instead of ``log 0 = -inf``.
  """
  eps = jnp.asarray(eps)
  if not jnp.issubdtype(eps.dtype, jnp.floating):
    eps = eps.astype(jnp.float32)
  if eps.ndim == 0:
    raise ValueError("eps must have a batch axis")
  axes = tuple(range(1, eps.ndim))
  stats = {
    "equivalent_eps": jnp.mean(jnp.exp(jnp.mean(jnp.log(eps), axis=axes))),
    "min": jnp.mean(jnp.min(eps, axis=axes)),
    "max": jnp.mean(jnp.max(eps, axis=axes)),
  }
  if x is not None:
    x = jnp.asarray(x, eps.dtype)
    shape = jnp.broadcast_shapes(eps.shape, x.shape)
    box = Box.from_budget(jnp.broadcast_to(x, shape), jnp.broadcast_to(eps, shape), domain)
    half = jnp.maximum(box.radius, jnp.finfo(eps.dtype).tiny)
    axes_x = tuple(range(1, half.ndim))
    stats["effective_equivalent_eps"] = jnp.mean(jnp.exp(jnp.mean(jnp.log(half), axis=axes_x)))
  return stats
