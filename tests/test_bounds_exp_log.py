"""The exp and log rules: their relaxations hold at sampled points, edge cases stay sound, and
IBP/CROWN bounds of functions built from them contain the function at sampled points of the box."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbudget.bounds import Box, crown, ibp
from cbudget.bounds._src.relaxations import exp_relaxation, log_relaxation

INF, NAN = np.inf, np.nan


def _assert_holds(relax, f, l, u, points=200, seed=0):
  """lower line <= f(z) <= upper line at the ends and at sampled z in [l, u] (float64)."""
  with jax.enable_x64(True):
    l, u = np.asarray(l, np.float64), np.asarray(u, np.float64)
    b = [np.asarray(v) for v in relax(jnp.asarray(l), jnp.asarray(u))]
    t = np.random.default_rng(seed).random((points,) + l.shape)
    z = np.concatenate([l[None], u[None], np.clip(l + t * (u - l), l, u)])
    fz = f(z)
    # Tolerance: the rounding of slope * z + offset, relative to its terms.
    tol = lambda slope, offset: 1e-13 * (np.abs(slope * z) + np.abs(offset) + np.abs(fz))
    with np.errstate(invalid="ignore"):
      assert np.all(b[0] * z + b[1] <= fz + tol(b[0], b[1])), "lower line above the function"
      assert np.all(b[2] * z + b[3] >= fz - tol(b[2], b[3])), "upper line below the function"


boxes = st.tuples(st.floats(-60, 60), st.floats(0, 30), st.sampled_from([1.0, 1e-3, 1e-9, 0.0]))


@settings(max_examples=60, deadline=None)
@given(boxes)
def test_exp_relaxation_holds_at_sampled_points(box):
  lower, width, scale = box
  _assert_holds(exp_relaxation, np.exp, [lower], [lower + width * scale])


@settings(max_examples=60, deadline=None)
@given(st.floats(-30, 30), st.floats(0, 30), st.sampled_from([1.0, 1e-3, 1e-9, 0.0]))
def test_log_relaxation_holds_at_sampled_points(log_lower, log_width, scale):
  lower = np.exp(log_lower)
  _assert_holds(log_relaxation, np.log, [lower], [lower + lower * np.expm1(log_width) * scale])


def test_exp_relaxation_on_many_boxes_and_narrow_ones():
  rng = np.random.default_rng(1)
  l = rng.normal(0, 20, 500)
  u = l + np.abs(rng.normal(0, 10, 500)) * rng.choice([1, 1e-4, 1e-12, 0], 500)
  _assert_holds(exp_relaxation, np.exp, l, u)


def test_log_relaxation_on_many_boxes_and_narrow_ones():
  rng = np.random.default_rng(2)
  l = np.exp(rng.normal(0, 10, 500))
  u = l * (1 + np.abs(rng.normal(0, 100, 500)) * rng.choice([1, 1e-4, 1e-12, 0], 500))
  _assert_holds(log_relaxation, np.log, l, u)


def test_exp_edge_cases_are_sound():
  """Infinite ends give limit lines or infinite bounds; an overflowing e^u an infinite upper bound;
  NaN stays NaN."""
  with jax.enable_x64(True):
    l = jnp.array([-INF, -INF, -INF, 0.0, 100.0, 800.0, NAN, -1e308])
    u = jnp.array([-INF, 1.0, INF, INF, 1000.0, 801.0, 1.0, 1e308])
    b = exp_relaxation(l, u)
    up = np.stack([b.upper_slope, b.upper_offset], 1)
    np.testing.assert_allclose(up[:3], [[0, 0], [0, np.e], [0, INF]], rtol=1e-15)
    np.testing.assert_array_equal(up[3:6], [[0, INF]] * 3)  # overflow: no finite upper bound
    assert np.all(np.isnan(np.asarray(b)[:, 6]))
    # The lower tangent is finite and below exp wherever it is evaluated (tangents are global).
    lo = np.asarray([b.lower_slope, b.lower_offset])
    assert np.all(np.isfinite(lo[:, [0, 1, 2, 3, 4, 5, 7]]))
    z = np.array([-1e300, -5.0, 0.0, 3.0, 700.0])
    for i in (0, 1, 2, 3, 4, 5, 7):
      with np.errstate(over="ignore"):
        assert np.all(lo[0, i] * z + lo[1, i] <= np.exp(z)), i


def test_log_edge_cases_are_sound():
  """log(0) = -inf is reachable at l = 0; l < 0 reaches NaN (no bound); u = inf a limit line."""
  with jax.enable_x64(True):
    l = jnp.array([0.0, 0.0, -1.0, 2.0, NAN, 1e-320])
    u = jnp.array([0.0, 4.0, 1.0, INF, 1.0, 2e-320])
    b = [np.asarray(v) for v in log_relaxation(l, u)]
    assert b[1][0] == -INF and b[3][0] <= np.log(np.finfo(np.float64).tiny)  # [0, 0]: -inf
    assert b[0][1] == 0 and b[1][1] == -INF  # lower: -inf from log(0)
    np.testing.assert_allclose([b[2][1], b[3][1]], [0.5, np.log(2) - 1])  # tangent at 2
    assert all(np.isnan(v[2]) and np.isnan(v[4]) for v in b)
    assert (b[0][3], b[1][3]) == (0, np.log(2))  # the constant log l
    assert b[2][3] > 0 and np.isfinite(b[3][3])
    # The subnormal box: finite or infinite, never an upper line below log.
    z = np.array([1e-320, 1.5e-320, 2e-320])
    assert np.all(b[2][5] * z + b[3][5] >= np.log(z))
    assert np.all(b[0][5] * z + b[1][5] <= np.log(z))


def _net(params, x):
  """A small net that ends in log(1 + sum exp(.)), the shape of the fused cross-entropy."""
  w1, w2 = params
  h = jnp.tanh(x @ w1)
  z = h @ w2
  return jnp.concatenate([jnp.log(1 + jnp.sum(jnp.exp(z), 1, keepdims=True)), jnp.exp(z)], 1)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_bounds_of_a_net_with_exp_and_log_contain_sampled_outputs(method):
  with jax.enable_x64(True):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = (jax.random.normal(k1, (4, 6)), jax.random.normal(k2, (6, 3)))
    x = jax.random.uniform(k3, (5, 4), jnp.float64)
    box = Box.from_budget(x, jnp.array([0.0, 0.01, 0.1, 0.3, 1.0])[:, None])
    bound = {"ibp": ibp(_net), "crown-ibp": crown(_net), "crown": crown(_net, "crown")}[method]
    b = jax.jit(bound)(params, box)
    points = box.lower + (box.upper - box.lower) * jax.random.uniform(
      jax.random.key(1), (500,) + x.shape, jnp.float64
    )
    values = jax.vmap(lambda p: _net(params, p))(jnp.concatenate([points, box.lower[None]]))
    assert np.all(np.isfinite(b.lower)) and np.all(np.isfinite(b.upper))
    assert np.all(values >= b.lower - 1e-12) and np.all(values <= b.upper + 1e-12)
    # A zero-width box: the bounds are the value (to rounding).
    np.testing.assert_allclose(b.lower[0], _net(params, x[:1])[0], rtol=1e-9)
    np.testing.assert_allclose(b.upper[0], _net(params, x[:1])[0], rtol=1e-9)
    grads = jax.jit(jax.grad(lambda p: bound(p, box).upper.sum()))(params)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_crown_is_tighter_than_ibp_on_the_log_sum_exp():
  """Not a theorem per example in general; here on a 1-layer map CROWN's upper bound of the
  log-sum-exp (chord of exp, tangent of log) is no looser than IBP's on average."""
  with jax.enable_x64(True):
    w = jax.random.normal(jax.random.key(3), (4, 3))
    f = lambda p, x: jnp.log(jnp.sum(jnp.exp(x @ p), 1, keepdims=True))
    x = jax.random.uniform(jax.random.key(4), (8, 4), jnp.float64)
    box = Box.from_budget(x, 0.05)
    upper = lambda method: jax.jit(method(f))(w, box).upper
    assert jnp.mean(upper(crown)) <= jnp.mean(upper(ibp))
