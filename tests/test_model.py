"""cbudget.model.CertifiedModel: budgets -> box -> bounds -> loss, BatchNorm, dataset facts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from cbudget import budgets, data
from cbudget.model import CertifiedModel, Variables
from cbudget.models.generators import SmallGenerator
from cbudget.objective import margin_spec


class TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(3, (3, 3), strides=2)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class TinyBatchNormNet(nn.Module):
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(4)(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(x)
    return nn.Dense(3)(nn.relu(x))


def setup(dtype=jnp.float32, n=4):
  x = jax.random.uniform(jax.random.key(0), (n, 6, 6, 1), dtype)
  y = jnp.arange(n) % 3
  config = budgets.make_budget_config("contextual", (0.25, 4.0))
  model = CertifiedModel(TinyNet(), SmallGenerator(features=(4,), head_init_scale=1.0), config, 3)
  variables = model.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda a: a.astype(dtype), variables)
  return x, y, model, variables


def test_robust_loss_upper_bounds_cross_entropy_in_the_box():
  x, y, model, variables = setup()
  out = jax.jit(
    lambda v: model.certified_loss(v, x, y, eps0=0.05, kappa=0.0, method="ibp", train=False)
  )(variables)
  assert float(out.losses.loss) == float(out.losses.robust)  # kappa = 0: the robust loss only
  box = model.box(x, out.eps)
  pts = jax.random.uniform(jax.random.key(3), (200,) + x.shape, minval=box.lower, maxval=box.upper)
  logits = jax.jit(jax.vmap(lambda z: model.logits(variables, z)))(pts)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[None]).mean(axis=1)
  assert float(out.losses.robust) >= float(ce.max()) - 1e-6
  # Margins at every sampled point are above the certified lower bounds (end-to-end soundness with
  # the generated, non-uniform budgets).
  margins = jnp.einsum("nsk,pnk->pns", margin_spec(y, 3), logits)
  assert np.all(np.asarray(margins) >= np.asarray(out.margin_lower) - 1e-5)
  # The volume constraint holds per example.
  np.testing.assert_allclose(jnp.exp(jnp.log(out.eps).mean(axis=(1, 2, 3))), 0.05, rtol=1e-5)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_gradient_reaches_the_generator_and_matches_finite_differences(method):
  with jax.enable_x64(True):
    x, y, model, variables = setup(jnp.float64)

    def loss(budget_params):
      params = {**variables.params, "budget": budget_params}
      out = model.certified_loss(
        Variables(params), x, y, eps0=0.1, kappa=0.0, beta=0.5, method=method
      )
      return out.losses.loss

    loss = jax.jit(loss)
    grads = jax.jit(jax.grad(loss))(variables.params["budget"])
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0
    check_grads(
      loss, (variables.params["budget"],), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-4
    )


def test_batchnorm_training_bounds_use_the_batch_statistics():
  """The clean pass and the bounds see the same (batch) statistics; running ones move towards them."""
  x = jax.random.uniform(jax.random.key(0), (8, 6, 6, 1))
  config = budgets.make_budget_config("uniform")
  model = CertifiedModel(TinyBatchNormNet(), None, config, 3)
  variables = model.init(jax.random.key(1), x)
  assert variables.batch_stats is not None and variables.params["budget"] is None
  assert set(model.classifier_variables(variables)) == {"params", "batch_stats"}
  logits, bound_variables, running = jax.jit(model.training_logits)(variables, x)
  stats = bound_variables.batch_stats["BatchNorm_0"]
  hidden = x.reshape(8, -1) @ variables.params["classifier"]["Dense_0"]["kernel"]
  hidden = hidden + variables.params["classifier"]["Dense_0"]["bias"]
  np.testing.assert_allclose(stats["mean"], hidden.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    logits, jax.jit(model.logits)(bound_variables, x), rtol=1e-5, atol=1e-5
  )
  expected = jax.tree.map(
    lambda old, cur: 0.9 * old + 0.1 * cur, variables.batch_stats, bound_variables.batch_stats
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), running, expected)
  # Training's loss bounds the batch-statistics network at eps0 = 0: its margins exactly.
  loss = jax.jit(lambda v: model.certified_loss(v, x, jnp.zeros(8, int), eps0=0.0, kappa=0.5))
  out = loss(variables)
  margins = jnp.einsum("nsk,nk->ns", margin_spec(jnp.zeros(8, int), 3), logits)
  np.testing.assert_allclose(out.margin_lower, margins, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out.batch_stats, running)


def test_without_batchnorm_the_classifier_variables_are_its_params():
  x, _, model, variables = setup()
  assert variables.batch_stats is None
  assert model.classifier_variables(variables) == {"params": variables.params["classifier"]}


def test_create_takes_classes_and_normalisation_from_the_dataset_facts():
  for name in data.DATASETS:
    facts = data.info(name)
    model = CertifiedModel.create(
      dataset=name, classifier="mlp", budget="global", budget_range=(0.5, 2.0)
    )
    assert model.num_classes == facts.num_classes
    assert (model.classifier.mean, model.classifier.std) == (facts.mean, facts.std)
  # A canvas is normalised like the images it is made of.
  assert data.info("cifar_canvas").mean == data.info("cifar10").mean
  assert data.info("mnist_canvas").std == data.info("mnist").std


def test_init_is_deterministic_and_shape_only():
  x, _, model, variables = setup()
  again = model.init(jax.random.key(1), jnp.zeros_like(x[:1]))
  jax.tree.map(np.testing.assert_array_equal, variables, again)
