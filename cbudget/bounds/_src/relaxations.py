"""Interval bounds and linear relaxations of scalar nonlinearities, element-wise on ``[l, u]``.

Each ``*_relaxation`` returns :class:`LinearBounds` valid for every ``z`` in ``[l, u]``: the proofs are
in the docstrings. Divisions are guarded so that no NaN appears in an unused ``jnp.where`` branch
(that would poison gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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
  scale = lambda slope, z: jnp.where((slope == 0) & jnp.isinf(z), 0, slope * z)  # 0 * inf = 0
  f = lambda z: jnp.where(z < 0, scale(left, z), scale(right, z))
  fl, fu = f(l), f(u)
  kink_inside = (l < 0) & (u > 0)
  lo = jnp.minimum(jnp.minimum(fl, fu), jnp.where(kink_inside, 0, jnp.inf))
  hi = jnp.maximum(jnp.maximum(fl, fu), jnp.where(kink_inside, 0, -jnp.inf))
  return lo.astype(fl.dtype), hi.astype(fl.dtype)


def _unknown_where_nan(bounds: LinearBounds, l, u) -> LinearBounds:
  """NaN bounds wherever ``l`` or ``u`` is NaN: an unknown input must never look stable or dead."""
  nan = jnp.isnan(l) | jnp.isnan(u)
  return LinearBounds(*(jnp.where(nan, jnp.nan, b).astype(jnp.result_type(l)) for b in bounds))


def two_piece_relaxation(l, u, left, right, slope_choice="adaptive", kink=0.0) -> LinearBounds:
  """Linear bounds on ``[l, u]`` of the two-piece linear ``f`` with ``f(kink) = kink`` and slopes
  ``left`` below the kink, ``right`` above: ``f(z) = kink + left*(z - kink)`` or ``right*(...)``.

  ReLU is ``(0, 1)``, leaky ReLU ``(s, 1)``, ``abs`` ``(-1, 1)``, ``min(z, 0)`` ``(1, 0)``, all with
  kink 0; ``max(z, c)`` is ``(0, 1)`` and ``min(z, c)`` ``(1, 0)`` with kink ``c``.
  Stable (``l >= kink`` or ``u <= kink``): ``f`` is linear there and both bounds are exact. Across the
  kink the chord through ``(l, f(l))`` and ``(u, f(u))`` bounds a convex ``f`` (``left <= right``)
  from above and a concave one from below; on the other side any line through ``(kink, kink)`` with
  slope between ``left`` and ``right`` is a bound (a supporting line at the kink). ``slope_choice``
  picks it: ``"adaptive"`` (CROWN's default: ``right`` if ``u - kink > kink - l`` else ``left``; when
  ``left`` and ``right`` have opposite signs, as for ``abs``, the flat line, slope 0, which gives
  the exact minimum ``f(kink)``), ``"zero"`` (``left``), ``"one"`` (``right``) or ``"parallel"``
  (the chord's slope).

  Numerics: with ``t = (u - kink) / (u - l)`` and ``s = 1 - t`` (from halves, so no difference can
  overflow; the smaller of the two directly, the other as its complement), the chord has slope
  ``left s + right t`` and offset ``(1 - right) kink + (right - left) s u``, or equally
  ``(1 - left) kink + (left - right) t l``. For ReLU these are ``s u`` and ``-t l``: no cancellation
  (``right*u - chord*u`` loses everything when ``u >> |l|``). The offset taken is the larger
  (convex) or smaller (concave) of the two, so the line with the rounded slope still passes on the
  right side of both end points. One infinite end gives the limit line (e.g. ReLU on ``[l, inf]``:
  ``z - l``); two give the interval bound ``+-inf`` with slope 0; a NaN end gives NaN bounds.
  """
  if slope_choice not in SLOPE_CHOICES:
    raise ValueError(f"slope choice must be one of {SLOPE_CHOICES}, got {slope_choice!r}")
  dtype = jnp.result_type(l)
  # Python-number slopes and a zero kink (ReLU, abs) are resolved here rather than in the graph.
  static = _is_number(left) and _is_number(right)
  convex = left <= right if static else jnp.asarray(left, dtype) <= jnp.asarray(right, dtype)
  left = left if static else jnp.asarray(left, dtype)
  right = right if static else jnp.asarray(right, dtype)
  zero_kink = _is_number(kink) and kink == 0
  c = 0 if zero_kink else jnp.asarray(kink, dtype)
  unstable = (l < c) & (u > c)
  width = u / 2 - l / 2  # (u - l) / 2, finite for finite l, u
  above, below = (u / 2, -l / 2) if zero_kink else (u / 2 - c / 2, c / 2 - l / 2)
  right_heavy = above >= below
  # inf / inf (both ends infinite) gives NaN here; replaced below.
  small = _safe_div(jnp.where(right_heavy, below, above), width, unstable & (width > 0))
  t = jnp.where(right_heavy, 1 - small, small)  # (u - kink) / (u - l): the weight of the right end
  s = jnp.where(right_heavy, small, 1 - small)  # (kink - l) / (u - l)
  chord = left * s + right * t
  through_l = (left - right) * (t * l)
  through_u = (right - left) * (s * u)
  if not zero_kink:
    through_l = through_l + (1 - left) * c
    through_u = through_u + (1 - right) * c
  # An infinite end makes its form 0 * inf = NaN; fmax/fmin then take the other (the limit line).
  if static:
    chord_offset = jnp.fmax(through_l, through_u) if convex else jnp.fmin(through_l, through_u)
  else:
    chord_offset = jnp.where(convex, jnp.fmax(through_l, through_u), jnp.fmin(through_l, through_u))
  if slope_choice == "adaptive":
    if static and left < 0 < right or static and right < 0 < left:
      support = jnp.zeros_like(l)
    elif static:
      support = jnp.where(above > below, right, left).astype(dtype)
    else:
      flat_inside = (jnp.minimum(left, right) < 0) & (jnp.maximum(left, right) > 0)
      support = jnp.where(flat_inside, 0, jnp.where(above > below, right, left)).astype(dtype)
  elif slope_choice == "zero":
    support = left
  elif slope_choice == "one":
    support = right
  else:
    support = jnp.where(jnp.isnan(chord), right if static and convex else left, chord)
  support_offset = 0 if zero_kink else (1 - support) * c
  # Both ends infinite: no line bounds a bent f; the interval bound (+-inf) with slope 0 does.
  both_infinite = jnp.isinf(l) & jnp.isinf(u)
  chord = jnp.where(both_infinite, 0, chord)
  chord_offset = jnp.where(both_infinite, jnp.where(convex, jnp.inf, -jnp.inf), chord_offset)
  stable_slope = jnp.where(l >= c, right, left)
  stable_offset = 0 if zero_kink else (1 - stable_slope) * c
  up_slope = jnp.where(unstable, jnp.where(convex, chord, support), stable_slope)
  up_offset = jnp.where(unstable, jnp.where(convex, chord_offset, support_offset), stable_offset)
  lo_slope = jnp.where(unstable, jnp.where(convex, support, chord), stable_slope)
  lo_offset = jnp.where(unstable, jnp.where(convex, support_offset, chord_offset), stable_offset)
  bounds = LinearBounds(lo_slope, lo_offset, up_slope, up_offset)
  return _unknown_where_nan(bounds, l, u)


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.floating, np.integer))


def hard_tanh_relaxation(l, u, slope_choice="adaptive") -> LinearBounds:
  """Linear bounds of ``clip(z, -1, 1)`` on ``[l, u]``.

  * Entirely in one linear piece: exact.
  * One kink inside: on ``[l, u]`` the function is ``max(z, -1)`` or ``min(z, 1)``, relaxed as
    those two-piece functions.
  * Both kinks inside: the upper line through ``(l, -1)`` and ``(1, 1)`` has slope ``2/(1-l) < 1``,
    so it is above ``z`` on ``[-1, 1]``, above ``-1`` left of that and above ``1`` right of it; the
    lower line through ``(-1, -1)`` and ``(u, 1)`` is the mirror image. Their offsets are written
    as ``(-1 - l)/(1 - l)`` and ``(u + 1)/...``-style ratios, which neither cancel nor overflow, and
    an infinite end gives the constant bound (slope 0).
  """
  dtype = jnp.result_type(l)
  one = jnp.ones_like(l)
  zero = jnp.zeros_like(l)
  below, above = u <= -1, l >= 1
  linear_mid = (l >= -1) & (u <= 1)
  concave = (l >= -1) & (u > 1) & (l < 1)  # kink at 1 only
  convex = (u <= 1) & (l < -1) & (u > -1)  # kink at -1 only
  both = (l < -1) & (u > 1)
  cv = two_piece_relaxation(l, u, 0.0, 1.0, slope_choice, kink=-1.0)  # max(z, -1) here
  cc = two_piece_relaxation(l, u, 1.0, 0.0, slope_choice, kink=1.0)  # min(z, 1) here
  # 2 / (1 - l) = 1 / (1/2 - l/2): halves so that 1 - l cannot overflow; 1/inf = 0 at l = -inf.
  both_up_slope = _safe_div(one, 0.5 - l / 2, both)
  both_up_offset = _safe_div(-0.5 - l / 2, 0.5 - l / 2, both & jnp.isfinite(l))
  both_up_offset = jnp.where(jnp.isfinite(l), both_up_offset, 1)
  both_lo_slope = _safe_div(one, u / 2 + 0.5, both)
  both_lo_offset = -jnp.where(
    jnp.isfinite(u), _safe_div(u / 2 - 0.5, u / 2 + 0.5, both & jnp.isfinite(u)), 1
  )

  def pick(const_below, const_above, mid, cc, cv, bb):
    return jnp.select(
      [below, above, linear_mid, concave, convex, both], [const_below, const_above, mid, cc, cv, bb]
    ).astype(dtype)

  lo_slope = pick(zero, zero, one, cc.lower_slope, cv.lower_slope, both_lo_slope)
  lo_offset = pick(-one, one, zero, cc.lower_offset, cv.lower_offset, both_lo_offset)
  up_slope = pick(zero, zero, one, cc.upper_slope, cv.upper_slope, both_up_slope)
  up_offset = pick(-one, one, zero, cc.upper_offset, cv.upper_offset, both_up_offset)
  return _unknown_where_nan(LinearBounds(lo_slope, lo_offset, up_slope, up_offset), l, u)


def s_shaped_relaxation(l, u, f, df, iterations: int = 30, alpha=None) -> LinearBounds:
  """Linear bounds of an increasing ``f`` convex on ``z <= 0`` and concave on ``z >= 0`` (sigmoid, tanh).

  * ``u <= 0`` (convex): chord above; below, the tangent at the midpoint of ``[l, u]``.
  * ``l >= 0`` (concave): chord below; above, the tangent at the midpoint of ``[l, u]``.
  * ``l < 0 < u``, upper bound: a tangent at ``d >= d*``, where the tangent at ``d*`` in ``[0, u]``
    passes through ``(l, f(l))``. ``phi(d) = f(d) + f'(d)(l - d) - f(l)`` is increasing on ``d >= 0``
    (its derivative is ``f''(d)(l - d) >= 0``) with ``phi(0) <= 0``. Bisection keeps the end with
    ``phi >= 0``; for any ``d`` with ``phi(d) >= 0`` the tangent lies above ``f`` on ``[0, inf)``
    (concavity) and above ``(l, f(l))`` and ``(0, f(0))``, hence above the convex part's chord on
    ``[l, 0]``. We take ``d = max(d*, midpoint of [0, u])``: as ``l`` rises to 0, ``d*`` falls to 0
    and the bound becomes the concave case's, so the bound is continuous in ``(l, u)`` (no jump of
    the bound, or of its gradient's scale, when ``l`` crosses 0). If ``phi(u) < 0`` no such ``d <= u``
    exists and the chord is an upper bound (its slope is below ``f'(u)``); that chord is the tangent
    at ``d* = u`` in the limit, so this switch is continuous too. The lower bound mirrors this with
    ``psi(d) = f(d) + f'(d)(u - d) - f(u)`` on ``[l, 0]``, keeping the end with ``psi <= 0``.

  ``alpha`` (α-CROWN; ``[2, ...]`` in [0, 1], broadcasting against ``l``, e.g. ``[2, R, *l.shape]``)
  moves the lower tangent point to ``a d + (1 - a) l`` and the upper one to ``a d + (1 - a) u``
  (``a = 1``: the points above). Still sound: a tangent point in ``[l, u]`` where ``f`` is convex
  (concave) on ``[l, u]`` gives a lower (upper) bound, and across 0 ``phi`` increases on ``d >= 0``
  (``psi`` on ``d <= 0``), so ``phi >= 0`` (``psi <= 0``) holds from ``d*`` to ``u`` (``l``).

  The tangent points ``d*`` have no gradient (they are found by bisection); the bounds stay sound.
  Numerics: midpoints are ``l/2 + u/2`` and differences are taken of halves, so nothing overflows
  on huge finite boxes (where tangents and chords flatten to the saturated values); a chord's offset
  is the larger (upper) or smaller (lower) of its values through either end, so the rounded slope
  still passes on the right side of both. An infinite end gives the interval bounds ``f(l), f(u)``
  (slope 0), a NaN end NaN bounds.
  """
  finite = jnp.isfinite(l) & jnp.isfinite(u)
  lf, uf = jnp.where(finite, l, 0), jnp.where(finite, u, 0)  # no inf in the unused branches
  fl, fu = f(lf), f(uf)
  half_width = uf / 2 - lf / 2
  width_ok = half_width > 0
  chord = jnp.where(width_ok, _safe_div((fu - fl) / 2, half_width, width_ok), df(lf))
  through_l, through_u = fl - chord * lf, fu - chord * uf
  chord_up_offset = jnp.maximum(through_l, through_u)
  chord_lo_offset = jnp.minimum(through_l, through_u)

  def tangent_gap(d, z, fz):  # f(d) + f'(d)(z - d) - f(z), with (z - d) from halves
    return f(d) - fz + 2 * (df(d) * (z / 2 - d / 2))

  phi = lambda d: tangent_gap(d, lf, fl)
  psi = lambda d: tangent_gap(d, uf, fu)
  zeros = jnp.zeros_like(lf)
  l_neg = jnp.minimum(lf, 0)
  u_pos = jnp.maximum(uf, 0)

  def bisect(_, carry):
    lo_up, hi_up, lo_lo, hi_lo = carry
    m_up = lo_up / 2 + hi_up / 2
    up_ok = phi(m_up) >= 0
    m_lo = lo_lo / 2 + hi_lo / 2
    lo_ok = psi(m_lo) <= 0
    return (
      jnp.where(up_ok, lo_up, m_up),
      jnp.where(up_ok, m_up, hi_up),
      jnp.where(lo_ok, m_lo, lo_lo),
      jnp.where(lo_ok, hi_lo, m_lo),
    )

  _, d_up, d_lo, _ = lax.fori_loop(0, iterations, bisect, (zeros, u_pos, l_neg, zeros))
  mixed = (lf < 0) & (uf > 0)
  d_up = jnp.where(mixed, lax.stop_gradient(d_up), 0)
  d_lo = jnp.where(mixed, lax.stop_gradient(d_lo), 0)
  d_up = jnp.maximum(d_up, jnp.maximum(lf, 0) / 2 + uf / 2)  # midpoint of the concave part
  d_lo = jnp.minimum(d_lo, lf / 2 + jnp.minimum(uf, 0) / 2)  # midpoint of the convex part
  if alpha is not None:  # α-CROWN: tangent points between these and the far ends (see below)
    d_lo = alpha[0] * d_lo + (1 - alpha[0]) * lf
    d_up = alpha[1] * d_up + (1 - alpha[1]) * uf
  up_tangent = df(d_up)
  up_tangent_offset = f(d_up) - up_tangent * d_up
  lo_tangent = df(d_lo)
  lo_tangent_offset = f(d_lo) - lo_tangent * d_lo
  up_chord = (uf <= 0) | (mixed & (phi(u_pos) < 0))
  lo_chord = (lf >= 0) | (mixed & (psi(l_neg) > 0))

  up_slope = jnp.where(up_chord, chord, up_tangent)
  up_offset = jnp.where(up_chord, chord_up_offset, up_tangent_offset)
  lo_slope = jnp.where(lo_chord, chord, lo_tangent)
  lo_offset = jnp.where(lo_chord, chord_lo_offset, lo_tangent_offset)
  # An infinite end: the interval bounds (f is monotone; f(+-inf) is finite for sigmoid and tanh).
  zero = jnp.zeros_like(lf)
  bounds = LinearBounds(
    jnp.where(finite, lo_slope, zero),
    jnp.where(finite, lo_offset, f(l)),
    jnp.where(finite, up_slope, zero),
    jnp.where(finite, up_offset, f(u)),
  )
  return _unknown_where_nan(bounds, l, u)


def sigmoid_relaxation(l, u) -> LinearBounds:
  s = jax.nn.sigmoid
  return s_shaped_relaxation(l, u, s, lambda z: s(z) * (1 - s(z)))


def tanh_relaxation(l, u) -> LinearBounds:
  return s_shaped_relaxation(l, u, jnp.tanh, lambda z: 1 - jnp.tanh(z) ** 2)


def s_shaped_alpha_init(l, u):
  """The parameters ``[2, *l.shape]`` at which ``s_shaped_relaxation(..., alpha)`` is CROWN's."""
  return jnp.ones((2,) + jnp.shape(l), jnp.result_type(l))


def sigmoid_relaxation_with(l, u, alpha) -> LinearBounds:
  s = jax.nn.sigmoid
  return s_shaped_relaxation(l, u, s, lambda z: s(z) * (1 - s(z)), alpha=alpha)


def tanh_relaxation_with(l, u, alpha) -> LinearBounds:
  return s_shaped_relaxation(l, u, jnp.tanh, lambda z: 1 - jnp.tanh(z) ** 2, alpha=alpha)


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


def _log_max(dtype):
  return float(np.log(np.finfo(dtype).max))


def exp_relaxation(l, u) -> LinearBounds:
  """Linear bounds of ``exp`` on ``[l, u]`` (convex): the chord above, a tangent below.

  * Upper: the chord through ``(l, e^l)`` and ``(u, e^u)``; a convex function lies below its chord.
    Its slope is ``e^l expm1(w)/w`` with ``w = u - l`` when ``w <= 1`` (no cancellation as the box
    narrows; at ``w = 0`` the tangent ``e^l``), else ``(e^u/2 - e^l/2)/(u/2 - l/2)`` (halves: no
    overflow). The offset is the larger of the two through either end, so the rounded slope still
    passes above both. ``l = -inf`` gives the limit line, the constant ``e^u``; an ``e^u`` that
    overflows or nearly does (``u > log(max) - 2``, or ``u = inf``) gives the interval bound
    ``+inf`` with slope 0.
  * Lower: the tangent ``e^d (1 + z - d)`` at the midpoint ``d`` of the box: any tangent of a convex
    function lies below it everywhere. ``d`` is capped at ``log(max) - 8`` so that slope and offset
    stay finite (a tangent at any point is sound); an infinite end moves ``d`` to the finite end (0
    if both are infinite).

  A NaN end gives NaN bounds.
  """
  dtype = jnp.result_type(l)
  # Ends near overflow are treated as overflowing (a looser, sound bound); the clamped ends keep
  # every intermediate finite, so no inf or NaN reaches the gradient of an unused branch.
  near_overflow = _log_max(dtype) - 2
  lf = jnp.where(jnp.isfinite(l), l, jnp.where(jnp.isfinite(u), u, 0))
  uf = jnp.where(jnp.isfinite(u), u, lf)
  uf = jnp.minimum(uf, near_overflow)
  lf = jnp.minimum(lf, uf)
  el, eu = jnp.exp(lf), jnp.exp(uf)
  half_width = uf / 2 - lf / 2
  narrow = half_width <= 0.5
  w = 2 * jnp.where(narrow, half_width, 0)
  narrow_slope = el * jnp.where(w > 0, jnp.expm1(w) / jnp.where(w > 0, w, 1), 1)
  wide_slope = _safe_div(eu / 2 - el / 2, half_width, ~narrow)
  chord = jnp.where(narrow, narrow_slope, wide_slope)
  chord_offset = jnp.maximum(el - chord * lf, eu - chord * uf)
  # The chord's limit as l -> -inf: the constant e^u (0 when u = -inf too).
  limit = jnp.isneginf(l) & ~jnp.isposinf(u)
  chord = jnp.where(limit, 0, chord)
  chord_offset = jnp.where(limit, jnp.exp(jnp.where(jnp.isnan(u), 0, u)), chord_offset)
  overflow = ~(u <= near_overflow) | ~jnp.isfinite(chord) | ~jnp.isfinite(chord_offset)
  up_slope = jnp.where(overflow, 0, chord)
  up_offset = jnp.where(overflow, jnp.inf, chord_offset)
  d = jnp.where(jnp.isfinite(l) & jnp.isfinite(u), lf / 2 + uf / 2, lf)
  d = jnp.minimum(d, _log_max(dtype) - 8)
  lo_slope = jnp.exp(d)
  lo_offset = lo_slope * (1 - d)
  bounds = LinearBounds(lo_slope, lo_offset, up_slope, up_offset)
  return _unknown_where_nan(LinearBounds(*(b.astype(dtype) for b in bounds)), l, u)


def log_relaxation(l, u) -> LinearBounds:
  """Linear bounds of ``log`` on ``[l, u]`` (concave on ``z > 0``): a tangent above, the chord below.

  * Upper: the tangent ``log d + (z - d)/d`` at the midpoint ``d`` of the box (``2l``, or 1, when
    ``u = inf``); any tangent of a concave function lies above it everywhere. Where ``1/d``
    or its derivative would overflow (``d < sqrt(tiny)``, ``tiny`` the smallest normal number; this
    includes ``u = 0`` and subnormal boxes, which XLA may flush to 0), the constant
    ``log(max(u, tiny))``, slope 0, without gradient.
  * Lower: the chord through ``(l, log l)`` and ``(u, log u)``, below a concave function on
    ``[l, u]``. Slope ``log1p(w/l)/w`` with ``w = u - l`` when ``w <= l`` (no cancellation; at
    ``w = 0`` the tangent ``1/l``), else ``(log u - log l)/2 / (u/2 - l/2)``; the offset is the
    smaller of the two through either end. ``l < sqrt(tiny)`` gives the constant ``log l`` (``-inf``
    at 0) without gradient; ``u = inf`` the limit line, the constant ``log l``.

  ``log`` of a negative number is NaN, so ``l < 0`` (a reachable NaN) gives NaN bounds, as does a NaN
  end: nothing is certified from them.
  """
  dtype = jnp.result_type(l)
  # Below `small`, 1/z (the slopes) or its derivative 1/z^2 would overflow: such ends get constant
  # bounds without gradient (sound; the gradient only steers training).
  tiny = np.finfo(dtype).tiny
  small = float(np.sqrt(tiny))
  positive = l > 0
  chord_ok = (l >= small) & jnp.isfinite(l)
  lf = jnp.where(chord_ok, l, 1)
  uf = jnp.where(jnp.isfinite(u) & chord_ok, u, jnp.maximum(lf, 1))
  # Upper: a tangent.
  d = jnp.where(jnp.isfinite(u), jnp.maximum(l, 0) / 2 + u / 2, jnp.where(chord_ok, 2 * lf, 1))
  tangent_ok = (d >= small) & ~jnp.isnan(d)
  d_safe = jnp.where(tangent_ok, d, 1)
  up_slope = jnp.where(tangent_ok, 1 / d_safe, 0)
  constant_up = lax.stop_gradient(jnp.log(jnp.maximum(u, tiny)))
  up_offset = jnp.where(tangent_ok, jnp.log(d_safe) - 1, constant_up)
  # Lower: the chord.
  half_width = uf / 2 - lf / 2
  narrow = 2 * half_width <= lf
  w = 2 * jnp.where(narrow, half_width, 0)
  narrow_slope = jnp.where(w > 0, jnp.log1p(w / lf) / jnp.where(w > 0, w, 1), 1 / lf)
  wide_slope = _safe_div(jnp.log(uf) / 2 - jnp.log(lf) / 2, half_width, ~narrow)
  chord = jnp.where(narrow, narrow_slope, wide_slope)
  chord_offset = jnp.minimum(jnp.log(lf) - chord * lf, jnp.log(uf) - chord * uf)
  upper_infinite = jnp.isinf(u)
  lo_slope = jnp.where(chord_ok & ~upper_infinite, chord, 0)
  constant_lo = lax.stop_gradient(jnp.log(jnp.where(positive, l, 0)))  # log l, -inf at l = 0
  lo_offset = jnp.where(chord_ok, jnp.where(upper_infinite, jnp.log(lf), chord_offset), constant_lo)
  bounds = LinearBounds(lo_slope, lo_offset, up_slope, up_offset)
  bounds = LinearBounds(*(jnp.where(l < 0, jnp.nan, b).astype(dtype) for b in bounds))
  return _unknown_where_nan(bounds, l, u)
