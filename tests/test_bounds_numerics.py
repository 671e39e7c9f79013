"""Numerics of the bounds (issue 13): overflow, cancellation, NaN, continuity, edge tightness.

The contract: a bound is sound (it contains every reachable value), or infinite, or NaN (never
certified, since a certificate is ``lower > 0``). A finite bound that excludes a reachable value is
a failure. The relaxations are also checked point-wise as lines, which is stronger than the
bounds they give.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbudget.bounds as cb
from cbudget.bounds import Box, UnsupportedPrimitiveError
from cbudget.bounds._src import relaxations

METHODS = {
  "ibp": lambda f: cb.ibp(f),
  "crown_ibp": lambda f: cb.crown(f),
  "crown": lambda f: cb.crown(f, "crown"),
}


def _all_bounds(f, box, params=None):
  return {name: make(f)(params, box) for name, make in METHODS.items()}


def _assert_contains_or_nan(bounds: Box, values, what):
  """Every reachable value lies inside the bounds, or the bound is NaN (+-inf contain anything)."""
  lo, hi = np.asarray(bounds.lower, np.float64), np.asarray(bounds.upper, np.float64)
  values = np.asarray(values, np.float64)
  tol = 1e-5 * (1 + np.abs(values))
  ok_lo = np.isnan(lo) | (lo <= values + tol)
  ok_hi = np.isnan(hi) | (hi >= values - tol)
  assert ok_lo.all() and ok_hi.all(), f"{what}: reachable values outside finite bounds"


# -- point-wise soundness of every relaxation, over every scale -----------------------------------


def _boxes(dtype, n=400, seed=0):
  """Boxes at every scale of ``dtype``: tiny, ordinary, huge (near the largest finite value),
  mixed, degenerate, plus ones with an infinite end."""
  rng = np.random.default_rng(seed)
  info = np.finfo(dtype)
  exps = rng.uniform(np.log10(info.tiny), np.log10(info.max), size=(2, n))
  ends = np.sign(rng.uniform(-1, 1, size=(2, n))) * 10.0**exps
  ordinary = rng.uniform(-4, 4, size=(2, 150))
  special = np.array(
    [
      [-info.max, info.max],
      [-info.max, -info.max / 2],
      [info.max / 2, info.max],
      [-1e-3, 1e7 if dtype != np.float16 else 6e4],
      [-float(info.tiny), float(info.tiny)],
      [0.0, 0.0],
      [-1.0, 1.0],
      [-1e-9, 1.0],
      [0.0, 1.0],
      [-np.inf, -1.0],
      [-np.inf, 2.0],
      [-2.0, np.inf],
      [1.0, np.inf],
      [-np.inf, np.inf],
    ]
  ).T
  both = np.concatenate([ends, ordinary, special], axis=1).astype(dtype)
  return np.minimum(both[0], both[1]), np.maximum(both[0], both[1])


def _samples(lower, upper, dtype, k=24, seed=1):
  """Points of each box (ends, 0, +-1 where inside, random), as ``dtype`` values, shape [k+5, n]."""
  rng = np.random.default_rng(seed)
  big = np.finfo(dtype).max
  lo = np.clip(lower.astype(np.float64), -big, big)
  hi = np.clip(upper.astype(np.float64), -big, big)
  r = rng.uniform(0, 1, size=(k,) + lo.shape) ** rng.choice([1, 8, 1 / 8], size=(k, 1))
  points = [lo * (1 - r) + hi * r, lo[None], hi[None]]
  for c in (0.0, -1.0, 1.0):
    points.append(np.clip(np.full_like(lo, c), lo, hi)[None])
  return np.concatenate(points).astype(dtype).astype(np.float64)


def _sigmoid(z):
  return 0.5 * (1 + np.tanh(z / 2))


TWO_PIECES = {"relu": (0.0, 1.0), "leaky": (0.1, 1.0), "abs": (-1.0, 1.0), "min0": (1.0, 0.0)}


def _relaxations(dtype):
  """(name, relaxation, reference function in float64 with the constants rounded to ``dtype``)."""
  as_dtype = lambda v: float(np.asarray(v, dtype))
  for name, (left, right) in TWO_PIECES.items():
    a, b = as_dtype(left), as_dtype(right)
    for choice in relaxations.SLOPE_CHOICES:
      fn = lambda z, a=a, b=b: np.where(z < 0, a * z, b * z)
      yield (
        f"{name}-{choice}",
        lambda l, u, a=left, b=right, c=choice: relaxations.two_piece_relaxation(l, u, a, b, c),
        fn,
      )
  yield "hard_tanh", relaxations.hard_tanh_relaxation, lambda z: np.clip(z, -1, 1)
  yield "sigmoid", relaxations.sigmoid_relaxation, _sigmoid
  yield "tanh", relaxations.tanh_relaxation, np.tanh
  for c in (1e-3, -2.0, 1e30):
    if abs(c) > float(np.finfo(dtype).max):
      continue
    for is_max in (True, False):
      left, right = (0.0, 1.0) if is_max else (1.0, 0.0)
      kink = lambda l, u, a=left, b=right, c=c: relaxations.two_piece_relaxation(
        l, u, a, b, kink=jnp.asarray(c, l.dtype)
      )
      op = np.maximum if is_max else np.minimum
      yield f"{'max' if is_max else 'min'}({c})", kink, lambda z, c=as_dtype(c), op=op: op(z, c)


_ALL = [(dtype, *r) for dtype in (np.float64, np.float32, np.float16) for r in _relaxations(dtype)]


@pytest.mark.parametrize(
  "dtype, name, relax, fn", _ALL, ids=[f"{r[1]}-{np.dtype(r[0]).name}" for r in _ALL]
)
def test_relaxation_lines_hold_pointwise_at_every_scale(dtype, name, relax, fn):
  """``lower line <= f(z) <= upper line`` at points of boxes of every scale, up to rounding in
  ``dtype``; no NaN from finite or infinite ends; NaN ends give NaN lines."""
  with jax.enable_x64(True):
    lower, upper = _boxes(dtype)
    lines = [np.asarray(b, np.float64) for b in relax(jnp.asarray(lower), jnp.asarray(upper))]
    lines = [np.broadcast_to(b, lower.shape) for b in lines]
    assert not any(np.isnan(b).any() for b in lines), f"{name}: NaN from non-NaN ends"
    z = _samples(lower, upper, dtype)
    with np.errstate(all="ignore"):
      fz = fn(z)
      lo = lines[0] * z + lines[1]
      hi = lines[2] * z + lines[3]
      terms = [lines[0] * z, lines[1], fz, lines[2] * z, lines[3]]
      scale = np.max(np.abs(np.stack(np.broadcast_arrays(*terms))), axis=0)  # rounding is relative
      eps = np.finfo(dtype).eps
      tol = 8 * eps * np.where(np.isfinite(scale), scale, 0) + 4 * np.finfo(dtype).tiny
      bad_lo = ~(lo <= fz + tol)
      bad_hi = ~(hi >= fz - tol)
    where = np.argwhere(bad_lo | bad_hi)
    assert where.size == 0, (
      f"{name}: line violated, e.g. box [{lower[where[0][1]]}, {upper[where[0][1]]}] at "
      f"z = {z[tuple(where[0])]}: f = {fz[tuple(where[0])]}, lines "
      f"{[float(b[where[0][1]]) for b in lines]}"
    )
    nan_end = relax(jnp.asarray([np.nan, -1.0, np.nan]), jnp.asarray([1.0, np.nan, np.nan]))
    assert all(np.isnan(np.broadcast_to(b, (3,))).all() for b in nan_end), name


def test_chord_offset_has_no_cancellation():
  """relu(x) - x on [-1e-3, 1e7] in float32: the true maximum is 0.001 (at x = -1e-3); the old
  chord offset ``u - chord*u`` rounded to 0 and gave an upper bound of -0.0."""
  box = Box(jnp.full((1, 1), -1e-3, jnp.float32), jnp.full((1, 1), 1e7, jnp.float32))
  f = lambda p, x: jax.nn.relu(x) - x
  for name, b in _all_bounds(f, box).items():
    assert float(b.upper[0, 0]) >= np.float32(1e-3), (name, b)
  # And through jnp.maximum with a constant (the KinkRule's shift): max(x, c) - x on [c - 1e-3, ...].
  c = 1e6
  box = Box(jnp.full((1, 1), c - 1e-1, jnp.float32), jnp.full((1, 1), 1e9, jnp.float32))
  g = lambda p, x: jnp.maximum(x, c) - x
  reach = float(np.float32(c) - np.float32(c - 1e-1))
  assert float(cb.crown(g)(None, box).upper[0, 0]) >= reach * (1 - 1e-6)


# -- overflow -------------------------------------------------------------------------------------


def _overflowing_net(depth, dtype, layer, growth):
  """Equals 1 everywhere, and its values stay near [0, 1], but its interval bounds grow by
  ``growth`` per layer (``g h - (g - 1) h`` loses the dependence) until they overflow:
  ``relu(0 * h + 1)`` after ``depth`` layers of ``relu(g h - (g - 1) h)``."""
  ten, nine = jnp.asarray(growth, dtype), jnp.asarray(growth - 1, dtype)
  eye = jnp.eye(2, dtype=dtype)
  scale = (lambda h, c: h * c) if layer == "mul" else (lambda h, c: h @ (c * eye))

  def f(p, x):
    h = x
    for _ in range(depth):
      h = jax.nn.relu(scale(h, ten) - scale(h, nine))
    return jax.nn.relu(scale(h, jnp.zeros((), dtype)) + 1)

  return f


@pytest.mark.parametrize("dtype, depth, growth", [(jnp.float16, 7, 10), (jnp.float32, 12, 10**4)])
@pytest.mark.parametrize("layer", ["mul", "dot"])
def test_overflowing_deep_net_is_never_bounded_away_from_its_value(dtype, depth, growth, layer):
  """The net is 1 everywhere; NaN intermediate bounds used to be read as dead ReLUs: [0, 0]."""
  f = _overflowing_net(depth, dtype, layer, growth)
  box = Box(jnp.zeros((2, 2), dtype), jnp.ones((2, 2), dtype))
  assert np.all(np.asarray(f(None, box.upper)) == 1)
  methods = METHODS if layer == "dot" else {k: METHODS[k] for k in ("ibp", "crown_ibp")}
  for name, make in methods.items():
    b = make(f)(None, box)
    _assert_contains_or_nan(b, np.ones((2, 2)), f"{name} depth {depth} {dtype.__name__}")
  if layer == "mul":  # an exact zero weight times [0, inf] is exactly 0: IBP gives [1, 1]
    b = cb.ibp(f)(None, box)
    np.testing.assert_array_equal(np.asarray(b.lower, np.float64), 1.0)
    np.testing.assert_array_equal(np.asarray(b.upper, np.float64), 1.0)


@pytest.mark.parametrize("op", ["mul", "dot"])
def test_huge_finite_box_times_zero_weight(op):
  """[-3e38, 3e38] in float32 times 0: the radius (u - l)/2 used to overflow, inf * 0 = NaN."""
  big = jnp.full((1, 2), 3e38, jnp.float32)
  box = Box(-big, big)
  w = jnp.zeros((2, 2), jnp.float32)
  f = (lambda p, x: x * 0.0 + 1) if op == "mul" else (lambda p, x: x @ w + 1)
  for name, b in _all_bounds(f, box).items():
    np.testing.assert_array_equal(np.asarray(b.lower), 1.0, err_msg=name)
    np.testing.assert_array_equal(np.asarray(b.upper), 1.0, err_msg=name)


INFINITE_LAYERS = {  # each makes both logits read an infinite hidden value with a positive weight
  "mul by inf": lambda x: x * jnp.array([jnp.inf]),
  "matmul by inf": lambda x: x @ jnp.array([[jnp.inf]]),
  "conv by inf": lambda x: jax.lax.conv_general_dilated(
    x[:, :, None],
    jnp.full((1, 1, 1), jnp.inf),
    (1,),
    "VALID",
    dimension_numbers=("NWC", "WIO", "NWC"),
  )[:, :, 0],
  "div by 0": lambda x: x / jnp.array([0.0]),
  "add inf": lambda x: x + jnp.array([jnp.inf]),
  "inf gain after relu": lambda x: jax.nn.relu(x + 1) * jnp.array([jnp.inf]),
}


@pytest.mark.parametrize("layer", sorted(INFINITE_LAYERS))
def test_an_infinite_weight_never_certifies_a_nan_margin(layer):
  """The margin is ``inf - inf`` (NaN) at every point. The backward pass combines the last
  layer's weights first (``(w_1 - w_0) * inf``, one sign), so it used to return +inf, which
  certifies; every method must give NaN (nothing certified) instead."""
  hidden = INFINITE_LAYERS[layer]
  f = lambda p, x: hidden(x) @ jnp.array([[1.0, 2.0]])
  box = Box(jnp.array([[1.0]]), jnp.array([[2.0]]))
  spec = jnp.array([[[-1.0, 1.0]]])  # z_1 - z_0
  assert np.isnan(jnp.einsum("nsk,nk->ns", spec, f(None, box.lower)))
  methods = {**METHODS, "alpha_crown": lambda f: cb.alpha_crown(f, iterations=2)}
  for name, make in methods.items():
    lower = make(f)(None, box, spec).lower
    assert np.isnan(lower).all(), (name, lower)


@pytest.mark.parametrize("fn, sat", [(jax.nn.sigmoid, (0.0, 1.0)), (jnp.tanh, (-1.0, 1.0))])
def test_saturated_s_shapes_on_huge_boxes(fn, sat):
  """sigmoid/tanh on [2e38, 3e38] used to give NaN (the midpoint overflowed): now the saturated
  value, as IBP; on [-3e38, 3e38] the full range."""
  ends = [(2e38, 3e38), (-3e38, -2e38), (-3e38, 3e38)]
  box = Box(jnp.array([[a for a, _ in ends]], jnp.float32), jnp.array([[b for _, b in ends]]))
  f = lambda p, x: fn(x)
  for name, b in _all_bounds(f, box).items():
    lo, hi = np.asarray(b.lower[0]), np.asarray(b.upper[0])
    assert np.isfinite(lo).all() and np.isfinite(hi).all(), (name, b)
    np.testing.assert_allclose(lo, [sat[1], sat[0], sat[0]], atol=1e-6, err_msg=name)
    np.testing.assert_allclose(hi, [sat[1], sat[0], sat[1]], atol=1e-6, err_msg=name)


def test_maximum_with_huge_constant_keeps_other_outputs_finite():
  """max(x, 1e38) on [-3e38, 3e38]: x - c overflows to -inf inside the relaxation, which used to
  give NaN, and the NaN spread to the example's other outputs through 0 * NaN."""
  box = Box(jnp.array([[-3e38, -1.0]], jnp.float32), jnp.array([[3e38, 1.0]], jnp.float32))
  f = lambda p, x: jnp.concatenate([jnp.maximum(x[:, :1], 1e38), 2 * x[:, 1:]], axis=1)
  for name, b in _all_bounds(f, box).items():
    np.testing.assert_allclose(np.asarray(b.lower[0]), [1e38, -2.0], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(b.upper[0]), [3e38, 2.0], rtol=1e-6, err_msg=name)
  # Through a dense layer, which mixes the two features of the example.
  w = jnp.array([[0.5, 0.0], [0.5, 1.0]], jnp.float32)
  g = lambda p, x: jnp.maximum(x, 1e38) @ w
  z = np.stack(np.meshgrid(np.linspace(-3e38, 3e38, 9), np.linspace(-1, 1, 5)), -1).reshape(-1, 2)
  values = np.maximum(z, 1e38) @ np.asarray(w, np.float64)
  for name, b in _all_bounds(g, box).items():
    assert np.isfinite(np.asarray(b.lower)).all() and np.isfinite(np.asarray(b.upper)).all()
    _assert_contains_or_nan(Box(b.lower[0] + 0 * values, b.upper[0] + 0 * values), values, name)


