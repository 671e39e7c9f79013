"""Full CROWN's sparse intermediate bounds: backward passes only for unstable neurons."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbudget.bounds as cb
from tests.nets import RandomNet, init_net, sample_box_points


@pytest.mark.parametrize(
  "kind,activation,depth",
  [("mlp", "relu", 2), ("mlp", "hard_tanh", 3), ("residual", "relu", 3)],
)
def test_sparse_matches_dense_and_is_sound(kind, activation, depth):
  # Skipped elements are those whose relaxation is already exact (stable neurons), and it stays
  # exact on any tighter interval, so every relaxation the backward passes use is the same. With
  # one refined layer (depth 2; the first layer is exact by IBP in both) the bounds are therefore
  # equal. Deeper, dense full CROWN also tightens the stable neurons' IBP bounds, and so the IBP
  # bounds of later layers that each CROWN bound is intersected with: where IBP is the tighter one
  # the dense bound can be tighter (or, relaxations not being monotone in their interval, looser).
  # No ordering is a theorem there: soundness is asserted, closeness only loosely (measured: 1.9 %
  # of the width once each example skips the neurons stable in it, not those stable in all).
  with jax.enable_x64(True):
    net = RandomNet(kind, activation, depth=depth, width=4)
    x = jax.random.uniform(jax.random.key(0), (2, 5, 5, 1), jnp.float64)
    params = init_net(net, x, 1)
    f = lambda p, z: net.apply(p, z)
    box = cb.Box.from_budget(x, 0.04)
    dense = cb.crown(f, "crown", sparse=False, chunk_size=40)(params, box)
    width = float(jnp.max(dense.upper - dense.lower))
    tol = {"rtol": 1e-9, "atol": 1e-12} if depth == 2 else {"rtol": 0, "atol": 5e-2 * width}
    for chunk in (40, None):
      sparse = jax.jit(cb.crown(f, "crown", chunk_size=chunk))(params, box)
      np.testing.assert_allclose(sparse.lower, dense.lower, **tol)
      np.testing.assert_allclose(sparse.upper, dense.upper, **tol)
    values = jax.vmap(lambda z: f(params, z))(sample_box_points(box, jax.random.key(2), 500))
    assert bool(jnp.all(values >= sparse.lower - 1e-9) & jnp.all(values <= sparse.upper + 1e-9))


@pytest.mark.parametrize("sparse", [True, False])
def test_an_examples_bounds_do_not_depend_on_the_rest_of_the_batch(sparse):
  """Each example bounds its own unstable neurons: alone or beside others, the same bounds (with
  sparsity over the batch's union, an example got CROWN bounds for neurons unstable elsewhere)."""
  with jax.enable_x64(True):
    net = RandomNet("mlp", "hard_tanh", depth=3, width=4)
    x = jax.random.uniform(jax.random.key(0), (2, 5, 5, 1), jnp.float64)
    params = init_net(net, x, 1)
    f = lambda p, z: net.apply(p, z)
    bound = jax.jit(cb.crown(f, "crown", sparse=sparse, chunk_size=40))
    box = cb.Box.from_budget(x, 0.04)
    together = bound(params, box)
    for i in range(2):
      alone = bound(params, cb.Box(box.lower[i : i + 1], box.upper[i : i + 1]))
      np.testing.assert_allclose(alone.lower[0], together.lower[i], rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(alone.upper[0], together.upper[i], rtol=1e-12, atol=1e-12)


def test_skipped_chunks_still_give_gradients():
  net = RandomNet("mlp", "relu", depth=2, width=6)
  x = jax.random.uniform(jax.random.key(3), (2, 3, 3, 1))
  params = init_net(net, x, 2)
  f = lambda p, z: net.apply(p, z)
  lower = jax.jit(
    lambda eps: cb.crown(f, "crown", chunk_size=6)(params, cb.Box.from_budget(x, eps)).lower
  )
  eps, step = 0.02, 1e-3
  grad = jax.grad(lambda e: lower(e).sum())(eps)
  finite_difference = (lower(eps + step).sum() - lower(eps - step).sum()) / (2 * step)
  np.testing.assert_allclose(grad, finite_difference, rtol=0.05)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_first_layer_bounds_come_from_ibp_exactly(kind, monkeypatch):
  """IBP gives the exact range of an affine map of the input box, so full CROWN runs no backward
  pass for the first layer's pre-activations, and its bounds equal those with the pass."""
  from cbudget.bounds._src import propagate

  with jax.enable_x64(True):
    net = RandomNet(kind, "relu", depth=3, width=4)
    x = jax.random.uniform(jax.random.key(0), (2, 5, 5, 1), jnp.float64)
    params = init_net(net, x, 1)
    f = lambda p, z: net.apply(p, z)
    box = cb.Box.from_budget(x, 0.05)
    targets = []
    original = propagate.Propagator.crown_bounds_of

    def spy(self, target, *args, **kwargs):
      targets.append(target)
      return original(self, target, *args, **kwargs)

    monkeypatch.setattr(propagate.Propagator, "crown_bounds_of", spy)
    skipping = cb.crown(f, "crown", sparse=False)(params, box)
    skipped = len(targets)
    monkeypatch.setattr(propagate, "_track_exact", lambda *args: None)
    targets.clear()
    every_layer = cb.crown(f, "crown", sparse=False)(params, box)
    assert skipped == len(targets) - 1 >= 1  # one value fewer: the first pre-activations
    np.testing.assert_allclose(skipping.lower, every_layer.lower, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(skipping.upper, every_layer.upper, rtol=1e-9, atol=1e-12)
