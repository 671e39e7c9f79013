"""cbudget.objective: margin specs, the bound methods, the robust and the mixed loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbudget.bounds import Box, crown, ibp
from cbudget.objective import certified_loss, margin_lower_bounds, margin_spec, robust_cross_entropy
from tests.nets import RandomNet, init_net


def test_margin_spec_rows_are_e_y_minus_e_j():
  spec = margin_spec(jnp.array([2, 0]), 4)
  assert spec.shape == (2, 3, 4)
  logits = jnp.array([[0.1, 0.5, 2.0, -1.0], [3.0, 1.0, 0.0, 2.5]])
  margins = jnp.einsum("nsk,nk->ns", spec, logits)
  np.testing.assert_allclose(margins[0], [1.9, 1.5, 3.0], rtol=1e-6)
  np.testing.assert_allclose(margins[1], [2.0, 3.0, 0.5], rtol=1e-6)


def test_robust_cross_entropy_of_exact_margins_is_the_cross_entropy():
  """With the true margins as 'bounds' (a box of width 0), the robust loss is the clean loss."""
  logits = jax.random.normal(jax.random.key(0), (5, 4))
  labels = jnp.array([0, 1, 2, 3, 1])
  margins = jnp.einsum("nsk,nk->ns", margin_spec(labels, 4), logits)
  np.testing.assert_allclose(
    robust_cross_entropy(margins, labels, 4),
    optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
    rtol=1e-5,
  )


@pytest.mark.parametrize("kappa", [0.0, 0.3, 1.0])
def test_certified_loss_is_the_kappa_mix(kappa):
  logits = jax.random.normal(jax.random.key(1), (4, 3))
  labels = jnp.array([0, 1, 2, 0])
  lower = jax.random.normal(jax.random.key(2), (4, 2)) - 1.0
  out = certified_loss(logits, lower, labels, kappa)
  clean = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  robust = robust_cross_entropy(lower, labels, 3)
  np.testing.assert_allclose(out.clean, clean, rtol=1e-6)
  np.testing.assert_allclose(out.robust, robust, rtol=1e-6)
  np.testing.assert_allclose(out.loss, kappa * clean + (1 - kappa) * robust, rtol=1e-6)


def test_crown_ibp_mixes_the_separate_bounds():
  """The shared forward pass gives what IBP and CROWN-IBP give separately, mixed by beta."""
  with jax.enable_x64(True):
    net = RandomNet("mlp", "relu", depth=2, width=8)
    x = jax.random.uniform(jax.random.key(4), (4, 5), jnp.float64)
    params = init_net(net, x, seed=3)
    f = net.apply
    box = Box.from_budget(x, 0.05)
    spec = margin_spec(jnp.array([0, 1, 2, 0]), 3, jnp.float64)
    lb_ibp = jax.jit(ibp(f))(params, box, spec).lower
    lb_crown = jax.jit(crown(f, need_upper=False))(params, box, spec).lower
    mix = jax.jit(lambda b, beta: margin_lower_bounds(f, params, b, spec, "crown-ibp", beta))
    for beta in (0.0, 0.4, 1.0):
      np.testing.assert_allclose(mix(box, beta), beta * lb_crown + (1 - beta) * lb_ibp, rtol=1e-12)


def test_unknown_method_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown bound method 'sabr'"):
    margin_lower_bounds(lambda p, z: z, {}, Box.from_budget(jnp.zeros((1, 2)), 0.1), None, "sabr")