def test_relu_of_nan_bounds_is_unknown_not_dead():
  """A NaN interval is 'unknown': the ReLU relaxation must give NaN, never the dead neuron [0, 0]."""
  nan = jnp.array([np.nan, np.nan, -1.0, np.nan], jnp.float32)
  other = jnp.array([1.0, -1.0, np.nan, np.nan], jnp.float32)
  for bounds in (
    relaxations.two_piece_relaxation(nan, other, 0.0, 1.0),
    relaxations.hard_tanh_relaxation(nan, other),
    relaxations.sigmoid_relaxation(nan, other),
  ):
    for b in bounds:
      assert np.isnan(np.asarray(b)).all()


# -- continuity and tightness ---------------------------------------------------------------------


@pytest.mark.parametrize("fn", [jnp.tanh, jax.nn.sigmoid])
def test_s_shaped_bound_is_continuous_as_lower_end_crosses_zero(fn):
  """tanh on [0, 1] gave an upper bound of 0.855 and on [-1e-9, 1] 1.000: a jump at l = 0."""
  with jax.enable_x64(True):
    deltas = np.array([0.0, 1e-12, 1e-9, 1e-6, 1e-3])
    box = Box(jnp.asarray(-deltas)[:, None], jnp.ones((len(deltas), 1), jnp.float64))
    for mirrored in (box, Box(-box.upper, -box.lower)):  # and the upper end crossing 0
      b = cb.crown(lambda p, x: fn(x))(None, mirrored)
      for bound in (np.asarray(b.lower[:, 0]), np.asarray(b.upper[:, 0])):
        jumps = np.abs(bound - bound[0])
        assert (jumps <= 10 * deltas + 1e-9).all(), bound


