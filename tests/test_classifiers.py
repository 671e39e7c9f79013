"""Tests for cbudget.models.classifiers.

Parameter counts (10 classes, trainable params; MNIST 28x28x1 / CIFAR 32x32x3):
mlp 269,322 / 855,050; dm_small 329,606 / 470,918; dm_medium 893,418 /
1,188,906; dm_large 3,623,498 / 5,721,802; cnn7 13,259,338 / 17,192,650;
resnet 647,830 / 840,118.  They also appear in the ids of
``test_parameter_counts``.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from cbudget import data
from cbudget.bounds import Box, crown, ibp
from cbudget.objective import margin_spec
from cbudget.models import classifiers as C

SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}

PARAM_COUNTS = {
  ("mlp", "mnist"): 269_322,
  ("mlp", "cifar10"): 855_050,
  ("dm_small", "mnist"): 329_606,
  ("dm_small", "cifar10"): 470_918,
  ("dm_medium", "mnist"): 893_418,
  ("dm_medium", "cifar10"): 1_188_906,
  ("dm_large", "mnist"): 3_623_498,
  ("dm_large", "cifar10"): 5_721_802,
  ("cnn7", "mnist"): 13_259_338,
  ("cnn7", "cifar10"): 17_192_650,
  ("resnet", "mnist"): 647_830,
  ("resnet", "cifar10"): 840_118,
}


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init(name, dataset, batch=4, seed=0, shapes_only=False):
  """The model, its variables (jitted init: one compilation instead of one per initialiser, or
  only their shapes) and a random batch."""
  facts = data.info(dataset)
  model = C.get_classifier(name, 10, mean=facts.mean, std=facts.std)
  x = jax.random.uniform(jax.random.key(seed), (batch,) + SHAPES[dataset])
  init = lambda key, x: model.init(key, x, train=False)
  key = jax.random.key(1)
  variables = jax.eval_shape(init, key, x) if shapes_only else jax.jit(init)(key, x)
  return model, variables, x


@pytest.mark.parametrize("dataset", sorted(SHAPES))
@pytest.mark.parametrize("name", C.CLASSIFIERS)
def test_forward_shape(name, dataset):
  model, variables, x = _init(name, dataset)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert logits.shape == (x.shape[0], 10)
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize(
  "name,dataset,expected",
  [(n, d, c) for (n, d), c in PARAM_COUNTS.items()],
  ids=[f"{n}-{d}-{c:,}params" for (n, d), c in PARAM_COUNTS.items()],
)
def test_parameter_counts(name, dataset, expected):
  model = C.get_classifier(name, 10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + SHAPES[dataset])))
  n = _count(shapes["params"])
  print(f"{name} on {dataset}: {n:,} parameters")
  assert n == expected


@pytest.mark.parametrize("name", C.BN_CLASSIFIERS)
def test_bn_train_mode_updates_batch_stats(name):
  model, variables, x = _init(name, "cifar10", batch=8)
  assert "batch_stats" in variables
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (8, 10)
  old = jax.tree.leaves(variables["batch_stats"])
  new = jax.tree.leaves(updates["batch_stats"])
  assert len(old) == len(new) > 0
  assert any(not np.allclose(a, b) for a, b in zip(old, new))


def test_bn_free_models_have_no_batch_stats():
  for name in set(C.CLASSIFIERS) - set(C.BN_CLASSIFIERS):
    _, variables, _ = _init(name, "mnist", batch=2, shapes_only=True)
    assert set(variables) == {"params"}, name


@pytest.mark.parametrize("name", C.CLASSIFIERS)
def test_inference_is_per_example_independent(name):
  model, variables, x = _init(name, "cifar10", batch=6)
  if "batch_stats" in variables:
    # Move running stats away from the init values so BN is non-trivial.
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
  perm = jnp.array([3, 0, 5, 1, 4, 2])
  out = model.apply(variables, x, train=False)
  out_perm = model.apply(variables, x[perm], train=False)
  np.testing.assert_allclose(out[perm], out_perm, rtol=1e-5, atol=1e-5)
  # Single example alone gives the same logits as in the batch.
  single = model.apply(variables, x[2:3], train=False)
  np.testing.assert_allclose(single[0], out[2], rtol=1e-5, atol=1e-5)


def test_train_flag_ignored_by_bn_free_models():
  model, variables, x = _init("dm_small", "mnist")
  np.testing.assert_array_equal(
    model.apply(variables, x, train=True), model.apply(variables, x, train=False)
  )


def test_normalisation_inside_model():
  """A model with (mean, std) equals the identity-normalised model on (x-mean)/std."""
  mean, std = data.info("cifar10").mean, data.info("cifar10").std
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
  m_norm = C.get_classifier("dm_small", 10, mean=mean, std=std)
  m_id = C.get_classifier("dm_small", 10)
  variables = m_id.init(jax.random.key(1), x)
  xn = (x - jnp.array(mean)) / jnp.array(std)
  np.testing.assert_allclose(
    m_norm.apply(variables, x), m_id.apply(variables, xn), rtol=1e-5, atol=1e-5
  )


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as info:
    C.get_classifier("vgg", 10)
  for name in C.CLASSIFIERS:
    assert name in str(info.value)


def test_mlp_hidden_widths_configurable():
  model = C.get_classifier("mlp", 5, hidden=(32,))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  kernels = [p["kernel"].shape for p in variables["params"].values()]
  assert kernels == [(784, 32), (32, 5)]


def test_jaxpr_has_only_simple_primitives():
  """Bound propagation traces models to jaxprs: keep the primitive set small."""
  allowed = {
    "sub",
    "div",
    "mul",
    "add",
    "reshape",
    "dot_general",
    "conv_general_dilated",
    "max",
    "broadcast_in_dim",
    "rsqrt",
    "convert_element_type",
    "pjit",
    "squeeze",
    "expand_dims",
    "integer_pow",
    "sqrt",
    "jit",
    "custom_jvp_call",  # nn.relu is a custom_jvp around max(x, 0).
  }
  for name in C.CLASSIFIERS:
    model, variables, x = _init(name, "cifar10", batch=2, shapes_only=True)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)

    def prims(jp):
      for eqn in jp.eqns:
        yield eqn.primitive.name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          yield from prims(sub)

    used = set(prims(jaxpr.jaxpr))
    assert used <= allowed, (name, used - allowed)


@pytest.mark.parametrize(
  "name,shape",
  [(n, (28, 28, 1)) for n in C.CLASSIFIERS if n not in ("cnn7", "dm_large")]
  + [("cnn7", (32, 32, 3)), ("dm_large", (32, 32, 3))],
)
def test_every_classifier_is_boundable_and_sound(name, shape):
  model = C.get_classifier(name, 10)
  x = jax.random.uniform(jax.random.key(0), (2,) + shape)
  variables = jax.jit(model.init)(jax.random.key(1), x)
  f = lambda v, z: model.apply(v, z, train=False)
  box = Box.from_budget(x, 0.002)
  spec = margin_spec(jnp.array([0, 1]), 10)
  pts = jax.random.uniform(jax.random.key(2), (16,) + x.shape, minval=box.lower, maxval=box.upper)
  margins = jnp.einsum("nsk,pnk->pns", spec, jax.jit(jax.vmap(lambda z: f(variables, z)))(pts))
  for method in (ibp(f), crown(f)):
    b = jax.jit(method)(variables, box, spec)
    assert np.all(np.isfinite(b.lower))
    assert np.all(np.asarray(margins) >= np.asarray(b.lower) - 2e-5 * (1 + np.abs(b.lower)))
