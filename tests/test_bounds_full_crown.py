"""Full CROWN's sparse intermediate bounds: backward passes only for unstable neurons."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbudget.bounds as cb
from cbudget.bounds._src.graph import build_graph
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


def _batch_on_axis_1(p, x):
  """An MLP whose hidden values hold the examples on axis 1, not 0."""
  h = jnp.maximum(x.reshape(x.shape[0], -1) @ p["w1"], 0).T  # [H, N]
  h = jnp.maximum(p["w2"].T @ h, 0)  # [H, N]
  return (p["w3"].T @ h).T  # [N, K]


def _packing_cases():
  with jax.enable_x64(True):
    x = jax.random.uniform(jax.random.key(0), (3, 5, 5, 1), jnp.float64)
    for kind, activation, depth, batch_norm in [
      ("mlp", "relu", 3, False),
      ("cnn", "relu", 3, True),
      ("residual", "hard_tanh", 3, False),
    ]:
      net = RandomNet(kind, activation, depth=depth, width=4, batch_norm=batch_norm)
      yield kind, (lambda p, z, net=net: net.apply(p, z)), init_net(net, x, 1), x
    keys = jax.random.split(jax.random.key(5), 3)
    shapes = [(25, 6), (6, 6), (6, 3)]
    p = {
      f"w{i + 1}": jax.random.normal(k, s, jnp.float64)
      for i, (k, s) in enumerate(zip(keys, shapes))
    }
    yield "batch_on_axis_1", _batch_on_axis_1, p, x


@pytest.mark.parametrize("case", list(_packing_cases()), ids=lambda c: c[0])
def test_packed_rows_give_the_unpacked_bounds(case, monkeypatch):
  """Packing the unstable neurons of all examples into the passes' slots changes which slot bounds
  what, not the bounds: every slot sees its own example's relaxations and box (odd chunks, several
  passes and one pass alike)."""
  from cbudget.bounds._src import propagate

  _, f, params, x = case
  calls = []
  original = propagate.Propagator._packed_bounds_of

  def spy(self, *args, **kwargs):
    calls.append(1)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(propagate.Propagator, "_packed_bounds_of", spy)
  with jax.enable_x64(True):
    box = cb.Box.from_budget(x, 0.05)
    assert _shared_maps(f, params, box)
    for chunk in (9, None):  # several passes (the last one partly empty), one pass
      calls.clear()
      packed = jax.jit(cb.crown(f, "crown", chunk_size=chunk))(params, box)
      assert calls, "the packed path was not taken"
      unpacked = cb.crown(f, "crown", chunk_size=chunk, pack_rows=False)(params, box)
      np.testing.assert_allclose(packed.lower, unpacked.lower, rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(packed.upper, unpacked.upper, rtol=1e-10, atol=1e-12)
    values = jax.vmap(lambda z: f(params, z))(sample_box_points(box, jax.random.key(2), 500))
    assert bool(jnp.all(values >= packed.lower - 1e-9) & jnp.all(values <= packed.upper + 1e-9))


def _shared_maps(f, params, box):
  graph, _ = build_graph(f, params, box.lower, cb.DEFAULT_REGISTRY)
  return graph.shared_maps


def _per_example_maps():
  """Affine maps that differ per example: a mask per example in the params, and constants built
  from the batch size (found by a review: an ``N + 1``-batch trace accepts those)."""
  net = RandomNet("mlp", "relu", depth=3, width=4)
  yield "mask_in_params", lambda p, z: net.apply(p["net"], z * p["mask"])
  yield (
    "weight_from_arange",
    lambda p, z: net.apply(
      p["net"], z * (1.0 + 9.0 * (jnp.arange(z.shape[0]) == z.shape[0] - 1))[:, None, None, None]
    ),
  )
  yield (
    "fixed_key_dropout",
    lambda p, z: net.apply(p["net"], z * jax.random.bernoulli(jax.random.key(1), 0.5, z.shape)),
  )


@pytest.mark.parametrize("case", list(_per_example_maps()), ids=lambda c: c[0])
def test_per_example_affine_maps_are_never_packed(case, monkeypatch):
  """A packed slot applies every affine map as it is, so a map that differs per example (even a
  constant one) would meet the wrong example: the graph flags it and rows are not packed."""
  from cbudget.bounds._src import propagate

  _, f = case
  monkeypatch.setattr(propagate.Propagator, "_packed_bounds_of", None)  # fails if called
  with jax.enable_x64(True):
    net = RandomNet("mlp", "relu", depth=3, width=4)
    x = jax.random.uniform(jax.random.key(0), (3, 5, 5, 1), jnp.float64)
    params = {
      "net": init_net(net, x, 1),
      "mask": jax.random.uniform(jax.random.key(7), x.shape, jnp.float64, 0.2, 3.0),
    }
    box = cb.Box.from_budget(x, 0.05)
    assert not _shared_maps(f, params, box)
    bounds = cb.crown(f, "crown", chunk_size=9)(params, box)
    values = jax.vmap(lambda z: f(params, z))(sample_box_points(box, jax.random.key(2), 500))
    assert bool(jnp.all(values >= bounds.lower - 1e-9) & jnp.all(values <= bounds.upper + 1e-9))