def test_eps_gradient_of_tanh_net_is_moderate_across_zero():
  """d(bound)/d(eps) by finite differences where the box's lower end crosses 0 (it was -7e4)."""
  with jax.enable_x64(True):
    w = jnp.array([[1.5, -0.5], [0.3, 2.0]])
    f = lambda p, x: jnp.tanh(x @ p) @ jnp.array([[1.0], [-1.0]])
    x = jnp.array([[0.4, 0.1]])
    # At eps = 0.2 the first pre-activation's lower end (0.4*1.5 + 0.1*0.3 - eps*1.8) is ~0.27:
    # sweep eps over the crossing at 0.35 with small steps.
    bound = jax.jit(lambda eps: cb.crown(f)(w, Box.from_budget(x, eps, domain=None)).upper[0, 0])
    eps = np.linspace(0.3, 0.4, 41)
    values = np.array([float(bound(e)) for e in eps])
    h = 1e-7
    fd = np.array([(float(bound(e + h)) - float(bound(e - h))) / (2 * h) for e in eps[::4]])
    assert np.abs(np.diff(values)).max() < 0.05, values
    assert np.abs(fd).max() < 20, fd
    grad = jax.jit(jax.grad(bound))
    grads = np.array([float(grad(e)) for e in eps[::8]])
    assert np.isfinite(grads).all() and np.abs(grads).max() < 20, grads


