"""The convolution transpose used by the CROWN backward pass: its value and both gradients must equal
what JAX derives from the convolution itself, for every convolution layout it accepts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cbudget.bounds import Box, crown
from cbudget.bounds._src import conv_transpose

# (lhs shape per example, rhs shape, strides, padding, rhs_dilation, dimension numbers)
CONFIGS = [
  ((9, 9, 2), (4, 4, 2, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), ("NHWC", "HWIO", "NHWC")),
  ((8, 7, 3), (3, 2, 3, 4), (1, 2), ((2, 0), (0, 1)), (1, 1), ("NHWC", "HWIO", "NHWC")),
  ((10, 10, 1), (3, 3, 1, 2), (1, 1), ((2, 2), (2, 2)), (2, 2), ("NHWC", "HWIO", "NHWC")),
  ((3, 8, 8), (4, 3, 3, 3), (2, 1), ((1, -1), (1, 1)), (1, 1), ("NCHW", "OIHW", "NCHW")),
  ((11, 2), (5, 2, 3), (3,), ((1, 2),), (1,), ("NWC", "WIO", "NWC")),
  (
    (5, 4, 6, 1),
    (2, 3, 2, 1, 2),
    (1, 2, 2),
    ((0, 1), (1, 0), (1, 1)),
    (1, 1, 1),
    ("NDHWC", "DHWIO", "NDHWC"),
  ),
  # strided transposes by phases: sizes the strides do not divide, a kernel smaller than the
  # stride (phases no tap reaches), a stride above the kernel's size, padding beyond the kernel
  ((9, 9, 2), (3, 3, 2, 3), (2, 2), ((1, 1), (0, 1)), (1, 1), ("NHWC", "HWIO", "NHWC")),
  ((7, 8, 2), (1, 1, 2, 2), (2, 3), ((0, 0), (0, 0)), (1, 1), ("NHWC", "HWIO", "NHWC")),
  ((13, 1), (2, 1, 2), (4,), ((3, 5),), (1,), ("NWC", "WIO", "NWC")),
  ((2, 10, 9), (3, 2, 5, 4), (3, 2), ((0, 2), (-1, 3)), (1, 1), ("NCHW", "OIHW", "NCHW")),
  # a dilated kernel with strides keeps the dilated form
  ((11, 11, 1), (3, 3, 1, 2), (2, 2), ((1, 1), (1, 1)), (2, 2), ("NHWC", "HWIO", "NHWC")),
]


def _conv(params):
  strides, padding, dilation, dn = params
  return lambda x, w: lax.conv_general_dilated(
    x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=dn
  )


# Strided convolutions are transposed by phases or by one dilated convolution (chosen by channel
# count): both forms are tested on every strided config.
FORMS = [
  (config, phases)
  for config in CONFIGS
  for phases in ((True, False) if any(s > 1 for s in config[2]) else (False,))
]


@pytest.mark.parametrize(
  "config,phases", FORMS, ids=lambda c: c[5][0] + str(c[2]) if isinstance(c, tuple) else str(c)
)
def test_transpose_and_its_gradients_match_jax(config, phases, monkeypatch):
  monkeypatch.setattr(conv_transpose, "PHASES_MIN_CHANNELS", 1 if phases else 10**9)
  example, kernel, *conv_params = config
  conv = _conv(conv_params)
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(0), 4)
    rows, n = 3, 2
    x = jax.random.normal(keys[0], (n,) + example, jnp.float64)
    w = jax.random.normal(keys[1], kernel, jnp.float64)
    out_shape = conv(x, w).shape
    g = jax.random.normal(keys[2], (rows,) + out_shape, jnp.float64)
    ct = jax.random.normal(keys[3], (rows, n) + example, jnp.float64)
    eqn = jax.make_jaxpr(conv)(x, w).eqns[0]
    assert conv_transpose.supports(eqn.params)
    evaluate = lambda a, b: [eqn.primitive.bind(a, b, **eqn.params)]

    def ours(g, w):
      return conv_transpose.transpose_rows(evaluate, eqn.params, x, w)([g])[0]

    def jaxs(g, w):
      return jax.vmap(jax.vjp(lambda z: conv(z, w), x)[1])(g)[0]

    np.testing.assert_allclose(ours(g, w), jaxs(g, w), rtol=1e-12, atol=1e-12)
    loss = lambda fn: lambda g, w: jnp.sum(jnp.sin(fn(g, w)) * ct)
    for a, b in zip(jax.grad(loss(ours), (0, 1))(g, w), jax.grad(loss(jaxs), (0, 1))(g, w)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_grouped_and_dilated_input_convolutions_use_jax_vjp():
  base = dict(
    window_strides=(1, 1),
    padding=((0, 0), (0, 0)),
    lhs_dilation=(1, 1),
    rhs_dilation=(1, 1),
    feature_group_count=1,
    batch_group_count=1,
    dimension_numbers=lax.conv_dimension_numbers(
      (1, 4, 4, 2), (3, 3, 2, 2), ("NHWC", "HWIO", "NHWC")
    ),
  )
  assert conv_transpose.supports(base)
  assert not conv_transpose.supports({**base, "feature_group_count": 2})
  assert not conv_transpose.supports({**base, "lhs_dilation": (2, 2)})


def test_crown_gradient_through_grouped_convolution_matches_finite_differences():
  """A depthwise convolution takes JAX's own VJP path; its bound's gradient is still right."""
  with jax.enable_x64(True):
    w0 = jax.random.normal(jax.random.key(1), (3, 3, 1, 4), jnp.float64)
    x = jax.random.uniform(jax.random.key(2), (2, 6, 6, 4), jnp.float64)

    def f(w, z):
      h = lax.conv_general_dilated(
        z, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4
      )
      return jnp.sum(jax.nn.relu(h), axis=(1, 2))

    loss = lambda w: jnp.sum(crown(f)(w, Box.from_budget(x, 0.1)).lower)
    grad = jax.grad(loss)(w0)
    direction = jax.random.normal(jax.random.key(3), w0.shape, jnp.float64)
    h = 1e-6
    fd = (loss(w0 + h * direction) - loss(w0 - h * direction)) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(grad, direction), fd, rtol=1e-5)
