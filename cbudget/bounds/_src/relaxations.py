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
  """
  fl, fu = f(l), f(u)
  width_ok = u > l
  chord = jnp.where(width_ok, _safe_div(fu - fl, u - l, width_ok), df(l))
  chord_offset = fl - chord * l
  mid = (l + u) / 2
  tangent = df(mid)
  tangent_offset = f(mid) - tangent * mid

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
  up_tangent = df(d_up)
  up_tangent_offset = f(d_up) - up_tangent * d_up
  lo_tangent = df(d_lo)
  lo_tangent_offset = f(d_lo) - lo_tangent * d_lo
  up_use_chord = phi(u_pos) < 0
  lo_use_chord = psi(l_neg) > 0

  convex, concave = u <= 0, l >= 0
  up_slope = jnp.where(
    convex, chord, jnp.where(concave, tangent, jnp.where(up_use_chord, chord, up_tangent))
  )
  up_offset = jnp.where(
    convex,
    chord_offset,
    jnp.where(concave, tangent_offset, jnp.where(up_use_chord, chord_offset, up_tangent_offset)),
  )
  lo_slope = jnp.where(
    convex, tangent, jnp.where(concave, chord, jnp.where(lo_use_chord, chord, lo_tangent))
  )
  lo_offset = jnp.where(
    convex,
    tangent_offset,
    jnp.where(concave, chord_offset, jnp.where(lo_use_chord, chord_offset, lo_tangent_offset)),
  )
  return LinearBounds(lo_slope, lo_offset, up_slope, up_offset)


def sigmoid_relaxation(l, u) -> LinearBounds:
  s = jax.nn.sigmoid
  return s_shaped_relaxation(l, u, s, lambda z: s(z) * (1 - s(z)))


def tanh_relaxation(l, u) -> LinearBounds:
  return s_shaped_relaxation(l, u, jnp.tanh, lambda z: 1 - jnp.tanh(z) ** 2)
