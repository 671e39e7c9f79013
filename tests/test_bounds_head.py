"""crown_ibp_head: bounds of a nonlinear head of ``spec @ fn`` from one interval pass. They equal
bounding the composed function in one graph (with the folded margins as reference bounds), hold at
sampled points, and their gradient matches finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbudget.bounds as cb
from cbudget.objective import margin_spec, negative_cross_entropy_of_margins
from tests.nets import RandomNet, init_net


def _problem(kind="cnn", activation="relu", n=5, seed=0, eps=0.05):
  net = RandomNet(kind, activation, depth=2, width=6, outputs=4)
  shape = (n, 5) if kind == "mlp" else (n, 6, 6, 2)
  x = jax.random.uniform(jax.random.key(seed), shape, jnp.float64)
  params = init_net(net, x, seed=seed + 1)
  labels = jnp.arange(n) % 4
  widths = jnp.linspace(0.0, 1.0, n).reshape((n,) + (1,) * (x.ndim - 1))  # one box of width 0
  return net.apply, params, cb.Box.from_budget(x, eps * widths), margin_spec(labels, 4, x.dtype)


def _mixed_head(m, m_box):
  """Two outputs per example: a smooth one and a kinked one that reads two margins."""
  del m_box
  return jnp.stack([jnp.tanh(m[:, 0]) - 0.5 * m[:, 1], jax.nn.relu(m[:, 1] - m[:, 2])], axis=1)


HEADS = {"cross_entropy": negative_cross_entropy_of_margins, "mixed": _mixed_head}


def _composed(f, head, params, box, spec):
  """The same head bounded as one graph: the margins enter with their folded IBP bounds."""
  m_box = cb.ibp(f)(params, box, spec)

  def g(inputs, x):
    p, m_lower, m_upper = inputs
    m = cb.reference_bounds(jnp.einsum("nsk,nk->ns", spec, f(p, x)), m_lower, m_upper)
    return head(m, cb.Box(m_lower, m_upper))

  return cb.crown(g)((params, m_box.lower, m_box.upper), box)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize(
  "kind,activation", [("cnn", "relu"), ("mlp", "tanh"), ("residual", "relu")]
)
def test_head_bounds_equal_the_composed_graph_and_hold_at_sampled_points(head, kind, activation):
  with jax.enable_x64(True):
    f, params, box, spec = _problem(kind, activation)
    head_fn = HEADS[head]
    got = jax.jit(cb.crown_ibp_head(f, head_fn))(params, box, spec)
    np.testing.assert_allclose(got.spec.lower, cb.ibp(f)(params, box, spec).lower, rtol=1e-12)
    np.testing.assert_allclose(got.spec.upper, cb.ibp(f)(params, box, spec).upper, rtol=1e-12)
    reference = jax.jit(lambda p: _composed(f, head_fn, p, box, spec))(params)
    np.testing.assert_allclose(got.crown.lower, reference.lower, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.crown.upper, reference.upper, rtol=1e-10, atol=1e-10)

    t = jax.random.uniform(jax.random.key(7), (300,) + box.shape, jnp.float64)
    points = jnp.concatenate(
      [box.lower[None], box.upper[None], box.lower + t * (box.upper - box.lower)]
    )

    def value(z):
      m = jnp.einsum("nsk,nk->ns", spec, f(params, z))
      return m, head_fn(m, got.spec)

    m, h = jax.vmap(value)(points)
    tol = 1e-10
    assert np.all(m >= got.spec.lower - tol) and np.all(m <= got.spec.upper + tol)
    for bounds in (got.ibp, got.crown):
      assert np.all(h >= bounds.lower - tol), np.max(bounds.lower - h)
      assert np.all(h <= bounds.upper + tol), np.max(h - bounds.upper)
    # The box of width 0 (example 0): every bound is the value itself.
    np.testing.assert_allclose(got.crown.lower[0], h[0, 0], rtol=1e-8, atol=1e-10)


def test_head_bound_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    f, params, box, spec = _problem("mlp", "tanh", eps=0.02)
    bound = cb.crown_ibp_head(f, negative_cross_entropy_of_margins, need_upper=False)
    loss = jax.jit(lambda p: jnp.sum(bound(p, box, spec).crown.lower))
    grads = jax.grad(loss)(params)
    direction = jax.tree.map(lambda g: jax.random.normal(jax.random.key(3), g.shape), grads)
    step = 1e-6
    moved = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
    numeric = (loss(moved(step)) - loss(moved(-step))) / (2 * step)
    analytic = sum(
      jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))
    )
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


def test_head_needs_a_spec_and_a_batch_of_rows():
  with jax.enable_x64(True):
    f, params, box, spec = _problem("mlp", "relu")
    with pytest.raises(ValueError, match="needs a spec"):
      cb.crown_ibp_head(f, _mixed_head)(params, box, None)
    with pytest.raises(ValueError, match=r"head must return \[N, H\]"):
      cb.crown_ibp_head(f, lambda m, m_box: m[:, 0])(params, box, spec)
    # A head that mixes the examples is refused like any function, and the error says where.
    mixing = lambda m, m_box: m - jnp.sum(m, axis=0, keepdims=True)
    with pytest.raises(cb.BatchMixingError, match="in the head.*along the batch axis"):
      cb.crown_ibp_head(f, mixing)(params, box, spec)