def test_abs_lower_bound_on_symmetric_box_is_zero():
  """abs on [-1, 1]: a lower slope of 0 is allowed (any slope in [-1, 1] is) and gives the exact
  minimum 0; the adaptive choice used to pick -1 or 1 and give -1."""
  box = Box(-jnp.ones((1, 3)), jnp.array([[1.0, 2.0, 0.5]]))
  for name, b in _all_bounds(lambda p, x: jnp.abs(x), box).items():
    np.testing.assert_array_equal(np.asarray(b.lower), 0.0, err_msg=name)
  # Still sound where the linear term matters: |x| - x on [-1, 1] is in [0, 2].
  for name, b in _all_bounds(lambda p, x: jnp.abs(x) - x, box).items():
    z = np.linspace(-1, 1, 101)[:, None] * np.array([[1.0, 1.0, 1.0]])
    z = np.clip(z, -1, [1.0, 2.0, 0.5])
    _assert_contains_or_nan(Box(b.lower + 0 * z, b.upper + 0 * z), np.abs(z) - z, name)


def test_leaky_relu_with_broadcasting_slope_is_a_clear_error():
  """A slope array that broadcasts x to a larger shape has no element-wise relaxation: say so
  (it used to fail inside JAX's VJP); IBP still works."""
  slope = jnp.array([0.1, 0.2, 0.3])
  f = lambda p, x: jax.nn.leaky_relu(2 * x, slope)
  box = Box(-jnp.ones((2, 1)), jnp.ones((2, 1)))
  b = cb.ibp(f)(None, box)
  np.testing.assert_allclose(np.asarray(b.lower), -2 * np.broadcast_to(slope, (2, 3)), rtol=1e-6)
  for name in ("crown_ibp", "crown"):
    with pytest.raises(UnsupportedPrimitiveError, match="broadcast x first"):
      METHODS[name](f)(None, box)
