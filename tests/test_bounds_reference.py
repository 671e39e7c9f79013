"""``reference_bounds``: the identity on values; every method intersects with the given bounds, and
stays sound when they are sound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbudget.bounds as cb
from tests.nets import sample_box_points


def _inner(p, x):
  return jax.nn.relu(x @ p["w1"]) @ p["w2"]


def _outer(p, x):
  """Something non-linear after the marked value, so that its bounds matter to the relaxations."""
  z = cb.reference_bounds(_inner(p, x), p["lower"], p["upper"])
  return jnp.tanh(jax.nn.relu(z) @ p["w3"])


def _problem(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 4)
  p = {
    "w1": jax.random.normal(k[0], (4, 16), dtype),
    "w2": jax.random.normal(k[1], (16, 8), dtype),
    "w3": jax.random.normal(k[2], (8, 3), dtype),
  }
  x = jax.random.uniform(k[3], (6, 4), dtype)
  return p, cb.Box.from_budget(x, 0.2)


METHODS = {
  "ibp": lambda f: cb.ibp(f),
  "crown-ibp": lambda f: cb.crown(f, "ibp"),
  "crown": lambda f: cb.crown(f, "crown"),
  "alpha-crown": lambda f: cb.alpha_crown(f, iterations=2),
}


def test_it_is_the_identity_on_values_and_gradients():
  p, box = _problem()
  f = lambda p, x: _inner(p, x) ** 2
  g = lambda p, x: cb.reference_bounds(_inner(p, x), -1.0, 1.0) ** 2  # bounds do not clip values
  x = box.upper
  np.testing.assert_array_equal(jax.jit(g)(p, x), f(p, x))
  grads = [jax.grad(lambda p, h=h: jnp.sum(h(p, x)))(p) for h in (f, g)]
  jax.tree.map(np.testing.assert_array_equal, grads[0], grads[1])


def test_ibp_is_the_intersection_with_the_reference():
  p, box = _problem()
  plain = cb.ibp(_inner)(p, box)
  middle = (plain.lower + plain.upper) / 2
  lower, upper = middle - 0.5, middle + 0.25  # cuts both sides of most intervals
  marked = cb.ibp(lambda p, x: cb.reference_bounds(_inner(p, x), lower, upper))(p, box)
  np.testing.assert_array_equal(marked.lower, jnp.maximum(plain.lower, lower))
  np.testing.assert_array_equal(marked.upper, jnp.minimum(plain.upper, upper))


@pytest.mark.parametrize("method", METHODS)
def test_sound_with_sound_reference_and_unchanged_with_none(method):
  with jax.enable_x64(True):
    p, box = _problem(jnp.float64)
    tight = cb.crown(_inner, "crown")(p, box)  # sound bounds, tighter than IBP's
    bound = jax.jit(METHODS[method](_outer))
    with_reference = bound(dict(p, lower=tight.lower, upper=tight.upper), box)
    no_reference = bound(dict(p, lower=-jnp.inf, upper=jnp.inf), box)
    unmarked = jax.jit(METHODS[method](lambda p, x: jnp.tanh(jax.nn.relu(_inner(p, x)) @ p["w3"])))
    plain = unmarked(p, box)
    np.testing.assert_allclose(no_reference.lower, plain.lower, rtol=1e-12)
    np.testing.assert_allclose(no_reference.upper, plain.upper, rtol=1e-12)
    points = sample_box_points(box, jax.random.key(1), 500)
    values = jax.vmap(lambda x: _outer(dict(p, lower=-jnp.inf, upper=jnp.inf), x))(points)
    assert np.all(values >= with_reference.lower - 1e-10)
    assert np.all(values <= with_reference.upper + 1e-10)
    # The reference made a difference here (so the rule ran): IBP's widths shrink.
    if method == "ibp":
      width = lambda b: float(jnp.sum(b.upper - b.lower))
      assert width(with_reference) < width(plain)


def test_only_cbudgets_function_and_only_concrete_bounds_are_read():
  p, box = _problem()

  @jax.jit
  def reference_bounds(value, lower, upper):  # a user's function of the same name
    return value + 0 * (lower + upper)

  narrow = jnp.zeros((6, 8))
  plain = cb.ibp(_inner)(p, box)
  user = cb.ibp(lambda p, x: reference_bounds(_inner(p, x), narrow, narrow))(p, box)
  np.testing.assert_allclose(user.lower, plain.lower, rtol=1e-12)  # traced through: no cut
  # Bounds that depend on the input are not a reference: the call is traced through.
  traced = cb.ibp(lambda p, x: cb.reference_bounds(_inner(p, x), x[:, :1] * 0, x[:, :1] * 0))(
    p, box
  )
  np.testing.assert_allclose(traced.upper, plain.upper, rtol=1e-12)
