"""Interval bounds and linear relaxations of scalar nonlinearities, element-wise on ``[l, u]``.

Each ``*_relaxation`` returns :class:`LinearBounds` valid for every ``z`` in ``[l, u]``: the proofs are
in the docstrings. Divisions are guarded so that no NaN appears in an unused ``jnp.where`` branch
(that would poison gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cbudget.bounds._src.registry import LinearBounds

# Names of the lower-slope choices for a convex kink, e.g. ReLU's lower bound ``alpha * z``.
SLOPE_CHOICES = ("adaptive", "zero", "one", "parallel")


def _safe_div(num, den, ok):
  return num / jnp.where(ok, den, 1)


def two_piece_interval(l, u, left, right):
  """Exact range of ``f(z) = left*z (z < 0), right*z (z >= 0)`` over ``[l, u]``.

  The extremes of a piecewise-linear function lie at the ends or at the kink 0 (when inside).
  """
  f = lambda z: jnp.where(z < 0, left * z, right * z)
  fl, fu = f(l), f(u)
  kink_inside = (l < 0) & (u > 0)
  lo = jnp.minimum(jnp.minimum(fl, fu), jnp.where(kink_inside, 0, jnp.inf))
  hi = jnp.maximum(jnp.maximum(fl, fu), jnp.where(kink_inside, 0, -jnp.inf))
  return lo.astype(fl.dtype), hi.astype(fl.dtype)


def two_piece_relaxation(l, u, left, right, slope_choice="adaptive") -> LinearBounds:
  """Linear bounds of ``f(z) = left*z (z < 0), right*z (z >= 0)`` on ``[l, u]``.

  ReLU is ``(0, 1)``, leaky ReLU ``(s, 1)``, ``abs`` ``(-1, 1)``, ``min(z, 0)`` ``(1, 0)``.
  Stable (``l >= 0`` or ``u <= 0``): ``f`` is linear there and both bounds are exact. Across the kink
  the chord through ``(l, f(l))`` and ``(u, f(u))`` bounds a convex ``f`` (``left <= right``) from
  above and a concave one from below; on the other side any line through the origin with slope
  between ``left`` and ``right`` is a bound (a supporting line at the kink). ``slope_choice`` picks it:
  ``"adaptive"`` (``right`` if ``u > -l`` else ``left``: CROWN's default, ties go to ``left``),
  ``"zero"`` (``left``), ``"one"`` (``right``) or ``"parallel"`` (the chord's slope).
  """
  if slope_choice not in SLOPE_CHOICES:
    raise ValueError(f"slope choice must be one of {SLOPE_CHOICES}, got {slope_choice!r}")
  dtype = jnp.result_type(l)
  left = jnp.asarray(left, dtype)
  right = jnp.asarray(right, dtype)
  unstable = (l < 0) & (u > 0)
  chord = _safe_div(right * u - left * l, u - l, unstable)
  chord_offset = right * u - chord * u
  if slope_choice == "adaptive":
    support = jnp.where(u > -l, right, left)
  elif slope_choice == "zero":
    support = left
  elif slope_choice == "one":
    support = right
  else:
    support = chord
  convex = left <= right
  stable_slope = jnp.where(l >= 0, right, left)
  zero = jnp.zeros_like(chord)
  up_slope = jnp.where(unstable, jnp.where(convex, chord, support), stable_slope)
  up_offset = jnp.where(unstable & convex, chord_offset, zero)
  lo_slope = jnp.where(unstable, jnp.where(convex, support, chord), stable_slope)
  lo_offset = jnp.where(unstable & ~convex, chord_offset, zero)
  return LinearBounds(lo_slope, lo_offset, up_slope, up_offset)


def shift(bounds: LinearBounds, z_shift, y_shift) -> LinearBounds:
  """Bounds of ``y_shift + g(z - z_shift)`` from bounds of ``g``: ``a (z - c) + b + d``."""
  return LinearBounds(
    bounds.lower_slope,
    bounds.lower_offset - bounds.lower_slope * z_shift + y_shift,
    bounds.upper_slope,
    bounds.upper_offset - bounds.upper_slope * z_shift + y_shift,
  )


def hard_tanh_relaxation(l, u) -> LinearBounds:
  """Linear bounds of ``clip(z, -1, 1)`` on ``[l, u]``.

  * Entirely in one linear piece: exact.
  * One kink inside: the function is convex (kink at -1) or concave (kink at 1) on ``[l, u]``; the
    chord bounds one side, and one of the two pieces' lines bounds the other (adaptive choice, as for
    ReLU).
  * Both kinks inside: the upper line through ``(l, -1)`` and ``(1, 1)`` has slope ``2/(1-l) < 1``,
    so it is above ``z`` on ``[-1, 1]``, above ``-1`` left of that and above ``1`` right of it; the
    lower line through ``(-1, -1)`` and ``(u, 1)`` is the mirror image.
  """
  dtype = jnp.result_type(l)
  one = jnp.ones_like(l)
  zero = jnp.zeros_like(l)
  h = lambda z: jnp.clip(z, -1, 1)
  chord_ok = u > l
  chord = _safe_div(h(u) - h(l), u - l, chord_ok)
  chord_offset = h(l) - chord * l
  below, above = u <= -1, l >= 1
  linear_mid = (l >= -1) & (u <= 1)
  concave = (l >= -1) & (u > 1) & (l < 1)  # kink at 1 only
  convex = (u <= 1) & (l < -1) & (u > -1)  # kink at -1 only
  both = (l < -1) & (u > 1)
  # Concave: lower chord; upper z (if most of [l, u] is below 1) or the constant 1.
  cc_up_slope = jnp.where(1 - l > u - 1, one, zero)
  cc_up_offset = jnp.where(1 - l > u - 1, zero, one)
  # Convex: upper chord; lower z (if most of [l, u] is above -1) or the constant -1.
  cv_lo_slope = jnp.where(u + 1 > -1 - l, one, zero)
  cv_lo_offset = jnp.where(u + 1 > -1 - l, zero, -one)
  both_up_slope = _safe_div(2 * one, 1 - l, both)
  both_lo_slope = _safe_div(2 * one, u + 1, both)

  def pick(const_below, const_above, mid, cc, cv, bb):
    return jnp.select(
      [below, above, linear_mid, concave, convex, both], [const_below, const_above, mid, cc, cv, bb]
    ).astype(dtype)

  lo_slope = pick(zero, zero, one, chord, cv_lo_slope, both_lo_slope)
  lo_offset = pick(-one, one, zero, chord_offset, cv_lo_offset, both_lo_slope - 1)
  up_slope = pick(zero, zero, one, cc_up_slope, chord, both_up_slope)
  up_offset = pick(-one, one, zero, cc_up_offset, chord_offset, 1 - both_up_slope)
  return LinearBounds(lo_slope, lo_offset, up_slope, up_offset)


def s_shaped_relaxation(l, u, f, df, iterations: int = 30) -> LinearBounds:
  """Linear bounds of an increasing ``f`` convex on ``z <= 0`` and concave on ``z >= 0`` (sigmoid, tanh).

  * ``u <= 0`` (convex): chord above, tangent at the midpoint below.
  * ``l >= 0`` (concave): chord below, tangent at the midpoint above.
  * ``l < 0 < u``, upper bound: the tangent at ``d in [0, u]`` that passes through ``(l, f(l))``.
    ``phi(d) = f(d) + f'(d)(l - d) - f(l)`` is increasing on ``d >= 0`` (its derivative is
    ``f''(d)(l - d) >= 0``) with ``phi(0) <= 0``. Bisection keeps the end with ``phi >= 0``, whose
    tangent lies above ``f`` on ``[0, inf)`` (concavity) and above ``(l, f(l))`` and ``(0, f(0))``,
    hence above the convex part's chord on ``[l, 0]``. If ``phi(u) < 0`` no such ``d <= u`` exists
    and the chord is an upper bound (its slope is below ``f'(u)``). The lower bound mirrors this
    with ``psi(d) = f(d) + f'(d)(u - d) - f(u)`` on ``[l, 0]``, keeping the end with ``psi <= 0``.
  The tangent points have no gradient (they are found by bisection); the bounds stay sound.
  This is :func:`s_shaped_relaxation_with` at :func:`s_shaped_alpha_init`.
  """
  return s_shaped_relaxation_with(l, u, f, df, s_shaped_alpha_init(l, u), iterations)


def s_shaped_alpha_init(l, u):
  """The parameters ``[2, *l.shape]`` at which :func:`s_shaped_relaxation_with` is CROWN's
  relaxation: midpoint tangents (0.5) where ``f`` is convex or concave on ``[l, u]``, the tangents
  through the far end (1) across 0."""
  across = (l < 0) & (u > 0)
  alpha = jnp.where(across, 1.0, 0.5).astype(jnp.result_type(l))
  return jnp.stack([alpha, alpha])


def s_shaped_relaxation_with(l, u, f, df, alpha, iterations: int = 30) -> LinearBounds:
  """The relaxation of :func:`s_shaped_relaxation` with its tangent points as parameters in [0, 1].

  ``alpha[0]`` moves the lower line's tangent point, ``alpha[1]`` the upper line's (each of shape
  broadcasting against ``l``, e.g. ``[R, *l.shape]``, one per bound row). Every choice is sound:

  * convex on ``[l, u]`` (``u <= 0``), lower line: the tangent at ``d = (1 - a) l + a u``, any point
    of ``[l, u]`` (a convex function lies above its tangents). Concave (``l >= 0``), upper line:
    the same, mirrored.
  * across 0, upper line: the tangent at ``d = a d* + (1 - a) u``, between the bisection's point
    ``d*`` (``phi(d*) >= 0``) and ``u``; ``phi`` increases on ``d >= 0``, so ``phi(d) >= 0`` and the
    argument of :func:`s_shaped_relaxation` holds for ``d``. The lower line mirrors this on
    ``[l, d*]`` with ``psi``. Where no such tangent exists (the chord is used) ``alpha`` is unused.
  """
  fl, fu = f(l), f(u)
  width_ok = u > l
  chord = jnp.where(width_ok, _safe_div(fu - fl, u - l, width_ok), df(l))
  chord_offset = fl - chord * l

  phi = lambda d: f(d) + df(d) * (l - d) - fl
  psi = lambda d: f(d) + df(d) * (u - d) - fu
  zeros = jnp.zeros_like(l)
  l_neg = jnp.minimum(l, 0)
  u_pos = jnp.maximum(u, 0)

  def bisect(_, carry):
    lo_up, hi_up, lo_lo, hi_lo = carry
    m_up = (lo_up + hi_up) / 2
    up_ok = phi(m_up) >= 0
    m_lo = (lo_lo + hi_lo) / 2
    lo_ok = psi(m_lo) <= 0
    return (
      jnp.where(up_ok, lo_up, m_up),
      jnp.where(up_ok, m_up, hi_up),
      jnp.where(lo_ok, m_lo, lo_lo),
      jnp.where(lo_ok, hi_lo, m_lo),
    )

  _, d_up, d_lo, _ = lax.fori_loop(0, iterations, bisect, (zeros, u_pos, l_neg, zeros))
  d_up, d_lo = lax.stop_gradient(d_up), lax.stop_gradient(d_lo)
  up_use_chord = phi(u_pos) < 0
  lo_use_chord = psi(l_neg) > 0
  convex, concave = u <= 0, l >= 0

  a_lo, a_up = alpha[0], alpha[1]
  # Convex (concave) part: any point of [l, u]; across 0: between the bisection's point and the end.
  lo_point = jnp.where(convex, (1 - a_lo) * l + a_lo * u, a_lo * d_lo + (1 - a_lo) * l)
  up_point = jnp.where(concave, (1 - a_up) * l + a_up * u, a_up * d_up + (1 - a_up) * u)
  lo_tangent = df(lo_point)
  lo_tangent_offset = f(lo_point) - lo_tangent * lo_point
  up_tangent = df(up_point)
  up_tangent_offset = f(up_point) - up_tangent * up_point

  lo_chord = concave | (~convex & lo_use_chord)
  up_chord = convex | (~concave & up_use_chord)
  return LinearBounds(
    jnp.where(lo_chord, chord, lo_tangent),
    jnp.where(lo_chord, chord_offset, lo_tangent_offset),
    jnp.where(up_chord, chord, up_tangent),
    jnp.where(up_chord, chord_offset, up_tangent_offset),
  )


def sigmoid_relaxation(l, u) -> LinearBounds:
  s = jax.nn.sigmoid
  return s_shaped_relaxation(l, u, s, lambda z: s(z) * (1 - s(z)))


def tanh_relaxation(l, u) -> LinearBounds:
  return s_shaped_relaxation(l, u, jnp.tanh, lambda z: 1 - jnp.tanh(z) ** 2)


def sigmoid_relaxation_with(l, u, alpha) -> LinearBounds:
  s = jax.nn.sigmoid
  return s_shaped_relaxation_with(l, u, s, lambda z: s(z) * (1 - s(z)), alpha)


def tanh_relaxation_with(l, u, alpha) -> LinearBounds:
  return s_shaped_relaxation_with(l, u, jnp.tanh, lambda z: 1 - jnp.tanh(z) ** 2, alpha)


def kink_alpha_init(bounds: LinearBounds, left, right):
  """The parameter ``[1, *shape]`` at which :func:`with_kink_support` keeps ``bounds``' supporting
  line at the kink: its slope is ``left + alpha (right - left)``."""
  convex = left <= right
  slope = jnp.where(convex, bounds.lower_slope, bounds.upper_slope)
  span = right - left
  alpha = _safe_div(slope - left, span, span != 0)
  return jnp.clip(alpha, 0, 1)[None]


def with_kink_support(
  bounds: LinearBounds, l, u, left, right, alpha, kink=0.0, value_at_kink=0.0, active=True
):
  """``bounds`` of a two-piece linear ``f`` (slopes ``left`` then ``right``, kink at ``kink`` where
  ``f(kink) = value_at_kink``) on ``[l, u]``, with the supporting line at the kink given slope
  ``left + alpha (right - left)``.

  Where the kink is inside (``l < kink < u``, and ``active``), a line through ``(kink, f(kink))``
  with a slope between ``left`` and ``right`` bounds ``f`` from below if it is convex (``left <=
  right``), from above if concave: it is a supporting line (the slope is a subgradient). Elsewhere
  ``bounds`` are kept. ``alpha`` (in [0, 1]) may carry leading row axes; the replaced side then
  has them.
  """
  dtype = jnp.result_type(l)
  left, right = jnp.asarray(left, dtype), jnp.asarray(right, dtype)
  slope = left + alpha * (right - left)
  convex = left <= right
  offset = value_at_kink - slope * kink
  inside = (l < kink) & (u > kink) & active
  lower_slope = jnp.where(inside & convex, slope, bounds.lower_slope)
  lower_offset = jnp.where(inside & convex, offset, bounds.lower_offset)
  upper_slope = jnp.where(inside & ~convex, slope, bounds.upper_slope)
  upper_offset = jnp.where(inside & ~convex, offset, bounds.upper_offset)
  return LinearBounds(lower_slope, lower_offset, upper_slope, upper_offset)
