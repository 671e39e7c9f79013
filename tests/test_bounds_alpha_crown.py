"""α-CROWN: sound, never looser than full CROWN per example and row, differentiable, jit-able; the
optimisable relaxations are sound for every parameter in their range."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbudget.bounds import Box, alpha_crown, crown, register_activation
from cbudget.bounds._src import builtin_rules, relaxations
from cbudget.bounds._src.api import DEFAULT_REGISTRY
from cbudget.bounds._src.registry import activation_rule

ACTIVATIONS = {
  "relu": jax.nn.relu,
  "leaky_relu": lambda z: jax.nn.leaky_relu(z, 0.1),
  "abs": jnp.abs,
  "sigmoid": jax.nn.sigmoid,
  "clip_min": lambda z: jnp.minimum(z, 0.3),
}


def _mlp(key, sizes, dtype=jnp.float64):
  keys = jax.random.split(key, 2 * len(sizes))
  return [
    (
      jax.random.normal(keys[2 * i], (a, b), dtype) * 1.5 / np.sqrt(a),
      0.2 * jax.random.normal(keys[2 * i + 1], (b,), dtype),
    )
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
  ]


def _net(act):
  def net(params, x):
    h = x
    for i, (w, b) in enumerate(params):
      h = h @ w + b
      if i < len(params) - 1:
        h = act(h)
    return h

  return net


def _samples(key, box, n=400):
  u = jax.random.uniform(key, (n,) + box.shape, box.dtype)
  corners = jax.random.bernoulli(key, 0.5, (n // 4,) + box.shape).astype(box.dtype)
  u = jnp.concatenate([u, corners])
  return box.lower + u * (box.upper - box.lower)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), act=st.sampled_from(sorted(ACTIVATIONS)))
def test_sound_and_never_looser_than_crown(seed, act):
  with jax.enable_x64(True):
    key = jax.random.key(seed)
    params = _mlp(key, [3, 8, 8, 3])
    net = _net(ACTIVATIONS[act])
    x = jax.random.uniform(jax.random.fold_in(key, 1), (3, 3), jnp.float64)
    box = Box.from_budget(x, 0.3, None)
    ref = crown(net, "crown")(params, box)
    # Under jit: one compilation instead of every iteration's operations dispatched one by one.
    out = jax.jit(alpha_crown(net, iterations=6, lr=0.2))(params, box)
    assert jnp.all(out.lower >= ref.lower - 1e-12), (out.lower - ref.lower).min()
    assert jnp.all(out.upper <= ref.upper + 1e-12), (ref.upper - out.upper).min()
    ys = jax.vmap(lambda z: net(params, z))(_samples(jax.random.fold_in(key, 2), box))
    assert jnp.all(ys >= out.lower - 1e-9) and jnp.all(ys <= out.upper + 1e-9)


def test_tighter_than_crown_on_a_loose_net_with_spec():
  """On this (fixed) random net CROWN is loose; the optimised slopes must gain somewhere, for the
  spec rows, with intermediate optimisation and without."""
  with jax.enable_x64(True):
    key = jax.random.key(0)
    params = _mlp(key, [4, 16, 16, 3])
    net = _net(jax.nn.relu)
    x = jax.random.uniform(jax.random.fold_in(key, 1), (4, 4), jnp.float64)
    box = Box.from_budget(x, 0.25, None)
    spec = jnp.broadcast_to(jnp.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]]), (4, 2, 3))
    ref = crown(net, "crown")(params, box, spec)
    ys = jax.vmap(lambda z: jnp.einsum("nsk,nk->ns", spec, net(params, z)))(
      _samples(jax.random.fold_in(key, 2), box)
    )
    for joint in (True, False):
      bound = alpha_crown(net, iterations=10, lr=0.2, optimize_intermediate=joint)
      out = jax.jit(bound)(params, box, spec)
      assert out.lower.shape == (4, 2)
      assert jnp.all(out.lower >= ref.lower - 1e-12) and jnp.all(out.upper <= ref.upper + 1e-12)
      assert jnp.all(ys >= out.lower - 1e-9) and jnp.all(ys <= out.upper + 1e-9)
      assert float(jnp.sum(out.lower - ref.lower) + jnp.sum(ref.upper - out.upper)) > 1e-3


def test_zero_iterations_is_full_crown_and_chunking_is_sound():
  with jax.enable_x64(True):
    key = jax.random.key(3)
    params = _mlp(key, [3, 8, 8, 2])
    net = _net(jax.nn.relu)
    box = Box.from_budget(jax.random.uniform(key, (2, 3), jnp.float64), 0.2, None)
    ref = crown(net, "crown")(params, box)
    same = alpha_crown(net, iterations=0)(params, box)
    np.testing.assert_array_equal(same.lower, ref.lower)
    np.testing.assert_array_equal(same.upper, ref.upper)
    chunked = alpha_crown(net, iterations=4, chunk_size=5)(params, box)
    assert jnp.all(chunked.lower >= ref.lower - 1e-12)
    ys = jax.vmap(lambda z: net(params, z))(_samples(key, box))
    assert jnp.all(ys >= chunked.lower - 1e-9) and jnp.all(ys <= chunked.upper + 1e-9)


def test_jit_and_gradients():
  with jax.enable_x64(True):
    key = jax.random.key(5)
    params = _mlp(key, [3, 6, 6, 2])
    net = _net(jax.nn.relu)
    box = Box.from_budget(jax.random.uniform(key, (2, 3), jnp.float64), 0.2, None)
    bound = alpha_crown(net, iterations=2, lr=0.2)  # eager dispatch is slow: few iterations
    eager = bound(params, box)
    jitted = jax.jit(bound)(params, box)
    np.testing.assert_allclose(jitted.lower, eager.lower, rtol=1e-9, atol=1e-9)

    loss = lambda p, lo, hi: jnp.sum(bound(p, Box(lo, hi)).lower)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, box.lower, box.upper)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads[0]))

    # With the parameters held at CROWN's (a zero step), every iterate is the same smooth function
    # of the weights, so the gradient through the whole search must match finite differences.
    frozen = alpha_crown(net, iterations=3, optimizer=optax.sgd(0.0))
    f = lambda w: jnp.sum(frozen([(w, params[0][1])] + params[1:], box).lower)
    value_and_grad = jax.jit(jax.value_and_grad(f))  # one compilation for g and both values
    g = value_and_grad(params[0][0])[1]
    direction = jax.random.normal(jax.random.fold_in(key, 1), g.shape, jnp.float64)
    h = 1e-6
    plus, minus = (value_and_grad(params[0][0] + s * h * direction)[0] for s in (1, -1))
    fd = (plus - minus) / (2 * h)
    np.testing.assert_allclose(jnp.sum(g * direction), fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
  "fn,left,right",
  [(jax.nn.relu, 0.0, 1.0), (jnp.abs, -1.0, 1.0), (lambda z: jnp.minimum(z, 0), 1.0, 0.0)],
)
def test_kink_support_sound_for_every_alpha(fn, left, right):
  with jax.enable_x64(True):
    key = jax.random.key(7)
    l = jax.random.uniform(key, (50,), jnp.float64, -2, 1)
    u = l + jax.random.uniform(jax.random.fold_in(key, 1), (50,), jnp.float64, 0, 3)
    alpha = jax.random.uniform(jax.random.fold_in(key, 2), (4, 50), jnp.float64)  # 4 rows
    base = relaxations.two_piece_relaxation(l, u, left, right)
    b = relaxations.with_kink_support(base, l, u, left, right, alpha)
    z = l + jax.random.uniform(jax.random.fold_in(key, 3), (200, 1, 50), jnp.float64) * (u - l)
    assert jnp.all(b.lower_slope * z + b.lower_offset <= fn(z) + 1e-12)
    assert jnp.all(b.upper_slope * z + b.upper_offset >= fn(z) - 1e-12)
    # alpha_init gives back the relaxation it was read from.
    again = relaxations.with_kink_support(
      base, l, u, left, right, relaxations.kink_alpha_init(base, left, right)[0]
    )
    for a, c in zip(again, base):
      np.testing.assert_array_equal(jnp.broadcast_to(a, c.shape), c)


@pytest.mark.parametrize("f", [jax.nn.sigmoid, jnp.tanh])
def test_s_shaped_tangents_sound_for_every_alpha(f):
  with jax.enable_x64(True):
    key = jax.random.key(9)
    l = jax.random.uniform(key, (60,), jnp.float64, -6, 4)
    u = l + jax.random.uniform(jax.random.fold_in(key, 1), (60,), jnp.float64, 0, 6)
    alpha = jax.random.uniform(jax.random.fold_in(key, 2), (2, 3, 60), jnp.float64)
    relax = (
      relaxations.sigmoid_relaxation_with
      if f is jax.nn.sigmoid
      else relaxations.tanh_relaxation_with
    )
    b = relax(l, u, alpha)
    z = l + jax.random.uniform(jax.random.fold_in(key, 3), (300, 1, 60), jnp.float64) * (u - l)
    assert jnp.all(b.lower_slope * z + b.lower_offset <= f(z) + 1e-12)
    assert jnp.all(b.upper_slope * z + b.upper_offset >= f(z) - 1e-12)


def test_kink_rule_starts_at_its_linearisation():
  with jax.enable_x64(True):
    rule = builtin_rules.KinkRule(is_max=True)
    box = Box(jnp.array([[-1.0, 0.5, -2.0, 0.2]]), jnp.array([[2.0, 1.0, -0.5, 0.9]]))
    c = jnp.array([0.0, 0.0, 0.0, 0.4])
    evaluate = lambda a, b: [jnp.maximum(a, b)]
    options = {"relu_lower_slope": "adaptive"}
    fixed = rule.linearize([box, c], {}, evaluate, options)
    alpha = rule.alpha_init([box, c], {}, evaluate, options)
    moved = rule.relax_with([box, c], {}, evaluate, options, alpha[:, None])
    for a, b in zip(moved.bounds, fixed.bounds):
      np.testing.assert_array_equal(jnp.broadcast_to(a, (1,) + b.shape)[0], b)


def test_user_activation_through_the_registry():
  """A user's named activation with an optimisable relaxation is optimised like ReLU."""

  @jax.jit
  def my_relu(z):
    return jnp.maximum(z, 0.0)

  def relax(l, u, op):
    return relaxations.two_piece_relaxation(l, u, 0.0, 1.0)

  def relax_with(l, u, op, alpha):
    return relaxations.with_kink_support(relax(l, u, op), l, u, 0.0, 1.0, alpha[0])

  def alpha_init(l, u, op):
    return relaxations.kink_alpha_init(relax(l, u, op), 0.0, 1.0)

  registry = DEFAULT_REGISTRY.copy()
  register_activation(
    my_relu,
    lambda l, u, op: (jnp.maximum(l, 0), jnp.maximum(u, 0)),
    relax,
    relax_with=relax_with,
    alpha_init=alpha_init,
    registry=registry,
  )
  with jax.enable_x64(True):
    key = jax.random.key(0)
    params = _mlp(key, [4, 16, 16, 3])
    net = _net(my_relu)
    box = Box.from_budget(jax.random.uniform(key, (3, 4), jnp.float64), 0.25, None)
    ref = crown(net, "crown", registry=registry)(params, box)
    out = alpha_crown(net, iterations=8, lr=0.2, registry=registry)(params, box)
    assert jnp.all(out.lower >= ref.lower - 1e-12)
    assert float(jnp.sum(out.lower - ref.lower)) > 1e-3
    ys = jax.vmap(lambda z: net(params, z))(_samples(key, box))
    assert jnp.all(ys >= out.lower - 1e-9) and jnp.all(ys <= out.upper + 1e-9)


def test_bad_arguments():
  net = _net(jax.nn.relu)
  with pytest.raises(ValueError, match="iterations"):
    alpha_crown(net, iterations=-1)
  with pytest.raises(ValueError, match="lr"):
    alpha_crown(net, lr=0.0)
  with pytest.raises(ValueError, match="both relax_with and alpha_init"):
    activation_rule(lambda l, u, op: (l, u), lambda l, u, op: None, relax_with=lambda *a: None)
