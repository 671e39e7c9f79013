"""Learned per-dimension perturbation budgets eps(x).

Threat model: the box ``[x - eps(x), x + eps(x)] ∩ [0, 1]``.

Vocabulary
----------
* **Budget**: ``eps ∈ R^d_{>0}``, one half-width per input dimension.
* **Robustness volume**: ``∏_i eps_i``.  We handle it as the *log-volume per
  dimension* ``mean_i log eps_i`` and report it as the *equivalent uniform
  eps* ``exp(mean_i log eps_i)`` (the uniform budget with the same volume).
* **Range constraint**: ``eps_min <= eps_i <= eps_max`` with
  ``eps_min = a * eps0`` and ``eps_max = min(b * eps0, 1)``, ``0 < a <= 1 <= b``.  Budgets are
  capped at the width of the domain [0, 1]: a larger one changes nothing in the clipped box and
  would only buy volume that does not exist.
* **Volume** (``BudgetConfig.volume``): ``'nominal'`` constrains ``mean_i log eps_i`` to
  ``log eps0``; ``'effective'`` constrains the mean log of the *clipped* half-widths
  ``h_i = (min(x_i + eps_i, 1) - max(x_i - eps_i, 0)) / 2`` to that of a uniform ``eps0`` on the
  same image, so a budget cannot gain volume from the part of its box the domain cuts off.

The budget model (a generator, or a learned global map: ``cbudget.models.generators``) decides
the *shape* of the budget as raw log-budgets; the scalar ``eps0`` (from a schedule) sets the
*scale*.  :func:`budgets` combines the two with :func:`project_rows` (nominal volume) or
:func:`project_effective_rows` (effective volume): exact shift-and-clip projections that enforce
the volume and the range constraint, differentiable with their true (almost everywhere) Jacobians.
With ``squash='sigmoid'`` a sigmoid between the range ends replaces the clip
(:func:`project_soft_rows`): the same shift is solved, and saturated budgets keep a gradient.
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
  "project_effective_rows",
  "project_soft_rows",
  "clipped_half_width",
  "budgets",
  "budget_stats",
]

# oracle: budgets from the true relevance mask (a reference; cbudget.models.generators.OracleBudget)
BUDGET_MODES = ("uniform", "global", "contextual", "oracle")
VOLUMES = ("nominal", "effective")
SQUASHES = ("clip", "sigmoid")
DOMAIN_WIDTH = 1.0  # pixels lie in [0, 1]; no budget is larger than the domain


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
# Exact projection onto an effective (clipped-box) log-volume
# ----------------------------------------------------------------------------


def clipped_half_width(eps, x):
  """Half-width of ``[x - eps, x + eps] ∩ [0, 1]`` for ``x in [0, 1]``, ``eps >= 0``.

  Written piecewise (``eps`` up to the nearer domain end, then ``(eps + m) / 2`` until the farther
  end, then 1/2) rather than as ``(min(x + eps, 1) - max(x - eps, 0)) / 2``: the two agree, but
  the difference would round a tiny ``eps`` next to a large ``x`` to 0, and its log to ``-inf``.
  """
  return _half_width(eps, *_domain_distances(x))


def _domain_distances(x):
  """Distances from ``x`` to the nearer and the farther end of [0, 1]."""
  return jnp.minimum(x, 1.0 - x), jnp.maximum(x, 1.0 - x)


def _half_width(eps, near, far):
  return jnp.where(eps <= near, eps, jnp.where(eps <= far, 0.5 * (eps + near), 0.5))


def _log_half_width_partials(u, x):
  """``log h`` and its partial derivatives w.r.t. ``u = log eps`` and ``x`` (a.e.)."""
  eps = jnp.exp(u)
  h = clipped_half_width(eps, x)
  upper_free = (x + eps < 1.0).astype(h.dtype)  # the box's upper end is inside the domain
  lower_free = (x - eps > 0.0).astype(h.dtype)
  d_u = eps * 0.5 * (upper_free + lower_free) / h
  d_x = 0.5 * (upper_free - lower_free) / h
  return jnp.log(h), d_u, d_x


def _per_element(v, k: int):
  """``[B, d]`` values repeated to the ``[B, d k]`` elements that share them (pixel-major)."""
  return v if k == 1 else jnp.repeat(v, k, axis=1)


def _mean_value(v, x):
  """The nominal log-volume: ``mean_i v_i`` (``x`` unused)."""
  del x
  return jnp.mean(v, axis=-1)


def _mean_log_half_width(v, x):
  """The effective log-volume: the mean over ``i, c`` of ``log h(exp(v_i), x[:, i, c])``."""
  eps = jnp.exp(v)
  # One [B, d] slice per element sharing a budget (channel): XLA:CPU ran the bisection 9x slower on
  # [B, d, k] arrays reduced over two axes (and 4x on repeated budgets). Computing the distances
  # inside the bisection loop, rather than once before it, measured the same (XLA hoists them).
  near, far = _domain_distances(jnp.moveaxis(x, 2, 0))
  logs = [jnp.mean(jnp.log(_half_width(eps, n, f)), axis=1) for n, f in zip(near, far)]
  return sum(logs) / len(logs)


def _solve_effective_rows(r, x, t, lo, hi):
  """``v = clip(r + tau, lo, hi)`` with ``mean log h(exp(v), x) == t``, row-wise.

  ``g(tau) = mean log h`` is continuous and nondecreasing in ``tau`` (each clipped half-width is
  nondecreasing in its budget), from ``g(lo - max r)`` (every budget at ``lo``) to
  ``g(hi - min r)`` (every budget at ``hi``); the target lies in between when ``lo <= log eps0 <=
  hi`` (a uniform ``eps0`` is one point of the set). Bisection on that bracket runs down to the
  float resolution of ``tau`` (24 + mantissa bits halvings, as :func:`_solve_rows`); since
  ``|dg/dtau| <= 1``, the mean is then within one ulp of ``tau`` of the target. ``g`` is not
  piecewise linear here (``log((eps + m) / 2)`` between the domain ends), so there is no linear
  segment to solve on: the bisection itself is the solve.
  """
  lo_c, hi_c = lo[:, None], hi[:, None]

  def halve(_, bracket):
    a, b = bracket
    m = 0.5 * (a + b)
    below = _mean_log_half_width(jnp.clip(r + m[:, None], lo_c, hi_c), x) < t
    return jnp.where(below, m, a), jnp.where(below, b, m)

  a = lo - jnp.max(r, axis=-1)
  b = hi - jnp.min(r, axis=-1)
  a, b = jax.lax.fori_loop(0, 24 + jnp.finfo(r.dtype).nmant, halve, (a, b))
  return jnp.clip(r + b[:, None], lo_c, hi_c)  # b: the end with g(b) >= t


@jax.custom_jvp
def project_effective_rows(r, x, t, lo, hi):
  """Shift-and-clip projection onto an exact *effective* log-volume.

  ``v = clip(r + tau, lo, hi)`` (log-budgets, ``[B, d]``) with one shift ``tau`` per row such that
  the mean over ``i`` and ``c`` of ``log h(exp(v_i), x[:, i, c])`` equals ``t`` (``[B]``), where
  ``h`` is the :func:`clipped_half_width`. ``x`` is ``[B, d, k]``: the ``k`` input elements that
  share budget ``i`` (the channels of a pixel, or ``k = 1``). ``lo, hi`` are ``[B]``.

  Gradients use the true Jacobian by implicit differentiation (nothing is differentiated through
  the bisection). With F the unclipped set, L / U the sets at ``lo`` / ``hi``,
  ``W_i = sum_c dlog h_ic / dv_i`` and ``D = d k``:

      dtau = (D dt - sum_F W dr - dlo sum_L W - dhi sum_U W - sum_ic dlog h_ic/dx_ic dx_ic)
             / sum_F W,
      dv_i = dr_i + dtau (i in F),  dlo (i in L),  dhi (i in U).

  Where ``sum_F W == 0`` (every free budget already covers the whole domain: ``g`` is flat in
  ``tau``) the shift is locally arbitrary; ``dtau = 0`` is used there.
  """
  return _solve_effective_rows(r, x, t, lo, hi)


@project_effective_rows.defjvp
def _project_effective_rows_jvp(primals, tangents):
  r, x, t, lo, hi = primals
  dr, dx, dt_, dlo, dhi = tangents
  v = project_effective_rows(r, x, t, lo, hi)
  size = x.shape[1] * x.shape[2]
  lo_c, hi_c = lo[:, None], hi[:, None]
  at_lo = v <= lo_c
  at_hi = (v >= hi_c) & ~at_lo
  free = ~(at_lo | at_hi)
  batch, d, k = x.shape
  _, d_u, d_x = _log_half_width_partials(_per_element(v, k), x.reshape(batch, d * k))
  weight = jnp.sum(d_u.reshape(batch, d, k), axis=-1)  # W_i
  w_free = jnp.sum(jnp.where(free, weight, 0.0), axis=-1)
  numer = (
    size * dt_
    - jnp.sum(jnp.where(free, weight * dr, 0.0), axis=-1)
    - dlo * jnp.sum(jnp.where(at_lo, weight, 0.0), axis=-1)
    - dhi * jnp.sum(jnp.where(at_hi, weight, 0.0), axis=-1)
    - jnp.sum(d_x * dx.reshape(batch, d * k), axis=1)
  )
  has_slope = w_free > 0
  dtau = jnp.where(has_slope, numer / jnp.where(has_slope, w_free, 1.0), 0.0)
  dv = (
    jnp.where(free, dr + dtau[:, None], 0.0)
    + jnp.where(at_lo, dlo[:, None], 0.0)
    + jnp.where(at_hi, dhi[:, None], 0.0)
  )
  return v, dv.astype(v.dtype)


# ----------------------------------------------------------------------------
# Soft projection: a sigmoid between the range ends, so no budget is ever clipped
# ----------------------------------------------------------------------------


def _sigmoid_between(r, tau, lo, hi):
  """``lo + (hi - lo) sigmoid(r + tau)`` row-wise (``r [B, d]``; ``tau, lo, hi [B]``)."""
  return lo[:, None] + (hi - lo)[:, None] * jax.nn.sigmoid(r + tau[:, None])


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _soft_shift(measure, r, x, t, uniform, lo, hi):
  """The shift ``tau`` with ``measure(_sigmoid_between(r, tau, lo, hi), x) == t``, by bisection.

  ``measure`` is nondecreasing in every ``v_i`` and ``t == measure(uniform, x)`` for the constant
  log-budget ``uniform`` (log eps0, inside ``(lo, hi)``), so the bracket is exact: with ``p`` the
  sigmoid level that puts a coordinate at ``uniform``, ``tau = logit(p) - max r`` puts every
  coordinate at or below it (measure <= t) and ``logit(p) - min r`` at or above it. Bisection to
  the float resolution of ``tau``, as :func:`_solve_rows`.
  """
  p = (uniform - lo) / (hi - lo)
  logit = jnp.log(p) - jnp.log1p(-p)
  a, b = logit - jnp.max(r, axis=-1), logit - jnp.min(r, axis=-1)

  def halve(_, bracket):
    a, b = bracket
    m = 0.5 * (a + b)
    below = measure(_sigmoid_between(r, m, lo, hi), x) < t
    return jnp.where(below, m, a), jnp.where(below, b, m)

  a, b = jax.lax.fori_loop(0, 24 + jnp.finfo(r.dtype).nmant, halve, (a, b))
  return 0.5 * (a + b)


@_soft_shift.defjvp
def _soft_shift_jvp(measure, primals, tangents):
  """Implicit differentiation of ``measure(v(tau), x) == t`` (nothing through the bisection):

      dtau = (dt - dmeasure|_{tau fixed}) / (dmeasure / dtau),

  the partial derivatives by ``jax.jvp`` of the parametrisation and the measure (so this rule is
  itself differentiable: higher derivatives are right too).
  """
  r, x, t, uniform, lo, hi = primals
  dr, dx, dt_, _, dlo, dhi = tangents  # the bracket's ``uniform`` does not move the root
  tau = _soft_shift(measure, r, x, t, uniform, lo, hi)
  v, dv_fixed = jax.jvp(
    lambda r, lo, hi: _sigmoid_between(r, tau, lo, hi), (r, lo, hi), (dr, dlo, dhi)
  )
  _, dv_dtau = jax.jvp(lambda s: _sigmoid_between(r, s, lo, hi), (tau,), (jnp.ones_like(tau),))
  _, dm_fixed = jax.jvp(measure, (v, x), (dv_fixed, dx))
  _, dm_dtau = jax.jvp(lambda v: measure(v, x), (v,), (dv_dtau,))
  # dm/dtau > 0 unless every budget already covers the whole domain (effective volume: flat in tau)
  has_slope = dm_dtau > 0
  dtau = jnp.where(has_slope, (dt_ - dm_fixed) / jnp.where(has_slope, dm_dtau, 1.0), 0.0)
  return tau, dtau.astype(tau.dtype)


def project_soft_rows(measure, r, x, t, uniform, lo, hi):
  """``v = lo + (hi - lo) sigmoid(r + tau)`` with one shift per row such that
  ``measure(v, x) == t`` (:func:`_mean_value`: nominal volume; :func:`_mean_log_half_width`:
  effective volume).

  Unlike the shift-and-clip projections no coordinate is ever clipped, so every budget keeps a
  gradient (in float32 one far out on the sigmoid's tail still rounds to a zero slope); the price
  is that budgets only approach the range ends. Needs ``lo < uniform < hi`` (a range ``a < 1 <
  b``). The shift is solved by :func:`_soft_shift` and differentiated implicitly.
  """
  return _sigmoid_between(r, _soft_shift(measure, r, x, t, uniform, lo, hi), lo, hi)


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
    volume: ``'nominal'`` (``mean log eps == log eps0``) or ``'effective'`` (the mean log of the
      clipped half-widths equals a uniform ``eps0``'s on the same image).
    squash: how shifted raw log-budgets enter the range: ``'clip'`` (shift and clip; a clipped
      budget gets no gradient) or ``'sigmoid'`` (a sigmoid between the ends, shift solved the
      same way; every budget keeps a gradient, and none reaches an end). ``'sigmoid'`` needs
      ``a < 1 < b``.

  Validated on construction (see :func:`make_budget_config`).
  """

  mode: str = "uniform"
  ratio_min: float = 1.0
  ratio_max: float = 1.0
  per_pixel: bool = True
  volume: str = "nominal"
  squash: str = "clip"

  def __post_init__(self):
    if self.mode not in BUDGET_MODES:
      raise BudgetRangeError(
        f"unknown budget mode {self.mode!r}; valid modes: {', '.join(BUDGET_MODES)}"
      )
    if self.volume not in VOLUMES:
      raise BudgetRangeError(f"unknown volume {self.volume!r}; choose one of {', '.join(VOLUMES)}")
    if self.squash not in SQUASHES:
      raise BudgetRangeError(f"unknown squash {self.squash!r}; choose one of {', '.join(SQUASHES)}")
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
    if self.squash == "sigmoid" and self.mode != "uniform" and not a < 1 < b:
      raise BudgetRangeError(
        f"budget range [{a}, {b}] with squash 'sigmoid' must contain 1 strictly inside (a < 1 < "
        "b): a sigmoid reaches neither end, so a uniform ε₀ at an end cannot be matched"
      )
    object.__setattr__(self, "ratio_min", a)
    object.__setattr__(self, "ratio_max", b)
    object.__setattr__(self, "per_pixel", bool(self.per_pixel))


def make_budget_config(
  mode: str,
  budget_range: tuple[float, float] | None = None,
  per_pixel: bool = True,
  volume: str = "nominal",
  squash: str = "clip",
) -> BudgetConfig:
  """Validated :class:`BudgetConfig`.

  Args:
    mode: 'uniform', 'global' or 'contextual'.
    budget_range: ``(a, b)`` with ``0 < a <= 1 <= b``: ``a*eps0 <= eps_i <= b*eps0``.
      Required for 'global' and 'contextual'; optional (and unused) for
      'uniform', where it defaults to ``(1, 1)``.
    per_pixel: share one budget across the channels of each pixel.
    volume: 'nominal' or 'effective' (see :class:`BudgetConfig`).
    squash: 'clip' or 'sigmoid' (see :class:`BudgetConfig`).

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
  return BudgetConfig(
    mode=mode, ratio_min=a, ratio_max=b, per_pixel=per_pixel, volume=volume, squash=squash
  )


# ----------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------


def budgets(
  config: BudgetConfig, eps0, raw_log_budgets, input_shape: Sequence[int], x=None
) -> jax.Array:
  """Per-element budgets ``eps`` of shape ``input_shape`` with exact volume.

  For every example ``n``: ``a*eps0 <= eps <= min(b*eps0, 1)`` and, with nominal volume,
  ``mean_i log eps[n, i] == log eps0[n]``; with effective volume, the mean log of the clipped
  half-widths on ``x[n]`` equals that of a uniform ``eps0[n]`` (:func:`project_effective_rows`).
  ``eps0`` must be at most 1 (the domain width), else the range is infeasible.

  * uniform: ``eps = eps0`` everywhere (exactly; ``raw_log_budgets`` ignored).
  * global / contextual, nominal volume: ``log eps = project_rows(raw, log eps0,
    log(a eps0), min(log(b eps0), 0))`` per example.  Computed through the scale identity

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
    x: the inputs (``input_shape``, in [0, 1]); needed for effective volume only.
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
  if c is not None and np.any(c > DOMAIN_WIDTH):
    raise ValueError(f"eps0 must be <= {DOMAIN_WIDTH} (the width of the domain [0, 1]), got {c}")
  scale = jnp.broadcast_to(eps0, (n,)).reshape((n,) + (1,) * (len(input_shape) - 1))

  if config.mode == "uniform":
    return jnp.broadcast_to(jnp.minimum(scale, DOMAIN_WIDTH), input_shape)

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

  log_a, log_b = math.log(config.ratio_min), math.log(config.ratio_max)
  soft = config.squash == "sigmoid"
  if config.volume == "nominal":
    return _scaled_budgets(scale, raw, log_a, log_b, input_shape, soft)
  if x is None:
    raise ValueError("effective volume needs the inputs: call budgets(..., x=images)")
  x = jnp.asarray(x, dtype)
  if x.shape != input_shape:
    raise ValueError(f"x has shape {x.shape}, expected input_shape {input_shape}")
  return _effective_budgets(scale, raw, x, log_a, log_b, soft)


def _log_scale(scale):
  """``log eps0`` with ``eps0 = 0`` read as 1: a finite stand-in where the budgets are 0 anyway."""
  return jnp.log(jnp.where(scale > 0, scale, 1.0))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _scaled_budgets(scale, raw, log_a, log_b, input_shape, soft=False):
  """``eps0 * exp(project(raw, 0, log a, min(log b, -log eps0)))`` broadcast to ``input_shape``.

  The target 0 and range ``[log a, min(log b, -log eps0)]`` are feasible when ``a <= 1 <= b``
  (the config) and ``eps0 <= 1``; the upper end is the domain cap ``eps <= 1`` in the scaled frame.
  """
  n = raw.shape[0]
  rows = raw.reshape(n, -1)
  t = jnp.zeros((n,), raw.dtype)
  cap = -_log_scale(scale).reshape(n)
  lo = jnp.full((n,), log_a, raw.dtype)
  hi = jnp.minimum(log_b, cap)
  if soft:
    shape = _soft_or_constant(_mean_value, rows, jnp.zeros((n, 1, 1), raw.dtype), t, t, lo, hi)
  else:
    shape = project_rows(rows, t, lo, hi)
  return jnp.broadcast_to(scale * jnp.exp(shape.reshape(raw.shape)), input_shape)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _effective_budgets(scale, raw, x, log_a, log_b, soft=False):
  """Budgets whose clipped boxes on ``x`` have a uniform ``eps0``'s log-volume.

  Solved in absolute log-budgets (the clipped width is not scale-free); ``eps0 = 0`` gives 0
  (``scale * exp(v - log eps0)`` with a finite stand-in for ``log 0``), with zero gradients
  w.r.t. the raw budgets.
  """
  n = raw.shape[0]
  rows = raw.reshape(n, -1)
  x_rows = x.reshape(n, rows.shape[1], -1)
  log_scale = _log_scale(scale).reshape(n)
  t = jnp.mean(jnp.log(clipped_half_width(jnp.exp(log_scale)[:, None, None], x_rows)), axis=(1, 2))
  lo = log_scale + log_a
  hi = jnp.minimum(log_scale + log_b, math.log(DOMAIN_WIDTH))
  if soft:
    v = _soft_or_constant(_mean_log_half_width, rows, x_rows, t, log_scale, lo, hi)
  else:
    v = project_effective_rows(rows, x_rows, t, lo, hi)
  shape = (v - log_scale[:, None]).reshape(raw.shape)
  return jnp.broadcast_to(scale * jnp.exp(shape), x.shape)


def _soft_or_constant(measure, rows, x_rows, t, uniform, lo, hi):
  """:func:`project_soft_rows`, or the constant ``uniform`` (clipped to the range) in rows whose
  range has collapsed onto it or past it (``eps0 = 0``, read as 1; ``eps0 >= 1``: the cap meets
  the target), where no sigmoid fits."""
  collapsed = (hi <= uniform) | (lo >= uniform)
  proper_lo = jnp.where(collapsed, uniform - 1.0, lo)  # any proper range: rows replaced below
  proper_hi = jnp.where(collapsed, uniform + 1.0, hi)
  v = project_soft_rows(measure, rows, x_rows, t, uniform, proper_lo, proper_hi)
  # eps0 > 1 (an infeasible target, possible under jit) is held at the cap, as the clip does
  return jnp.where(collapsed[:, None], jnp.clip(uniform, lo, hi)[:, None], v)


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
