"""Regressions from the soundness review: each was a crash, a NaN or an unsound bound once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cbudget.bounds import Box, crown, ibp

ALL = {"ibp": ibp, "crown-ibp": crown, "crown": lambda f: crown(f, "crown")}


def grid_check(f, params, box, n=201, tol=1e-9):
  """All methods sound on a dense grid of a box with one varying input element."""
  lo, hi = np.asarray(box.lower), np.asarray(box.upper)
  ts = np.linspace(0, 1, n)[:, None, None]
  pts = lo[None] + ts * (hi - lo)[None]
  ys = np.stack([np.asarray(f(params, jnp.asarray(p))) for p in pts])
  for name, method in ALL.items():
    b = method(f)(params, box)
    assert np.all(np.isfinite(b.lower)) and np.all(np.isfinite(b.upper)), name
    lo_b, hi_b = np.asarray(b.lower), np.asarray(b.upper)
    assert np.all(ys >= lo_b - tol * (1 + np.abs(lo_b))), name
    assert np.all(ys <= hi_b + tol * (1 + np.abs(hi_b))), name


def test_max_and_clip_with_infinite_constants():
  with jax.enable_x64(True):
    box = Box(jnp.array([[-1.0, 0.5]]), jnp.array([[1.0, 0.7]]))
    grid_check(lambda p, x: jnp.max(x, axis=1, keepdims=True, initial=-jnp.inf), None, box)
    grid_check(
      lambda p, x: jnp.clip(x, jnp.array([-jnp.inf, 0.0]), jnp.array([0.5, jnp.inf])), None, box
    )


def test_reduce_precision_is_not_treated_as_identity():
  with jax.enable_x64(True):
    f = lambda p, x: lax.reduce_precision(x + 3.0, exponent_bits=5, mantissa_bits=2)
    grid_check(f, None, Box(jnp.array([[0.6]]), jnp.array([[0.7]])))


def test_identity_function_and_spec_on_it():
  box = Box(jnp.array([[-1.0, 0.5]]), jnp.array([[1.0, 0.7]]))
  spec = jnp.array([[[1.0, -1.0]]])
  for method in ALL.values():
    b = method(lambda p, x: x)(None, box)
    np.testing.assert_allclose(b.lower, box.lower)
    np.testing.assert_allclose(b.upper, box.upper)
  np.testing.assert_allclose(crown(lambda p, x: x)(None, box, spec).lower, [[-1.7]], rtol=1e-6)
  np.testing.assert_allclose(ibp(lambda p, x: x)(None, box, spec).upper, [[0.5]], rtol=1e-6)


def test_mixed_precision_and_integer_boxes_are_sound():
  with jax.enable_x64(True):
    box = Box(jnp.array([[-1.0, 0.5]]), jnp.array([[1.0, 0.7]]))
    # The model computes in float32: float32 rounding tolerance.
    grid_check(
      lambda p, x: jax.nn.relu(x.astype(jnp.float32) @ p),
      jnp.ones((2, 2), jnp.float32),
      box,
      tol=1e-6,
    )
  ints = Box(jnp.array([[0, 3]], jnp.int32), jnp.array([[2, 5]], jnp.int32))
  f = lambda p, x: jax.nn.relu(x / 255.0 - 0.01)
  for method in ALL.values():
    b = method(f)(None, ints)
    assert np.all(np.asarray(b.lower) <= np.asarray(f(None, ints.lower)) + 1e-7)
    assert np.all(np.asarray(b.upper) >= np.asarray(f(None, ints.upper)) - 1e-7)


def test_named_rules_apply_only_to_jax_nn_functions():
  with jax.enable_x64(True):
    # A bounded slope: the leaky_relu rule must not claim it (the slope is not its input); traced
    # through, the select's predicate is concrete and the bounds are exact.
    c = jnp.array([[-2.0, 3.0]])
    grid_check(
      lambda p, x: jax.nn.leaky_relu(c, negative_slope=x),
      None,
      Box(jnp.zeros((1, 2)), jnp.ones((1, 2))),
    )

    @jax.jit
    def hard_tanh(x, max_val=2.0):  # a user's function with jax's name, other semantics
      return jnp.clip(x, -max_val, max_val)

    grid_check(lambda p, x: hard_tanh(x), None, Box(jnp.array([[-3.0]]), jnp.array([[3.0]])))
    grid_check(lambda p, x: hard_tanh(x), None, Box(jnp.array([[-1.5]]), jnp.array([[1.5]])))


def test_split_and_large_boxes():
  with jax.enable_x64(True):
    box = Box(jnp.array([[-1.0, 0.5]]), jnp.array([[1.0, 0.7]]))
    grid_check(lambda p, x: jnp.split(x, 2, axis=1)[0] * 2.0, None, box)
    big = Box(jnp.array([[1e308]]), jnp.array([[1.5e308]]))
    b = ibp(lambda p, x: x * 1.0)(None, big)
    assert float(b.lower[0, 0]) <= 1e308 and float(b.upper[0, 0]) >= 1.5e308


def test_infinite_box_is_a_clear_error():
  with pytest.raises(ValueError, match="non-finite"):
    ibp(lambda p, x: x)(None, Box(jnp.array([[-jnp.inf]]), jnp.array([[0.0]])))


def test_lower_only_crown_under_jit():
  box = Box(jnp.array([[-1.0, 0.5]]), jnp.array([[1.0, 0.7]]))
  b = jax.jit(crown(lambda p, x: jax.nn.relu(x), need_upper=False))(None, box)
  assert np.all(np.isinf(b.upper)) and np.all(np.isfinite(b.lower))


def test_mixing_examples_is_a_clear_error():
  box = Box.from_budget(jnp.full((3, 4), 0.5), 0.1)
  with pytest.raises(ValueError, match="treat the examples of the batch independently"):
    ibp(lambda p, x: x - x.mean(axis=0))(None, box)
