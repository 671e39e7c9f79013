"""The largest certified box: every returned box is certified (re-checked here with the engine),
never below the certified uniform ε, and monotone in the method's tightness where that is a
theorem (α-CROWN is never looser than full CROWN; IBP's certification is monotone in ε)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbudget.bounds import Box, crown, ibp
from cbudget.certify import largest_certified_box, summary
from cbudget.objective import margin_spec


def _net(params, x):
  h = x.reshape(x.shape[0], -1)
  for i, (w, b) in enumerate(params):
    h = h @ w + b
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return h


def _setup():
  key = jax.random.key(1)
  keys = jax.random.split(key, 8)
  sizes = [9, 12, 12, 3]
  params = [
    (
      jax.random.normal(keys[i], (a, b), jnp.float64) / np.sqrt(a),
      0.1 * jax.random.normal(keys[i + 4], (b,), jnp.float64),
    )
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
  ]
  x = jax.random.uniform(keys[7], (5, 3, 3), jnp.float64)
  labels = jnp.argmax(_net(params, x), -1)
  labels = labels.at[0].set((labels[0] + 1) % 3)  # example 0 is misclassified: nothing certified
  return params, x, labels


def _certified(bound, params, x, labels, eps):
  spec = margin_spec(labels, 3, x.dtype)
  return jnp.all(bound(params, Box.from_budget(x, eps), spec).lower > 0, axis=1)


def test_boxes_certified_and_never_below_uniform():
  with jax.enable_x64(True):
    params, x, labels = _setup()
    r = largest_certified_box(_net, params, x, labels, method="crown", optimize_steps=20)
    full = crown(_net, "crown")
    assert not bool(r.certified[0]) and float(r.uniform_eps[0]) == 0 and float(r.eps[0].max()) == 0
    assert bool(jnp.all(r.certified[1:]))
    assert jnp.all(_certified(full, params, x[1:], labels[1:], r.eps[1:]))
    uniform = jnp.broadcast_to(r.uniform_eps[1:, None, None], x[1:].shape)
    assert jnp.all(_certified(full, params, x[1:], labels[1:], uniform))
    assert jnp.all(r.equivalent_eps >= r.uniform_eps)
    np.testing.assert_allclose(
      r.equivalent_eps,
      jnp.exp(jnp.mean(jnp.log(jnp.maximum(r.eps, 1e-300)), axis=(1, 2)))[:] * r.certified,
    )
    assert jnp.all(r.uniform_eps[1:] > 0)
    s = summary(r, proposed_eps=0.01)
    assert s["certified"] == 4 and s["per_example"]["ratio"][0] is None
    assert s["median_ratio"] >= 1 and s["median_proposed_equivalent_eps"] == pytest.approx(0.01)


def test_ibp_uniform_eps_is_the_largest_up_to_resolution():
  """IBP certification is monotone in ε, so bisection brackets the largest certified ε."""
  with jax.enable_x64(True):
    params, x, labels = _setup()
    steps = 10
    r = largest_certified_box(
      _net, params, x, labels, method="ibp", bisection_steps=steps, optimize_steps=10
    )
    reach = float(jnp.max(jnp.maximum(x, 1 - x)))
    above = jnp.minimum(r.uniform_eps + 1.01 * reach / 2**steps, reach)
    eps = jnp.broadcast_to(above[:, None, None], x.shape)
    assert not bool(jnp.any(_certified(ibp(_net), params, x, labels, eps)[1:]))
    assert jnp.all(_certified(ibp(_net), params, x[1:], labels[1:], r.eps[1:]))


def test_alpha_crown_certifies_at_least_crown_uniform_eps():
  """α-CROWN certifies every box full CROWN does, so bisection on the same grid never ends lower."""
  with jax.enable_x64(True):
    params, x, labels = _setup()
    common = dict(optimize_steps=0, scale_steps=0, bisection_steps=8)
    c = largest_certified_box(_net, params, x, labels, method="crown", **common)
    a = largest_certified_box(
      _net, params, x, labels, method="alpha-crown", method_options={"iterations": 4}, **common
    )
    assert jnp.all(a.uniform_eps >= c.uniform_eps)


def test_bad_inputs():
  with jax.enable_x64(True):
    params, x, labels = _setup()
    with pytest.raises(ValueError, match="domain"):
      largest_certified_box(_net, params, x + 2, labels)
    with pytest.raises(ValueError, match="method"):
      largest_certified_box(_net, params, x, labels, method="nope")
    with pytest.raises(ValueError, match="labels"):
      largest_certified_box(_net, params, x, labels[:2])
