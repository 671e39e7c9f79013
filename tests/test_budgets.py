"""Tests for cbudget.budgets: the exact log-volume projection (``project_rows``, what ``budgets``
runs), budget modes, stats."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax.test_util import check_grads

from cbudget.budgets import (
  BudgetConfig,
  BudgetRangeError,
  budget_stats,
  budgets,
  clipped_half_width,
  make_budget_config,
  project_effective_rows,
  project_rows,
)


@pytest.fixture
def x64():
  """Enable float64 for the test, restoring the previous setting afterwards."""
  with jax.enable_x64(True):
    yield


def project(raw, t, lo, hi):
  """``project_rows`` on ``[B, ...]`` arrays (one row per example), targets scalar or ``[B]``."""
  raw = jnp.asarray(raw)
  b = raw.shape[0]
  per_row = lambda v: jnp.broadcast_to(jnp.asarray(v, raw.dtype), (b,))
  return project_rows(raw.reshape(b, -1), per_row(t), per_row(lo), per_row(hi)).reshape(raw.shape)


# ----------------------------------------------------------------------------
# Reference and analytic Jacobian
# ----------------------------------------------------------------------------


def reference_projection(raw, t, lo, hi):
  """float64 numpy bisection on tau, row-wise; raw [B, d], t/lo/hi [B]."""
  raw = np.asarray(raw, np.float64)
  out = np.empty_like(raw)
  for b in range(raw.shape[0]):
    r = raw[b]
    f = lambda tau: np.mean(np.clip(r + tau, lo[b], hi[b]))
    a, c = lo[b] - r.max() - 1.0, hi[b] - r.min() + 1.0  # f(a) = lo, f(c) = hi
    for _ in range(200):
      m = 0.5 * (a + c)
      if m in (a, c):
        break
      if f(m) < t[b]:
        a = m
      else:
        c = m
    out[b] = np.clip(r + 0.5 * (a + c), lo[b], hi[b])
  return out


def analytic_jacobians(v, lo, hi):
  """dv/draw [d, d], dv/dt, dv/dlo, dv/dhi [d] for one row (away from kinks)."""
  d = v.shape[0]
  free = (v > lo) & (v < hi)
  at_lo, at_hi = v <= lo, v >= hi
  n = free.sum()
  J = np.zeros((d, d))
  J[np.ix_(free, free)] = np.eye(n) - 1.0 / n
  dt = np.where(free, d / n, 0.0)
  dlo = np.where(free, -at_lo.sum() / n, at_lo.astype(float))
  dhi = np.where(free, -at_hi.sum() / n, at_hi.astype(float))
  return J, dt, dlo, dhi


# ----------------------------------------------------------------------------
# Projection: exactness, range, idempotence, reference
# ----------------------------------------------------------------------------


def test_exact_mean_float64(x64):
  rng = np.random.default_rng(0)
  raw = jnp.asarray(rng.normal(size=(16, 8, 8, 3)) * 2.0)
  t = jnp.asarray(rng.uniform(-3, -1, size=16))
  lo, hi = t + math.log(0.25), t + math.log(4.0)
  v = project(raw, t, lo, hi)
  assert v.dtype == jnp.float64 and v.shape == raw.shape
  np.testing.assert_allclose(np.mean(np.asarray(v), axis=(1, 2, 3)), t, rtol=0, atol=1e-12)
  assert np.all(np.asarray(v) >= np.asarray(lo)[:, None, None, None])
  assert np.all(np.asarray(v) <= np.asarray(hi)[:, None, None, None])


def test_exact_mean_float32():
  rng = np.random.default_rng(1)
  raw = jnp.asarray(rng.normal(size=(8, 28, 28, 1)) * 3.0, jnp.float32)
  t = math.log(0.1)
  v = project(raw, t, t + math.log(0.25), t + math.log(4.0))
  assert v.dtype == jnp.float32
  mean = np.mean(np.asarray(v, np.float64), axis=(1, 2, 3))
  np.testing.assert_allclose(mean, t, rtol=0, atol=1e-5)
  assert np.all(np.asarray(v) >= np.float32(t + math.log(0.25)))
  assert np.all(np.asarray(v) <= np.float32(t + math.log(4.0)))


def _rows_strategy():
  """Rows with ties (values from a small grid), heavy clipping (large spread)."""

  @st.composite
  def rows(draw):
    b = 2  # few distinct shapes: one compilation each
    d = draw(st.sampled_from([1, 2, 3, 16]))
    spread = draw(st.sampled_from([0.01, 1.0, 10.0, 100.0]))
    ties = draw(st.booleans())
    elems = (
      st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0])
      if ties
      else st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False)
    )
    raw = (
      np.array(draw(st.lists(elems, min_size=b * d, max_size=b * d)), np.float64).reshape(b, d)
      * spread
    )
    lo = -np.array(draw(st.lists(st.floats(0.0, 2.0), min_size=b, max_size=b)))
    hi = np.array(draw(st.lists(st.floats(0.0, 2.0), min_size=b, max_size=b)))
    s = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=b, max_size=b)))
    t = lo + s * (hi - lo)  # feasible target, endpoints included
    t = np.clip(t, lo, hi)
    shift = draw(st.floats(-5.0, 5.0))
    return raw, t + shift, lo + shift, hi + shift

  return rows()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rows_strategy())
def test_matches_bruteforce_reference(case):
  raw, t, lo, hi = case
  with jax.enable_x64(True):
    v = np.asarray(project(jnp.asarray(raw), t, lo, hi))
  ref = reference_projection(raw, t, lo, hi)
  np.testing.assert_allclose(v, ref, rtol=0, atol=1e-9)
  np.testing.assert_allclose(v.mean(axis=1), t, rtol=0, atol=1e-12 * (1 + np.abs(t).max()))
  assert np.all(v >= lo[:, None]) and np.all(v <= hi[:, None])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rows_strategy())
def test_idempotent(case):
  raw, t, lo, hi = case
  with jax.enable_x64(True):
    v = project(jnp.asarray(raw), t, lo, hi)
    v2 = project(v, t, lo, hi)
  np.testing.assert_allclose(
    np.asarray(v2), np.asarray(v), rtol=0, atol=1e-12 * (1 + np.abs(t).max())
  )


def test_edge_cases(x64):
  raw = jnp.asarray([[0.3, -1.0, 2.0], [0.0, 0.0, 0.0]])
  # Target on a bound: every coordinate clipped, v is that constant.
  np.testing.assert_array_equal(project(raw, -1.0, -1.0, 1.0), -np.ones((2, 3)))
  np.testing.assert_array_equal(project(raw, 1.0, -1.0, 1.0), np.ones((2, 3)))
  # Degenerate range lo == t == hi.
  np.testing.assert_array_equal(project(raw, 0.5, 0.5, 0.5), np.full((2, 3), 0.5))
  # All ties: v == t.
  np.testing.assert_allclose(project(raw[1:], -0.2, -1.0, 1.0), np.full((1, 3), -0.2), atol=1e-15)
  # d == 1: v == t, zero gradient w.r.t. raw, unit gradient w.r.t. t.
  r1 = jnp.asarray([[5.0], [-3.0]])
  np.testing.assert_allclose(project(r1, 0.1, -1.0, 1.0), np.full((2, 1), 0.1), atol=1e-15)
  g_raw = jax.grad(lambda r: project(r, 0.1, -1.0, 1.0).sum())(r1)
  g_t = jax.grad(lambda t: project(r1, t, -1.0, 1.0).sum())(0.1)
  np.testing.assert_array_equal(g_raw, 0.0)
  np.testing.assert_allclose(g_t, 2.0)
  # Infinite bounds mean no clipping on that side.
  v = project(raw[:1], 0.0, -jnp.inf, jnp.inf)
  np.testing.assert_allclose(v, raw[:1] - raw[:1].mean(), atol=1e-15)
  # Gradients at a fully clipped point are finite (derivative of the constant v == t).
  g = jax.grad(lambda t: project(raw, t, -1.0, 1.0).sum())(-1.0)
  np.testing.assert_allclose(g, 6.0)


# ----------------------------------------------------------------------------
# Derivatives
# ----------------------------------------------------------------------------


def _generic_case(seed, d=7, margin=1e-3):
  """A row with some coordinates clipped and >= 2 free, all away from kinks."""
  rng = np.random.default_rng(seed)
  t, lo, hi = np.array([0.2]), np.array([-0.8]), np.array([0.9])
  while True:
    raw = rng.normal(size=(1, d)) * 1.5
    v = reference_projection(raw, t, lo, hi)[0]
    free = (v > lo[0]) & (v < hi[0])
    if not 2 <= free.sum() < d:
      continue
    u = raw[0] + np.mean(v[free] - raw[0][free])  # raw + tau
    if np.min(np.minimum(np.abs(u - lo[0]), np.abs(u - hi[0]))) > margin:
      return raw, t, lo, hi


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jacobian_matches_formula_and_finite_differences(x64, seed):
  raw, t, lo, hi = _generic_case(seed)
  raw_j = jnp.asarray(raw)
  f = lambda r, t_, lo_, hi_: project(r[None], t_, lo_, hi_)[0]
  args = (raw_j[0], jnp.asarray(t[0]), jnp.asarray(lo[0]), jnp.asarray(hi[0]))
  v = np.asarray(f(*args))
  J, dt, dlo, dhi = analytic_jacobians(v, lo[0], hi[0])

  for jac in (jax.jacfwd, jax.jacrev):
    Js = jac(f, argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(Js[0], J, atol=1e-12)
    np.testing.assert_allclose(Js[1], dt, atol=1e-12)
    np.testing.assert_allclose(Js[2], dlo, atol=1e-12)
    np.testing.assert_allclose(Js[3], dhi, atol=1e-12)

  # Central finite differences (h far below the distance to any kink).
  h = 1e-6
  fd = np.stack(
    [
      (
        np.asarray(f(args[0].at[j].add(h), *args[1:]))
        - np.asarray(f(args[0].at[j].add(-h), *args[1:]))
      )
      / (2 * h)
      for j in range(raw.shape[1])
    ],
    axis=1,
  )
  np.testing.assert_allclose(fd, J, atol=1e-7)
  for k, ref in ((1, dt), (2, dlo), (3, dhi)):
    plus = list(args)
    minus = list(args)
    plus[k] = args[k] + h
    minus[k] = args[k] - h
    fd_k = (np.asarray(f(*plus)) - np.asarray(f(*minus))) / (2 * h)
    np.testing.assert_allclose(fd_k, ref, atol=1e-7)


def test_gradient_wrt_log_eps0(x64):
  raw, t, lo, hi = _generic_case(5)
  w = np.random.default_rng(0).normal(size=raw.shape[1])
  loss = lambda t_: jnp.sum(w * project(jnp.asarray(raw), t_, lo, hi)[0])
  v = np.asarray(project(jnp.asarray(raw), t, lo, hi))[0]
  _, dt, _, _ = analytic_jacobians(v, lo[0], hi[0])
  np.testing.assert_allclose(jax.grad(loss)(t[0]), np.sum(w * dt), rtol=1e-12)
  # d mean(v) / d log_eps0 == 1 (the volume follows the target exactly).
  g = jax.grad(lambda t_: jnp.mean(project(jnp.asarray(raw), t_, lo, hi)))(t[0])
  np.testing.assert_allclose(g, 1.0, rtol=1e-12)


def test_gradients_float32_finite():
  raw = jnp.asarray(np.random.default_rng(3).normal(size=(4, 10)), jnp.float32)
  g = jax.grad(lambda r: jnp.sum(jnp.sin(project(r, -2.0, -3.0, -1.0))))(raw)
  assert g.dtype == jnp.float32 and np.all(np.isfinite(g))
  # Each row's gradient sums to zero: shifting raw by a constant does not change v.
  np.testing.assert_allclose(np.asarray(g).sum(axis=1), 0.0, atol=1e-5)


# ----------------------------------------------------------------------------
# Validation, jit and vmap
# ----------------------------------------------------------------------------


def test_jit_and_vmap_match_eager():
  rng = np.random.default_rng(4)
  raw = jnp.asarray(rng.normal(size=(6, 5, 5, 1)), jnp.float32)
  t = jnp.asarray(rng.uniform(-3, -1, size=6), jnp.float32)
  lo, hi = t - 1.0, t + 0.5
  eager = project(raw, t, lo, hi)
  jitted = jax.jit(project)(raw, t, lo, hi)  # traced targets (e.g. a schedule)
  np.testing.assert_allclose(jitted, eager, atol=1e-6)
  one = lambda r, t_, lo_, hi_: project(r[None], t_, lo_, hi_)[0]
  vmapped = jax.vmap(one)(raw, t, lo, hi)
  np.testing.assert_allclose(vmapped, eager, atol=1e-6)
  g_eager = jax.grad(lambda r: jnp.sum(project(r, t, lo, hi) ** 2))(raw)
  g_jit = jax.jit(jax.grad(lambda r: jnp.sum(project(r, t, lo, hi) ** 2)))(raw)
  np.testing.assert_allclose(g_jit, g_eager, atol=1e-5)


# ----------------------------------------------------------------------------
# Budget config and modes
# ----------------------------------------------------------------------------


def test_make_budget_config_validation():
  cfg = make_budget_config("global", (0.5, 2.0), per_pixel=False)
  assert cfg == BudgetConfig("global", 0.5, 2.0, False)
  assert make_budget_config("uniform").mode == "uniform"
  hash(cfg)  # usable as a static jit argument
  with pytest.raises(BudgetRangeError, match="must contain 1"):
    make_budget_config("global", (1.5, 2.0))
  with pytest.raises(BudgetRangeError, match="must contain 1"):
    make_budget_config("contextual", (0.5, 0.9))
  with pytest.raises(BudgetRangeError, match="> 0"):
    make_budget_config("global", (0.0, 2.0))
  with pytest.raises(BudgetRangeError, match="unknown budget mode"):
    make_budget_config("adaptive", (0.5, 2.0))
  with pytest.raises(BudgetRangeError, match="requires budget_range"):
    make_budget_config("contextual")
  with pytest.raises(BudgetRangeError):
    BudgetConfig("global", -1.0, 2.0)


def test_uniform_mode_exact():
  cfg = make_budget_config("uniform")
  eps = budgets(cfg, 0.3, None, (2, 4, 4, 3))
  assert eps.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(eps, np.float32(0.3))
  eps = budgets(cfg, jnp.asarray([0.1, 0.2]), None, (2, 3))
  np.testing.assert_array_equal(eps, np.asarray([[0.1] * 3, [0.2] * 3], np.float32))


@pytest.mark.parametrize("mode", ["global", "contextual"])
@pytest.mark.parametrize("per_pixel", [True, False])
def test_learned_modes_exact_volume_and_range(x64, mode, per_pixel):
  a, b = 0.25, 4.0
  cfg = make_budget_config(mode, (a, b), per_pixel=per_pixel)
  shape = (5, 6, 6, 3)
  rng = np.random.default_rng(6)
  raw = jnp.asarray(rng.normal(size=shape[:-1] + ((1,) if per_pixel else (3,))) * 2.0)
  eps0 = jnp.asarray([1e-6, 1e-3, 0.03, 0.3, 1.0])
  eps = np.asarray(budgets(cfg, eps0, raw, shape))
  assert eps.shape == shape
  np.testing.assert_allclose(np.mean(np.log(eps), axis=(1, 2, 3)), np.log(eps0), rtol=0, atol=1e-12)
  e0 = np.asarray(eps0)[:, None, None, None]
  cap = np.minimum(b * e0, 1.0)  # no budget wider than the domain
  assert np.all(eps >= a * e0 * (1 - 1e-12)) and np.all(eps <= cap * (1 + 1e-12))
  assert np.any(np.isclose(eps, a * e0)) and np.any(np.isclose(eps, b * e0))  # clipping is active
  assert np.any(np.isclose(eps[3], 1.0))  # the cap is active at eps0 = 0.3 (b eps0 = 1.2)
  np.testing.assert_array_equal(eps[4], 1.0)  # eps0 = 1: the cap leaves one feasible point
  if per_pixel:
    np.testing.assert_array_equal(eps, np.broadcast_to(eps[..., :1], shape))


def test_learned_mode_float32_volume():
  cfg = make_budget_config("contextual", (0.5, 2.0))
  raw = jnp.asarray(np.random.default_rng(7).normal(size=(4, 28, 28, 1)), jnp.float32)
  eps = budgets(cfg, 0.1, raw, (4, 28, 28, 1))
  assert eps.dtype == jnp.float32
  np.testing.assert_allclose(
    np.mean(np.log(np.asarray(eps, np.float64)), axis=(1, 2, 3)), math.log(0.1), atol=1e-5
  )


def test_eps0_zero_gives_zeros_and_finite_gradients():
  cfg = make_budget_config("contextual", (0.5, 2.0))
  raw = jnp.asarray(np.random.default_rng(8).normal(size=(2, 4, 4, 1)), jnp.float32)
  eps = budgets(cfg, 0.0, raw, (2, 4, 4, 3))
  np.testing.assert_array_equal(eps, 0.0)
  loss = lambda r, e0: jnp.sum(
    budgets(cfg, e0, r, (2, 4, 4, 3)) * jnp.arange(96.0).reshape(2, 4, 4, 3)
  )
  g_raw, g_e0 = jax.jit(jax.grad(loss, argnums=(0, 1)))(raw, 0.0)
  assert np.all(np.isfinite(g_raw)) and np.isfinite(g_e0)
  np.testing.assert_array_equal(g_raw, 0.0)
  assert g_e0 > 0
  g_uniform = jax.grad(
    lambda e0: jnp.sum(budgets(make_budget_config("uniform"), e0, None, (2, 3)))
  )(0.0)
  np.testing.assert_allclose(g_uniform, 6.0)


def test_budgets_under_jit_with_traced_eps0():
  cfg = make_budget_config("global", (0.5, 2.0))
  raw = jnp.asarray(np.random.default_rng(9).normal(size=(3, 4, 4, 1)), jnp.float32)
  f = jax.jit(budgets, static_argnums=(0, 3))
  np.testing.assert_allclose(
    f(cfg, 0.05, raw, (3, 4, 4, 2)), budgets(cfg, 0.05, raw, (3, 4, 4, 2)), rtol=1e-6
  )


def test_budgets_shape_errors():
  cfg = make_budget_config("contextual", (0.5, 2.0), per_pixel=True)
  with pytest.raises(ValueError, match="raw_log_budgets"):
    budgets(cfg, 0.1, None, (2, 4, 4, 3))
  with pytest.raises(ValueError, match="not broadcastable|does not match"):
    budgets(cfg, 0.1, jnp.zeros((2, 4, 4, 3)), (2, 4, 4, 3))
  with pytest.raises(ValueError, match="eps0"):
    budgets(cfg, -0.1, jnp.zeros((2, 4, 4, 1)), (2, 4, 4, 3))
  with pytest.raises(ValueError, match="domain"):
    budgets(cfg, 1.5, jnp.zeros((2, 4, 4, 1)), (2, 4, 4, 3))
  effective = make_budget_config("contextual", (0.5, 2.0), volume="effective")
  with pytest.raises(ValueError, match="needs the inputs"):
    budgets(effective, 0.1, jnp.zeros((2, 4, 4, 1)), (2, 4, 4, 3))
  with pytest.raises(BudgetRangeError, match="unknown volume"):
    make_budget_config("contextual", (0.5, 2.0), volume="clipped")


def test_budgets_gradients_match_finite_differences(x64):
  """The production path end to end: raw log-budgets and eps0 -> budgets, differentiated."""
  cfg = make_budget_config("contextual", (0.25, 4.0))
  raw = jnp.asarray(np.random.default_rng(12).normal(size=(2, 3, 3, 1)))
  w = jnp.asarray(np.random.default_rng(13).normal(size=(2, 3, 3, 2)))
  loss = lambda r, e0: jnp.sum(w * budgets(cfg, e0, r, (2, 3, 3, 2)))
  check_grads(loss, (raw, 0.1), order=1, modes=["fwd", "rev"], eps=1e-6, atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------
# Effective volume: the clipped boxes have a uniform eps0's log-volume on the same image
# ----------------------------------------------------------------------------


def _images(seed, shape=(4, 6, 6, 3)):
  """Uniform pixels, with whole black and white rows (where the domain clips most)."""
  x = np.random.default_rng(seed).uniform(size=shape)
  x[0, :3] = 0.0
  x[1, :2] = 1.0
  return jnp.asarray(x)


def _effective_log_volume(eps, x):
  return np.mean(np.log(np.asarray(clipped_half_width(eps, x))), axis=(1, 2, 3))


def test_clipped_half_width_is_the_box_radius(x64):
  x = _images(20)
  eps = jnp.asarray(np.random.default_rng(21).uniform(0, 1.2, size=x.shape))
  from cbudget.bounds import Box

  np.testing.assert_allclose(clipped_half_width(eps, x), Box.from_budget(x, eps).radius, atol=1e-15)
  # A tiny budget next to a bright pixel keeps its width (no cancellation to 0).
  assert float(clipped_half_width(jnp.float32(1e-9), jnp.float32(0.9))) == np.float32(1e-9)


@pytest.mark.parametrize("mode", ["global", "contextual"])
@pytest.mark.parametrize("per_pixel", [True, False])
def test_effective_volume_exact_and_range(x64, mode, per_pixel):
  a, b = 0.1, 10.0
  cfg = make_budget_config(mode, (a, b), per_pixel=per_pixel, volume="effective")
  x = _images(22)
  raw = jnp.asarray(
    np.random.default_rng(23).normal(size=x.shape[:-1] + ((1,) if per_pixel else (3,))) * 2
  )
  eps0 = jnp.asarray([1e-3, 0.05, 0.3, 1.0])
  eps = np.asarray(budgets(cfg, eps0, raw, x.shape, x=x))
  e0 = np.asarray(eps0)[:, None, None, None]
  uniform = _effective_log_volume(jnp.broadcast_to(eps0[:, None, None, None], x.shape), x)
  np.testing.assert_allclose(_effective_log_volume(eps, x), uniform, rtol=0, atol=1e-12)
  assert np.all(eps >= a * e0 * (1 - 1e-12)) and np.all(eps <= np.minimum(b * e0, 1.0) + 1e-12)
  assert np.any(np.isclose(eps[:3], 1.0))  # the cap is reached
  # The nominal volume is larger than eps0's where budgets grow on clipped (black/white) pixels:
  # the point of effective volume is that this buys nothing.
  assert np.all(np.mean(np.log(eps[1:3]), axis=(1, 2, 3)) > np.log(eps0[1:3]))
  if per_pixel:
    np.testing.assert_array_equal(eps, np.broadcast_to(eps[..., :1], x.shape))


def test_effective_volume_matches_bruteforce_reference(x64):
  """A float64 numpy bisection on the shift gives the same budgets."""
  x = _images(24, (3, 5, 5, 1))
  raw = np.random.default_rng(25).normal(size=x.shape) * 1.5
  eps0, a, b = 0.2, 0.25, 4.0
  cfg = make_budget_config("contextual", (a, b), volume="effective")
  eps = np.asarray(budgets(cfg, eps0, jnp.asarray(raw), x.shape, x=x))
  xs = np.asarray(x)
  for n in range(3):
    h = lambda e: np.asarray(clipped_half_width(e, xs[n]))
    g = lambda tau: np.mean(np.log(h(np.exp(np.clip(raw[n] + tau, lo, hi)))))
    lo, hi = math.log(a * eps0), min(math.log(b * eps0), 0.0)
    target = np.mean(np.log(h(np.full(xs[n].shape, eps0))))
    left, right = lo - raw[n].max() - 1, hi - raw[n].min() + 1
    for _ in range(200):
      mid = 0.5 * (left + right)
      left, right = (mid, right) if g(mid) < target else (left, mid)
    np.testing.assert_allclose(eps[n], np.exp(np.clip(raw[n] + right, lo, hi)), rtol=1e-10)


def test_effective_projection_jacobian_matches_finite_differences(x64):
  """The custom JVP of the projection against finite differences, in every argument."""
  rng = np.random.default_rng(26)
  x = jnp.asarray(rng.uniform(0.05, 0.95, size=(2, 10, 2)))  # inside (0, 1): x is perturbed too
  r = jnp.asarray(rng.normal(size=(2, 10)))
  t = jnp.asarray([math.log(0.08), math.log(0.15)])
  lo = jnp.asarray([math.log(0.03), math.log(0.05)])
  hi = jnp.asarray([math.log(0.3), 0.0])
  v = project_effective_rows(r, x, t, lo, hi)
  free = (v > lo[:, None]) & (v < hi[:, None])
  assert np.any(free) and np.any(~free)  # both clipped and free coordinates are exercised
  check_grads(
    project_effective_rows, (r, x, t, lo, hi), order=1, modes=["fwd", "rev"], eps=1e-7, atol=1e-6
  )


def test_effective_budgets_gradients_match_finite_differences(x64):
  """The production path end to end, with black and white pixels (x itself held fixed)."""
  cfg = make_budget_config("contextual", (0.1, 10.0), volume="effective")
  x = _images(27, (2, 4, 4, 3))
  raw = jnp.asarray(np.random.default_rng(28).normal(size=(2, 4, 4, 1)) * 2)
  w = jnp.asarray(np.random.default_rng(29).normal(size=x.shape))
  loss = lambda r, e0: jnp.sum(w * budgets(cfg, e0, r, x.shape, x=x))
  check_grads(loss, (raw, 0.2), order=1, modes=["fwd", "rev"], eps=1e-7, atol=1e-6, rtol=1e-5)


def test_effective_budgets_eps0_zero_and_float32():
  cfg = make_budget_config("contextual", (0.1, 10.0), volume="effective")
  x = jnp.asarray(_images(30, (2, 8, 8, 1)), jnp.float32)
  raw = jnp.asarray(np.random.default_rng(31).normal(size=(2, 8, 8, 1)), jnp.float32)
  np.testing.assert_array_equal(budgets(cfg, 0.0, raw, x.shape, x=x), 0.0)
  g = jax.jit(jax.grad(lambda r: jnp.sum(budgets(cfg, 0.0, r, x.shape, x=x))))(raw)
  np.testing.assert_array_equal(g, 0.0)
  eps = budgets(cfg, 0.1, raw, x.shape, x=x)
  assert eps.dtype == jnp.float32
  uniform = _effective_log_volume(jnp.full(x.shape, 0.1, jnp.float32), x)
  np.testing.assert_allclose(_effective_log_volume(eps, x), uniform, atol=2e-6)


# ----------------------------------------------------------------------------
# Sigmoid squash (project_soft_rows)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("volume", ["nominal", "effective"])
@pytest.mark.parametrize("per_pixel", [True, False])
def test_sigmoid_squash_exact_volume_strictly_inside_the_range(x64, volume, per_pixel):
  cfg = make_budget_config("contextual", (0.25, 4.0), per_pixel, volume, squash="sigmoid")
  x = _images(40)
  channels = 1 if per_pixel else 3
  raw = jnp.asarray(np.random.default_rng(41).normal(size=(4, 6, 6, channels)) * 3)
  eps0 = jnp.asarray([0.05, 0.1, 0.3, 0.6])
  eps = budgets(cfg, eps0, raw, x.shape, x=x)
  lo, hi = 0.25 * eps0[:, None, None, None], jnp.minimum(4 * eps0[:, None, None, None], 1.0)
  assert np.all(eps > lo) and np.all(eps < hi)  # a sigmoid reaches neither end
  if volume == "nominal":
    np.testing.assert_allclose(np.mean(np.log(eps), axis=(1, 2, 3)), np.log(eps0), atol=1e-12)
  else:
    uniform = _effective_log_volume(jnp.broadcast_to(eps0[:, None, None, None], x.shape), x)
    np.testing.assert_allclose(_effective_log_volume(eps, x), uniform, atol=1e-12)


@pytest.mark.parametrize("volume", ["nominal", "effective"])
def test_sigmoid_squash_gradients_match_finite_differences(x64, volume):
  """The implicit-function JVP of the solved shift, end to end, in the raw budgets and eps0, to
  second order (the rule differentiates the shift again, never the bisection)."""
  cfg = make_budget_config("contextual", (0.1, 10.0), volume=volume, squash="sigmoid")
  x = _images(42, (2, 4, 4, 3))
  raw = jnp.asarray(np.random.default_rng(43).normal(size=(2, 4, 4, 1)) * 2)
  w = jnp.asarray(np.random.default_rng(44).normal(size=x.shape))
  loss = lambda r, e0: jnp.sum(w * budgets(cfg, e0, r, x.shape, x=x))
  check_grads(loss, (raw, 0.2), order=2, modes=["fwd", "rev"], eps=1e-6, atol=1e-5, rtol=1e-4)


def test_sigmoid_squash_keeps_the_gradient_of_saturated_budgets(x64):
  """The reason for the sigmoid: a budget the clip holds at an end gets no gradient, the sigmoid's
  does (and moves the others through the volume constraint)."""
  raw = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(8.0)  # far above the others: clipped at b·ε₀
  w = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(1.0)
  grads = {}
  for squash in ("clip", "sigmoid"):
    cfg = make_budget_config("contextual", (0.25, 4.0), squash=squash)
    grads[squash] = jax.grad(lambda r: jnp.sum(w * jnp.log(budgets(cfg, 0.1, r, r.shape))))(raw)
  assert grads["clip"][0, 0, 0, 0] == 0.0
  assert grads["sigmoid"][0, 0, 0, 0] > 1e-5


def test_sigmoid_squash_config_and_collapsed_ranges():
  with pytest.raises(BudgetRangeError, match="a < 1 < b"):
    make_budget_config("contextual", (1.0, 4.0), squash="sigmoid")
  with pytest.raises(BudgetRangeError, match="unknown squash"):
    make_budget_config("contextual", (0.5, 2.0), squash="tanh")
  assert make_budget_config("uniform", squash="sigmoid").squash == "sigmoid"  # no range to fit
  raw = jnp.asarray(np.random.default_rng(45).normal(size=(2, 4, 4, 1)), jnp.float32)
  x = jnp.asarray(_images(46, (2, 4, 4, 1)), jnp.float32)
  for volume in ("nominal", "effective"):
    cfg = make_budget_config("contextual", (0.25, 4.0), volume=volume, squash="sigmoid")
    # eps0 = 0 (a warm-up) gives zeros, eps0 = 1 (the cap meets the target) the uniform 1,
    # both with finite (zero) gradients.
    eps = budgets(cfg, jnp.asarray([0.0, 1.0]), raw, x.shape, x=x)
    np.testing.assert_array_equal(eps[0], 0.0)
    np.testing.assert_allclose(eps[1], 1.0, rtol=1e-6)
    g = jax.grad(lambda r: jnp.sum(budgets(cfg, jnp.asarray([0.0, 1.0]), r, x.shape, x=x)))(raw)
    np.testing.assert_array_equal(g, 0.0)
    # eps0 > 1 cannot be met (only under jit, where it cannot raise): held at the cap, as the clip
    over = jax.jit(lambda e0: budgets(cfg, e0, raw, x.shape, x=x))(jnp.asarray([1.2, 0.1]))
    np.testing.assert_allclose(over[0], 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------
# Stats
# ----------------------------------------------------------------------------


def test_budget_stats_known_values():
  eps = jnp.asarray([[1.0, 4.0], [2.0, 8.0]])
  s = budget_stats(eps)
  assert set(s) == {"equivalent_eps", "min", "max"}
  np.testing.assert_allclose(s["equivalent_eps"], 3.0, rtol=1e-6)  # mean(2, 4)
  np.testing.assert_allclose(s["min"], 1.5)
  np.testing.assert_allclose(s["max"], 6.0)

  # Boxes: [0.4, 0.6] (half 0.1), [-0.2, 0.2] ∩ [0, 1] = [0, 0.2] (half 0.1),
  # [0.7, 1.3] ∩ [0, 1] = [0.7, 1] (half 0.15), [0.1, 0.5] (half 0.2).
  eps = jnp.asarray([[0.1, 0.2], [0.3, 0.2]])
  x = jnp.asarray([[0.5, 0.0], [1.0, 0.3]])
  s = budget_stats(eps, x)
  expected = 0.5 * (0.1 + math.sqrt(0.15 * 0.2))
  np.testing.assert_allclose(s["effective_equivalent_eps"], expected, rtol=1e-5)

  # Zero budgets: equivalent eps 0, effective clamped to a tiny positive number (finite).
  s = budget_stats(jnp.zeros((2, 3)), jnp.full((2, 3), 0.5))
  assert float(s["equivalent_eps"]) == 0.0
  assert (
    np.isfinite(s["effective_equivalent_eps"]) and 0 <= float(s["effective_equivalent_eps"]) < 1e-30
  )
