"""Bounds on blocks of examples (``in_example_blocks``) equal the bounds on the whole batch, values
and gradients, for every entry point that training uses; the training model and config pass the
block size through."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbudget import train
from cbudget.bounds import Box, crown, crown_ibp, crown_ibp_head, ibp, in_example_blocks
from cbudget.objective import margin_spec, negative_cross_entropy_of_margins
from tests.nets import RandomNet, init_net
from tests.test_model import setup as model_setup

N = 7  # blocks of 3: two full ones and a short last one


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def _problem(kind):
  net = RandomNet(kind, "relu", depth=2, width=6, outputs=4)
  shape = (N, 5) if kind == "mlp" else (N, 6, 6, 2)
  x = jax.random.uniform(jax.random.key(0), shape, jnp.float64)
  params = init_net(net, x, seed=1)
  eps = 0.05 + 0.1 * jax.random.uniform(jax.random.key(2), shape, jnp.float64)
  spec = margin_spec(jnp.arange(N) % 4, 4, jnp.float64)
  return net.apply, params, x, eps, spec


ENTRY_POINTS = {
  "ibp": lambda f: ibp(f),
  "crown-ibp": lambda f: crown(f, "ibp"),
  "crown_ibp": lambda f: crown_ibp(f, need_upper=False),
  "head": lambda f: crown_ibp_head(f, negative_cross_entropy_of_margins, need_upper=False),
  "full crown": lambda f: crown(f, "crown", need_upper=False),
}


@pytest.mark.parametrize(
  "name,kind",
  [
    ("crown_ibp", "cnn"),  # the training bounds on a CNN; the splitting is the same for every net
    ("ibp", "mlp"),
    ("head", "mlp"),
    ("crown-ibp", "mlp"),
    ("full crown", "mlp"),
  ],
)
def test_blocks_give_the_whole_batch_bounds_and_gradients(name, kind):
  f, params, x, eps, spec = _problem(kind)
  whole, blocked = ENTRY_POINTS[name](f), in_example_blocks(ENTRY_POINTS[name](f), 3)

  def total(bound, params, eps):
    out = bound(params, Box.from_budget(x, eps), spec)
    # need_upper=False leaves the upper bounds infinite
    return sum(jnp.sum(jnp.where(jnp.isfinite(a), a, 0)) for a in jax.tree.leaves(out)), out

  both = jax.value_and_grad(total, argnums=(1, 2), has_aux=True)
  (value, out), grads = jax.jit(both, static_argnums=0)(whole, params, eps)
  (value_b, out_b), grads_b = jax.jit(both, static_argnums=0)(blocked, params, eps)
  assert jax.tree.structure(out) == jax.tree.structure(out_b)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_b)):
    assert a.shape == b.shape and a.shape[0] == N
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  assert np.isfinite(float(value)) and float(value) == pytest.approx(float(value_b), rel=1e-12)


def test_blocks_no_smaller_than_the_batch_leave_the_bound_as_it_is():
  _, _, x, eps, spec = _problem("mlp")
  calls = []

  def bound(params, box, spec=None):  # a stand-in that records its blocks and returns its input
    calls.append(box.shape[0])
    return Box(box.lower, box.upper), spec

  box = Box.from_budget(x, eps)
  for size in (N, None, 2):
    out_box, out_spec = in_example_blocks(bound, size)(None, box, spec)
    np.testing.assert_array_equal(out_box.lower, box.lower)  # concatenated back in order
    np.testing.assert_array_equal(out_spec, spec)
  assert calls == [N, N, 2, 2, 2, 1]


@pytest.mark.parametrize("size", [0, -3, 3.0, True])
def test_a_block_size_that_is_not_a_positive_integer_is_refused(size):
  with pytest.raises(ValueError, match="block_size must be a positive integer"):
    in_example_blocks(ibp(lambda p, x: x), size)


def test_blocks_refuse_a_spec_of_another_batch_and_results_without_the_examples():
  f, params, x, eps, spec = _problem("mlp")
  box = Box.from_budget(x, eps)
  with pytest.raises(ValueError, match="spec must have shape"):
    in_example_blocks(ibp(f), 3)(params, box, spec[:-1])
  constant = lambda params, box, spec=None: Box(jnp.zeros(4), jnp.ones(4))  # no batch axis
  with pytest.raises(ValueError, match="leading axis"):
    in_example_blocks(constant, 3)(params, box)


def test_training_config_resolves_the_block_size():
  assert train.bound_block(0, 128) is None
  assert train.bound_block(5, 128) == 5
  one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
  assert train.bound_block(-1, 128) == (train.CPU_BOUND_BLOCK if one_cpu else None)
  assert train.bound_block(-1, 2 * train.CPU_BOUND_BLOCK) is None  # small batches stay whole
  with pytest.raises(ValueError, match="--bound_block"):
    train.bound_block(-2, 128)
  with pytest.raises(ValueError, match="--bound_block"):
    train.validate(train.TrainConfig(workdir="unused", dataset="shapes", bound_block=-3))
  config = train.TrainConfig(workdir="unused", dataset="shapes", bound_block=3)
  assert train.make_model(config).bound_block == 3


@pytest.mark.parametrize("fusion", [False, True])
def test_the_model_loss_is_the_same_on_blocks(fusion):
  x, y, model, variables = model_setup(jnp.float64, n=5)
  blocked = dataclasses.replace(model, bound_block=2)

  def loss(model, variables):
    out = model.certified_loss(
      variables, x, y, eps0=0.1, kappa=0.3, beta=0.6, method="crown-ibp", loss_fusion=fusion
    )
    return out.losses.loss, out.margin_lower

  both = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)
  (value, lower), grads = both(model, variables)
  (value_b, lower_b), grads_b = both(blocked, variables)
  np.testing.assert_allclose(lower, lower_b, rtol=1e-12, atol=1e-12)
  assert float(value) == pytest.approx(float(value_b), rel=1e-12)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
