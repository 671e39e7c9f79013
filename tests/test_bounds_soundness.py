"""Soundness of IBP, CROWN-IBP and CROWN: sampled points (and corners) lie inside the bounds.

Tolerances are for float rounding only: float64 ``1e-9 * (1 + |bound|)``, float32
``2e-5 * (1 + |bound|)`` (a few ulps per layer of accumulated rounding).

The bounds are computed eagerly: on these tiny nets an eager pass takes a tenth of a second where
compiling it takes seconds, so hypothesis can afford many networks. The maths is the same under
``jax.jit`` (tests/test_bounds_properties.py checks that jit and eager agree), and
:func:`test_margin_spec_is_sound` runs the jitted functions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from cbudget.bounds import Box, crown, ibp
from tests.nets import ACTIVATIONS, RandomNet, init_net, sample_box_points

METHODS = {
  "ibp": lambda f: ibp(f),
  "crown-ibp": lambda f: crown(f),
  "crown": lambda f: crown(f, "crown"),
}


def assert_sound(f, params, box, bounds, key, tol, num=200):
  pts = sample_box_points(box, key, num)
  ys = np.asarray(jax.vmap(lambda p: f(params, p))(jnp.asarray(pts)))
  lo, hi = np.asarray(bounds.lower), np.asarray(bounds.upper)
  slack_lo = tol * (1 + np.abs(lo))
  slack_hi = tol * (1 + np.abs(hi))
  assert np.all(ys >= lo - slack_lo), f"lower bound violated by {np.max(lo - ys)}"
  assert np.all(ys <= hi + slack_hi), f"upper bound violated by {np.max(ys - hi)}"


def random_box(key, shape, dtype, max_eps=0.3):
  kx, ke = jax.random.split(key)
  x = jax.random.uniform(kx, shape, dtype)
  eps = jax.random.uniform(ke, shape, dtype, 0.0, max_eps)  # non-uniform widths
  return x, Box.from_budget(x, eps)


net_configs = st.builds(
  dict,
  kind=st.sampled_from(["mlp", "cnn", "residual"]),
  activation=st.sampled_from(sorted(ACTIVATIONS)),
  depth=st.integers(1, 3),
  width=st.integers(2, 5),
  batch_norm=st.booleans(),
  stride=st.sampled_from([1, 2]),
  padding=st.sampled_from(["SAME", "VALID"]),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=net_configs, seed=st.integers(0, 10_000), method=st.sampled_from(sorted(METHODS)))
def test_random_networks_are_sound_float64(config, seed, method):
  with jax.enable_x64(True):
    shape = (2, 4) if config["kind"] == "mlp" else (2, 5, 5, 2)
    if config["kind"] == "mlp":
      shape = (2, 3)  # small enough for all corners
    net = RandomNet(**config)
    x, box = random_box(jax.random.key(seed), shape, jnp.float64)
    params = init_net(net, x, seed)
    f = lambda p, x: net.apply(p, x)
    bounds = METHODS[method](f)(params, box)
    assert bounds.lower.shape == (2, 3)
    assert_sound(f, params, box, bounds, jax.random.key(seed + 7), tol=1e-9)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_activation_sound_float32(activation, method):
  net = RandomNet("residual", activation, depth=2, width=4, batch_norm=True)
  x, box = random_box(jax.random.key(3), (3, 6, 6, 1), jnp.float32, max_eps=0.2)
  params = init_net(net, x, 11)
  f = lambda p, x: net.apply(p, x)
  bounds = METHODS[method](f)(params, box)
  assert_sound(f, params, box, bounds, jax.random.key(5), tol=2e-5, num=300)


def test_margin_spec_is_sound():
  net = RandomNet("cnn", "relu", depth=2, width=4, stride=2)
  x, box = random_box(jax.random.key(1), (4, 6, 6, 1), jnp.float32, max_eps=0.1)
  params = init_net(net, x, 2)
  f = lambda p, x: net.apply(p, x)
  labels = jnp.array([0, 1, 2, 0])
  spec = jax.nn.one_hot(labels, 3)[:, None, :] - jnp.eye(3)[None]  # rows e_y - e_j
  pts = sample_box_points(box, jax.random.key(4), 300)
  margins = np.einsum(
    "nsk,pnk->pns", np.asarray(spec), np.asarray(jax.vmap(lambda p: f(params, p))(jnp.asarray(pts)))
  )
  for name, method in METHODS.items():
    b = jax.jit(method(f))(params, box, spec)
    assert b.lower.shape == (4, 3)
    assert np.all(margins >= np.asarray(b.lower) - 2e-5 * (1 + np.abs(b.lower))), name
    assert np.all(margins <= np.asarray(b.upper) + 2e-5 * (1 + np.abs(b.upper))), name


@pytest.mark.parametrize("slope", ["adaptive", "zero", "one", "parallel"])
def test_every_relu_lower_slope_is_sound(slope):
  net = RandomNet("mlp", "relu", depth=3, width=6)
  x, box = random_box(jax.random.key(8), (4, 3), jnp.float32, max_eps=0.5)
  params = init_net(net, x, 9)
  f = lambda p, x: net.apply(p, x)
  for intermediate in ("ibp", "crown"):
    b = crown(f, intermediate, relu_lower_slope=slope)(params, box)
    assert_sound(f, params, box, b, jax.random.key(10), tol=2e-5, num=500)


def test_max_pool_and_max_of_two_bounded_values_are_sound():
  import flax.linen as nn

  def f(params, x):
    h = jnp.tanh(x @ params["w"])
    pooled = nn.max_pool(h.reshape(h.shape[0], 2, 2, 1), (2, 2), (1, 1))
    return jnp.concatenate(
      [pooled.reshape(h.shape[0], -1), jnp.maximum(h[:, :1], h[:, 1:2]), h[:, :1] * h[:, 2:3]],
      axis=1,
    )

  params = {"w": jax.random.normal(jax.random.key(0), (3, 4))}
  x, box = random_box(jax.random.key(1), (3, 3), jnp.float32, max_eps=0.5)
  for name, method in METHODS.items():
    assert_sound(f, params, box, method(f)(params, box), jax.random.key(2), tol=2e-5, num=500)
