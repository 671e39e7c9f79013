"""The certified objective: spec, robust loss, gradients into the generator, end-to-end soundness."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from cbudget import budgets
from cbudget.bounds import Box, crown, ibp
from cbudget.models import classifiers
from cbudget.models.generators import SmallGenerator
from cbudget.objective import certified_objective, margin_spec


class TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(3, (3, 3), strides=2)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def setup(dtype=jnp.float32, n=4):
  x = jax.random.uniform(jax.random.key(0), (n, 6, 6, 1), dtype)
  y = jnp.arange(n) % 3
  clf, gen = TinyNet(), SmallGenerator(features=(4,), head_init_scale=1.0)
  params = {
    "classifier": clf.init(jax.random.key(1), x)["params"],
    "budget": gen.init(jax.random.key(2), x)["params"],
  }
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  config = budgets.make_budget_config("contextual", (0.25, 4.0))
  return x, y, clf, gen, params, config


def test_margin_spec_rows_are_e_y_minus_e_j():
  spec = margin_spec(jnp.array([2, 0]), 4)
  assert spec.shape == (2, 3, 4)
  logits = jnp.array([[0.1, 0.5, 2.0, -1.0], [3.0, 1.0, 0.0, 2.5]])
  margins = jnp.einsum("nsk,nk->ns", spec, logits)
  np.testing.assert_allclose(margins[0], [1.9, 1.5, 3.0], rtol=1e-6)
  np.testing.assert_allclose(margins[1], [2.0, 3.0, 0.5], rtol=1e-6)


def test_robust_loss_upper_bounds_cross_entropy_in_the_box():
  x, y, clf, gen, params, config = setup()
  out = jax.jit(
    lambda p: certified_objective(
      clf, gen, p, None, x, y, config=config, eps0=0.05, method="ibp", num_classes=3
    )
  )(params)
  box = Box.from_budget(x, out.eps)
  pts = jax.random.uniform(jax.random.key(3), (200,) + x.shape, minval=box.lower, maxval=box.upper)
  logits = jax.jit(jax.vmap(lambda z: clf.apply({"params": params["classifier"]}, z)))(pts)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[None]).mean(axis=1)
  assert float(out.robust_loss) >= float(ce.max()) - 1e-6
  # Margins at every sampled point are above the certified lower bounds (end-to-end soundness with
  # the generated, non-uniform budgets).
  margins = jnp.einsum("nsk,pnk->pns", margin_spec(y, 3), logits)
  assert np.all(np.asarray(margins) >= np.asarray(out.margin_lower) - 1e-5)
  # The volume constraint holds per example.
  np.testing.assert_allclose(jnp.exp(jnp.log(out.eps).mean(axis=(1, 2, 3))), 0.05, rtol=1e-5)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_gradient_reaches_the_generator_and_matches_finite_differences(method):
  with jax.enable_x64(True):
    x, y, clf, gen, params, config = setup(jnp.float64)

    def loss(budget_params):
      out = certified_objective(
        clf,
        gen,
        {**params, "budget": budget_params},
        None,
        x,
        y,
        config=config,
        eps0=0.1,
        method=method,
        beta=0.5,
        num_classes=3,
      )
      return out.robust_loss

    loss = jax.jit(loss)
    grads = jax.jit(jax.grad(loss))(params["budget"])
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0
    check_grads(loss, (params["budget"],), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
  "name,shape",
  [(n, (28, 28, 1)) for n in classifiers.CLASSIFIERS if n not in ("cnn7", "dm_large")]
  + [("cnn7", (32, 32, 3)), ("dm_large", (32, 32, 3))],
)
def test_every_classifier_is_boundable_and_sound(name, shape):
  model = classifiers.get_classifier(name, 10)
  x = jax.random.uniform(jax.random.key(0), (2,) + shape)
  variables = model.init(jax.random.key(1), x)
  f = lambda v, z: model.apply(v, z, train=False)
  box = Box.from_budget(x, 0.002)
  spec = margin_spec(jnp.array([0, 1]), 10)
  pts = jax.random.uniform(jax.random.key(2), (16,) + x.shape, minval=box.lower, maxval=box.upper)
  margins = jnp.einsum("nsk,pnk->pns", spec, jax.jit(jax.vmap(lambda z: f(variables, z)))(pts))
  for method in (ibp(f), crown(f)):
    b = jax.jit(method)(variables, box, spec)
    assert np.all(np.isfinite(b.lower))
    assert np.all(np.asarray(margins) >= np.asarray(b.lower) - 2e-5 * (1 + np.abs(b.lower)))
