"""Exactness, the orderings that are theorems (see shared/design/bound-facts.md), gradients, jit, vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cbudget.bounds import Box, crown, ibp
from tests.nets import RandomNet, init_net


def mlp(params, x):
  h = x
  for i, (w, b) in enumerate(params):
    h = h @ w + b
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return h


def random_mlp(key, sizes, dtype=jnp.float32):
  keys = jax.random.split(key, len(sizes))
  return [
    (jax.random.normal(k, (m, n), dtype) / np.sqrt(m), 0.1 * jax.random.normal(k, (n,), dtype))
    for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]


def test_affine_network_is_exact_for_crown():
  """For c.x + d over [l, u] the range is c.m + d +- |c|.r: CROWN and CROWN-IBP must hit it."""
  with jax.enable_x64(True):
    key = jax.random.key(0)
    w1, w2 = (
      jax.random.normal(key, (5, 7), jnp.float64),
      jax.random.normal(key, (7, 3), jnp.float64),
    )
    f = lambda p, x: jnp.tanh(0.0) + (x @ p[0] - 0.3) @ p[1]
    x = jax.random.uniform(key, (4, 5), jnp.float64)
    box = Box.from_budget(x, jax.random.uniform(jax.random.key(1), (4, 5), jnp.float64, 0, 0.2))
    c = w1 @ w2
    mid, rad = box.center, box.radius
    exact_lo = mid @ c - 0.3 * w2.sum(0) - rad @ jnp.abs(c)
    exact_hi = mid @ c - 0.3 * w2.sum(0) + rad @ jnp.abs(c)
    for method in (crown(f), crown(f, "crown")):
      b = method((w1, w2), box)
      np.testing.assert_allclose(b.lower, exact_lo, rtol=0, atol=1e-12)
      np.testing.assert_allclose(b.upper, exact_hi, rtol=0, atol=1e-12)


def test_single_relu_layer_ibp_is_exact_against_grid():
  """relu(Wx + b) per output is a monotone function of one affine map: IBP is exact; a fine grid
  over the 2-d box attains the range up to Lipschitz constant x grid step."""
  with jax.enable_x64(True):
    w = jnp.array([[1.0, -2.0, 0.5], [0.7, 1.5, -1.0]])
    b = jnp.array([0.1, -0.2, 0.05])
    f = lambda p, x: jax.nn.relu(x @ p[0] + p[1])
    lower, upper = jnp.array([[-0.3, -0.1]]), jnp.array([[0.4, 0.2]])
    box = Box(lower, upper)
    n = 401
    g0, g1 = np.meshgrid(np.linspace(-0.3, 0.4, n), np.linspace(-0.1, 0.2, n))
    grid = np.stack([g0.ravel(), g1.ravel()], 1)
    ys = np.asarray(f((w, b), jnp.asarray(grid)))
    step = 0.7 / (n - 1)
    lipschitz = np.abs(np.asarray(w)).sum(0)
    for method in (ibp(f), crown(f), crown(f, "crown")):
      bd = method((w, b), box)
      assert np.all(ys.min(0) >= bd.lower[0] - 1e-12)
      assert np.all(ys.max(0) <= bd.upper[0] + 1e-12)
    bd = ibp(f)((w, b), box)
    assert np.all(np.abs(np.asarray(bd.lower[0]) - ys.min(0)) <= lipschitz * step + 1e-12)
    assert np.all(np.abs(np.asarray(bd.upper[0]) - ys.max(0)) <= lipschitz * step + 1e-12)


def test_zero_width_box_gives_the_value():
  net = RandomNet("residual", "sigmoid", depth=2, width=3, batch_norm=True)
  x = jax.random.uniform(jax.random.key(0), (3, 5, 5, 1))
  params = init_net(net, x, 1)
  f = lambda p, x: net.apply(p, x)
  y = f(params, x)
  for method in (ibp(f), crown(f), crown(f, "crown")):
    b = jax.jit(method)(params, Box(x, x))
    np.testing.assert_allclose(b.lower, y, atol=1e-5)
    np.testing.assert_allclose(b.upper, y, atol=1e-5)


def test_shrinking_the_box_never_widens_ibp():
  params = random_mlp(jax.random.key(2), [6, 10, 10, 4])
  x = jax.random.uniform(jax.random.key(3), (8, 6))
  big = Box.from_budget(x, jax.random.uniform(jax.random.key(4), x.shape, maxval=0.3), domain=None)
  shrink = jax.random.uniform(jax.random.key(5), x.shape)
  small = Box(big.lower + shrink * big.radius, big.upper - (1 - shrink) * big.radius)
  bb, bs = ibp(mlp)(params, big), ibp(mlp)(params, small)
  assert np.all(bs.lower >= bb.lower - 1e-6) and np.all(bs.upper <= bb.upper + 1e-6)


def test_spec_folding_is_never_looser_than_ibp_then_spec():
  """Interval bounds of (C W) h + C b are at least as tight as C applied to IBP bounds of W h + b."""
  params = random_mlp(jax.random.key(6), [6, 12, 12, 5])
  x = jax.random.uniform(jax.random.key(7), (16, 6))
  box = Box.from_budget(x, 0.1)
  labels = jnp.arange(16) % 5
  spec = jax.nn.one_hot(labels, 5)[:, None, :] - jnp.eye(5)[None]
  plain = ibp(mlp)(params, box)
  lo_after = jnp.einsum("nsk,nk->ns", jnp.maximum(spec, 0), plain.lower) + jnp.einsum(
    "nsk,nk->ns", jnp.minimum(spec, 0), plain.upper
  )
  folded = ibp(mlp)(params, box, spec)
  assert np.all(folded.lower >= lo_after - 1e-5)
  # CROWN-IBP on the last linear layer alone (its input box is h's IBP box) is the same theorem.
  last = params[-1]
  h_box = ibp(mlp)(params[:-1] + [(jnp.eye(12), jnp.zeros(12))], box)
  h_box = Box(jax.nn.relu(h_box.lower), jax.nn.relu(h_box.upper))
  lin = lambda p, h: h @ p[0] + p[1]
  crown_last = crown(lin)(last, h_box, spec)
  ibp_last = ibp(lin)(last, h_box)
  lo_ibp_spec = jnp.einsum("nsk,nk->ns", jnp.maximum(spec, 0), ibp_last.lower) + jnp.einsum(
    "nsk,nk->ns", jnp.minimum(spec, 0), ibp_last.upper
  )
  assert np.all(crown_last.lower >= lo_ibp_spec - 1e-5)


def test_full_crown_tighter_than_ibp_on_average_over_random_nets():
  ratios = []
  for seed in range(6):
    params = random_mlp(jax.random.key(seed), [8, 20, 20, 20, 6])
    x = jax.random.uniform(jax.random.key(100 + seed), (4, 8))
    box = Box.from_budget(x, 0.05, domain=None)
    wi = ibp(mlp)(params, box)
    wc = crown(mlp, "crown")(params, box)
    ratios.append(float(jnp.mean(wc.upper - wc.lower) / jnp.mean(wi.upper - wi.lower)))
  assert np.mean(ratios) < 0.9, ratios


def test_jit_and_eager_agree_and_vmap_works():
  net = RandomNet("cnn", "relu", depth=2, width=3, stride=2)
  x = jax.random.uniform(jax.random.key(0), (2, 6, 6, 1))
  params = init_net(net, x, 3)
  f = lambda p, x: net.apply(p, x)
  spec = jnp.tile((jnp.eye(3)[0] - jnp.eye(3))[None], (2, 1, 1))
  for method in (ibp(f), crown(f), crown(f, "crown")):
    box = Box.from_budget(x, 0.05)
    eager, jitted = method(params, box, spec), jax.jit(method)(params, box, spec)
    np.testing.assert_allclose(eager.lower, jitted.lower, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eager.upper, jitted.upper, rtol=1e-5, atol=1e-6)
    epss = jnp.array([0.01, 0.03, 0.05])
    batched = jax.jit(jax.vmap(lambda e: method(params, Box.from_budget(x, e), spec).lower))(epss)
    for i, e in enumerate(epss):
      np.testing.assert_allclose(
        batched[i], method(params, Box.from_budget(x, e), spec).lower, rtol=1e-5, atol=1e-6
      )


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_gradients_match_finite_differences(method):
  """d(bounds)/d(eps) and d(bounds)/d(params), float64, at a generic point (no kink at it)."""
  with jax.enable_x64(True):
    params = random_mlp(jax.random.key(1), [4, 6, 6, 3], jnp.float64)
    x = jax.random.uniform(jax.random.key(2), (3, 4), jnp.float64, 0.2, 0.8)
    eps = jax.random.uniform(jax.random.key(3), (3, 4), jnp.float64, 0.02, 0.1)
    spec = jnp.tile((jnp.eye(3)[0] - jnp.eye(3))[None, 1:], (3, 1, 1))
    bound = {"ibp": ibp(mlp), "crown-ibp": crown(mlp), "crown": crown(mlp, "crown")}[method]
    weights = jax.random.normal(jax.random.key(4), (3, 2), jnp.float64)

    def loss(params, eps):
      b = bound(params, Box.from_budget(x, eps), spec)
      return jnp.sum(weights * b.lower) + 0.5 * jnp.sum(weights * b.upper)

    check_grads(loss, (params, eps), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)
    g = jax.grad(loss, argnums=1)(params, eps)
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_float32_and_float64_inputs_keep_their_dtype():
  params = random_mlp(jax.random.key(1), [4, 5, 2])
  x = jnp.full((2, 4), 0.5)
  assert crown(mlp)(params, Box.from_budget(x, 0.1)).lower.dtype == jnp.float32
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    b = crown(mlp, "crown")(p64, Box.from_budget(x.astype(jnp.float64), 0.1))
    assert b.lower.dtype == jnp.float64


def test_chunked_full_crown_equals_unchunked():
  params = random_mlp(jax.random.key(9), [5, 8, 8, 3])
  x = jax.random.uniform(jax.random.key(10), (3, 5))
  box = Box.from_budget(x, 0.1)
  whole = crown(mlp, "crown")(params, box)
  for chunked in (
    crown(mlp, "crown", chunk_size=5)(params, box),
    crown(mlp, "crown", memory_limit=4096)(params, box),
  ):
    np.testing.assert_allclose(whole.lower, chunked.lower, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole.upper, chunked.upper, rtol=1e-5, atol=1e-6)
