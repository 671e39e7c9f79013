"""Loss fusion: the fused bound of the robust cross-entropy holds at sampled points of the box, is
never looser than log's tangent or IBP's robust cross-entropy, its gradient is finite where the
margins' bounds are huge, and the fused objective is the margin form's at beta = 0."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbudget.bounds import Box, crown_ibp_head, ibp
from cbudget.objective import (
  certified_loss,
  fused_certified_loss,
  fused_robust_cross_entropy,
  margin_spec,
  negative_cross_entropy_of_margins,
)
from tests.nets import RandomNet, init_net


def _problem(kind="mlp", activation="relu", n=6, seed=0, dtype=jnp.float64):
  net = RandomNet(kind, activation, depth=2, width=8, outputs=4)
  shape = (n, 5) if kind == "mlp" else (n, 6, 6, 2)
  x = jax.random.uniform(jax.random.key(seed), shape, dtype)
  params = init_net(net, x, seed=seed + 1)
  labels = jnp.arange(n) % 4
  return net.apply, params, x, labels


def _sampled_cross_entropy(f, params, box, labels, count=400):
  t = jax.random.uniform(jax.random.key(9), (count,) + box.shape, box.dtype)
  points = jnp.concatenate(
    [box.lower[None], box.upper[None], box.lower + t * (box.upper - box.lower)]
  )
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(f(params, z), labels)
  return jax.vmap(ce)(points)


@pytest.mark.parametrize("kind,activation", [("cnn", "relu"), ("mlp", "tanh")])
def test_fused_bound_is_above_the_cross_entropy_at_sampled_points(kind, activation):
  with jax.enable_x64(True):
    f, params, x, labels = _problem(kind, activation)
    eps = jnp.array([0.0, 0.001, 0.01, 0.05, 0.1, 0.3])[:, None]
    box = Box.from_budget(x, eps.reshape((-1,) + (1,) * (x.ndim - 1)))
    fused = jax.jit(lambda p, b: fused_robust_cross_entropy(f, p, b, labels, 4))(params, box)
    ce = _sampled_cross_entropy(f, params, box, labels)
    assert np.all(np.isfinite(fused))
    assert np.all(ce <= fused + 1e-10), np.max(ce - fused)
    # A box of width 0: the bound is the cross-entropy itself.
    np.testing.assert_allclose(fused[0], ce[0, 0], rtol=1e-8)


@pytest.mark.parametrize("kind,activation", [("cnn", "relu"), ("mlp", "tanh")])
def test_fused_bound_is_never_looser_than_logs_tangent_or_ibp(kind, activation):
  """Theorems, per example: the fused bound applies log after bounding its (positive) input U, and
  log U <= log d + (U - d)/d for the tangent at any d (concavity); the tangent form's backward row
  is the fused one scaled by 1/d > 0, so it reaches the same U. The fused bound is also capped by
  the IBP margins' robust cross-entropy."""
  with jax.enable_x64(True):
    f, params, x, labels = _problem(kind, activation, n=8, seed=3)
    eps = jnp.array([0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0])
    box = Box.from_budget(x, eps.reshape((-1,) + (1,) * (x.ndim - 1)))
    spec = margin_spec(labels, 4, jnp.float64)
    fused = jax.jit(lambda p, b: fused_robust_cross_entropy(f, p, b, labels, 4))(params, box)
    tangent_head = crown_ibp_head(f, negative_cross_entropy_of_margins, need_upper=False)
    tangent = -jax.jit(tangent_head)(params, box, spec).crown.lower[:, 0]
    ibp_lower = jax.jit(ibp(f))(params, box, spec).lower
    worst = jnp.concatenate([jnp.zeros_like(ibp_lower[:, :1]), -ibp_lower], axis=1)
    ibp_ce = optax.softmax_cross_entropy_with_integer_labels(worst, jnp.zeros_like(labels))
    assert np.all(fused <= tangent + 1e-10 * (1 + np.abs(tangent))), np.max(fused - tangent)
    assert np.all(fused <= ibp_ce + 1e-10 * (1 + np.abs(ibp_ce))), np.max(fused - ibp_ce)
    # The tangent is strictly looser somewhere on wide boxes: the test can tell the two apart.
    assert np.max(tangent - fused) > 1e-3


def test_fused_bound_has_a_finite_gradient_where_margin_bounds_are_huge():
  """Wide boxes on a random net put the margins' bounds far beyond exp's float32 range (e^88):
  the shift keeps the bound finite, and the relaxations keep inf/NaN out of the gradient."""
  f, params, x, labels = _problem("mlp", "relu", dtype=jnp.float32)
  params = jax.tree.map(lambda w: 30 * w, params)
  box = Box.from_budget(x, 0.5)
  loss = lambda p: fused_robust_cross_entropy(f, p, box, labels, 4).mean()
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  spec = margin_spec(labels, 4)
  assert -jnp.min(jax.jit(ibp(f))(params, box, spec).lower) > 200  # e^200 overflows in float32
  assert np.isfinite(value) and value > 200
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_fused_objective_mixes_with_ibp_and_its_margins_are_sound():
  with jax.enable_x64(True):
    f, params, x, labels = _problem("cnn", "relu")
    box = Box.from_budget(x, 0.02)
    clean_logits = f(params, x)
    ibp_lower = jax.jit(ibp(f))(params, box, margin_spec(labels, 4, jnp.float64)).lower
    fused = jax.jit(lambda p: fused_robust_cross_entropy(f, p, box, labels, 4))(params)
    objective = jax.jit(
      lambda p, beta: fused_certified_loss(f, p, box, clean_logits, labels, 0.3, beta)
    )
    at_zero, margins = objective(params, 0.0)
    reference = certified_loss(clean_logits, ibp_lower, labels, 0.3)
    np.testing.assert_allclose(at_zero, reference, rtol=1e-12)
    mixed, _ = objective(params, 0.25)
    np.testing.assert_allclose(
      mixed.robust, 0.25 * fused.mean() + 0.75 * reference.robust, rtol=1e-12
    )
    # The margin bounds reported with fusion hold at sampled points (IBP's, raised by the fused).
    assert np.all(margins >= ibp_lower)
    t = jax.random.uniform(jax.random.key(3), (200,) + x.shape, jnp.float64)
    points = box.lower + t * (box.upper - box.lower)
    spec = margin_spec(labels, 4, jnp.float64)
    true = jax.jit(jax.vmap(lambda z: jnp.einsum("nsk,nk->ns", spec, f(params, z))))(points)
    assert np.all(true >= margins - 1e-10)


def test_loss_fusion_is_for_crown_ibp_only():
  from cbudget.model import CertifiedModel

  model = CertifiedModel.create(dataset="shapes", classifier="mlp", budget="uniform")
  x = jnp.zeros((2,) + (16, 16, 1))
  with pytest.raises(ValueError, match="loss fusion applies to CROWN-IBP"):
    model.certified_loss(
      model.init(jax.random.key(0), x),
      x,
      jnp.zeros(2, int),
      eps0=0.1,
      kappa=0.0,
      method="ibp",
      loss_fusion=True,
    )
