"""cbudget.methods: SABR, MTL-IBP, fast IBP initialisation and regularisers, schedule details."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbudget import budgets, data, methods
from cbudget.attacks import margins
from cbudget.bounds import Box
from cbudget.evaluate import load_run
from cbudget.model import CertifiedModel
from cbudget.models import classifiers, generators
from cbudget.models.generators import SmallGenerator
from cbudget.train import lr_milestones, make_setup, train
from tests.conftest import tiny_config
from tests.test_model import TinyBatchNormNet, TinyNet


def tiny_model(mode, batchnorm=False, n=4):
  x = jax.random.uniform(jax.random.key(0), (n, 6, 6, 1))
  y = jnp.arange(n) % 3
  config = budgets.make_budget_config(mode, (0.25, 4.0))
  generator = (
    SmallGenerator(features=(4,), head_init_scale=1.0)
    if mode == "contextual"
    else (generators.budget_model("global") if mode == "global" else None)
  )
  net = TinyBatchNormNet() if batchnorm else TinyNet()
  model = CertifiedModel(net, generator, config, 3)
  return x, y, model, model.init(jax.random.key(1), x)


@pytest.mark.parametrize("mode", ["uniform", "global", "contextual"])
def test_every_method_trains_in_every_budget_mode(mode):
  """Two Adam steps on the sum of every method's loss (one compilation per mode): each loss is
  finite with finite gradients, and the step changes it."""
  x, y, model, variables = tiny_model(mode, batchnorm=mode == "global")
  # The regularisers ride along in one mode (they cost a compilation of their own).
  options = methods.MethodOptions(attack_steps=2, fast_reg=0.5 * (mode == "global"), eps_max=0.2)

  def losses(params):
    kw = dict(eps0=0.1, kappa=0.5, beta=0.5, key=jax.random.key(2), options=options)
    v = variables._replace(params=params)
    return {name: methods.get(name)(model, v, x, y, **kw).losses.loss for name in methods.METHODS}

  total = lambda params: sum(losses(params).values())
  step = jax.jit(lambda p: (losses(p), jax.grad(total)(p)))
  opt = optax.adam(1e-2)
  params, state = variables.params, opt.init(variables.params)
  seen = []
  for _ in range(2):
    values, grads = step(params)
    seen.append(values)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for name in methods.TRAIN_METHODS:
    assert np.isfinite(seen[0][name]) and seen[0][name] != seen[1][name], name


def test_train_runs_a_new_method_end_to_end(tmp_path):
  """SABR with fast init and regularisers on a BatchNorm net, with precise BatchNorm statistics
  after the epoch (two steps): the saved statistics are the pooled ones, not moving averages."""
  config = tiny_config(
    tmp_path / "sabr",
    model="resnet",
    method="sabr",
    num_train_examples=64,
    steps=2,
    train_attack_steps=2,
    init="fast",
    fast_reg=1.0,
    precise_bn=True,
    precise_bn_batches=1,
  )
  result = train(config)
  assert result["step"] == 2 and np.isfinite(result["loss"])
  state = load_run(config.workdir).state
  train_set = data.load("shapes", "train", seed=0, num_examples=64)
  first = next(iter(data.batches(train_set, 32, seed=1, epoch=0)))["image"]
  model = make_setup(config, 2).model
  expected = model.precise_batch_stats(state.variables, [first]).batch_stats
  chex.assert_trees_all_close(state.variables.batch_stats, expected, rtol=1e-5, atol=1e-6)


def test_precise_batch_stats_pool_batches_exactly():
  """Pooled over equal batches, the statistics are those of their union (mean and variance)."""
  x, _, model, variables = tiny_model("uniform", batchnorm=True, n=8)
  pooled = model.precise_batch_stats(variables, [x[:4], x[4:]]).batch_stats
  whole = model.precise_batch_stats(variables, [x]).batch_stats
  chex.assert_trees_all_close(pooled, whole, rtol=1e-5, atol=1e-6)
  batch_stats = model.training_logits(variables, x)[1].batch_stats
  chex.assert_trees_all_close(whole, batch_stats, rtol=1e-5, atol=1e-6)
  _, _, plain_model, plain = tiny_model("uniform")
  assert plain_model.precise_batch_stats(plain, [x]) is plain


@settings(max_examples=30, deadline=None)
@given(
  seed=st.integers(0, 2**16),
  lam=st.floats(0.01, 1.0),
  scale=st.floats(0.0, 0.8),
  far=st.floats(0.0, 3.0),
)
def test_sabr_box_is_inside_the_full_box(seed, lam, scale, far):
  """Whatever the centre (even far outside), the small box lies in the full box, with radius
  min(λ·ε, full radius) where the full box is not cut by [0, 1]."""
  with jax.enable_x64(True):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.uniform(k1, (3, 5, 5, 1), jnp.float64)
    eps = scale * jax.random.uniform(k2, (3, 5, 5, 1), jnp.float64)
    full = Box.from_budget(x, eps)
    centre = x + far * jax.random.normal(k3, x.shape, jnp.float64)
    small = methods.sabr_box(full, centre, eps, lam)
    assert np.all(small.lower >= full.lower) and np.all(small.upper <= full.upper)
    assert np.all(small.lower <= small.upper)
    np.testing.assert_allclose(small.radius, jnp.minimum(lam * eps, full.radius), atol=1e-12)


def test_sabr_box_is_centred_on_an_inner_point():
  full = Box(jnp.zeros(4), jnp.ones(4))
  small = methods.sabr_box(full, jnp.array([0.5, 0.05, 0.95, 2.0]), jnp.full(4, 0.5), 0.2)
  np.testing.assert_allclose(small.center, [0.5, 0.1, 0.9, 0.9], atol=1e-7)


def test_mtl_ibp_equals_its_parts_at_alpha_0_and_1():
  x, y, model, variables = tiny_model("contextual", batchnorm=True)
  kw = dict(eps0=0.1, kappa=0.3, beta=1.0, key=jax.random.key(5))
  opts = lambda a: methods.MethodOptions(mtl_alpha=a, attack_steps=3)
  ibp_only = methods.get("ibp")(model, variables, x, y, options=opts(1.0), **kw)
  at_one = methods.get("mtl-ibp")(model, variables, x, y, options=opts(1.0), **kw)
  np.testing.assert_allclose(at_one.losses.loss, ibp_only.losses.loss, rtol=1e-6)
  at_zero = methods.get("mtl-ibp")(model, variables, x, y, options=opts(0.0), **kw)
  # α = 0: the adversarial cross-entropy at the same attack point, mixed with the clean loss.
  _, bound_vars, _ = model.training_logits(variables, x)
  eps = model.budgets(variables.params, x, 0.1)
  point = methods.attack_point(model, bound_vars, x, y, eps, kw["key"], opts(0.0))
  assert np.all(point >= x - eps - 1e-7) and np.all(point <= x + eps + 1e-7)
  adv = optax.softmax_cross_entropy_with_integer_labels(model.logits(bound_vars, point), y).mean()
  np.testing.assert_allclose(at_zero.losses.robust, adv, rtol=1e-6)
  np.testing.assert_allclose(at_zero.losses.loss, 0.3 * at_zero.losses.clean + 0.7 * adv, rtol=1e-6)
  # The attack point is at least as bad as the clean input (it keeps the worst point seen).
  assert np.all(margins(model.logits(bound_vars, point), y) <= margins(at_zero.clean_logits, y))


def _growth_factors(params_of, eps=0.01):
  """Per-layer growth of the mean IBP radius of CNN-7's pre-activations at init (BN: identity),
  on 8x8 images to keep the test cheap (the widths of the layers are CNN-7's)."""
  config = budgets.make_budget_config("uniform", None)
  model = CertifiedModel(classifiers.get_classifier("cnn7", 10), None, config, 10)
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  variables = jax.jit(model.init)(jax.random.key(1), x)  # one compilation, not one per initialiser
  variables = variables._replace(params={**variables.params, "classifier": params_of(variables)})
  box = Box.from_budget(x, eps, None)
  layers = methods.preactivation_bounds(model, variables, box)
  radii = [float(jnp.mean(b.radius)) for b in layers]
  assert len(radii) == 6  # five conv blocks and the dense block
  return np.array(radii[1:]) / np.array(radii[:-1])


def test_fast_init_keeps_ibp_widths_bounded_with_depth_on_cnn7():
  fast = _growth_factors(lambda v: methods.fast_init(v.params["classifier"], jax.random.key(3)))
  default = _growth_factors(lambda v: v.params["classifier"])
  assert np.all((fast >= 0.5) & (fast <= 2.0)), fast
  # Flax's default (LeCun normal) lets widths grow like √n_in per layer: far outside [0.5, 2].
  assert np.all(default > 4.0), default
  assert np.prod(default) > 1e4 * np.prod(fast)


def test_torch_init_draws_every_layer_from_pytorchs_uniform_bound():
  """PyTorch's default: kernels and their biases uniform in +-1/sqrt(fan-in); the rest untouched."""
  net = classifiers.get_classifier("cnn7", 10)
  init = jax.jit(lambda key, x: net.init(key, x, train=False))  # one compilation
  params = init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  out = methods.torch_init(params, jax.random.key(1))
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  checked = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
    name = path[-1].key
    kernel = flat.get(path[:-1] + (jax.tree_util.DictKey("kernel"),))
    if name in ("kernel", "bias") and kernel is not None:
      bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
      assert np.all(np.abs(leaf) <= bound) and np.max(np.abs(leaf)) > 0.5 * bound, path
      if name == "kernel" and leaf.size > 1000:  # variance 1/(3 fan-in): a third of LeCun's
        np.testing.assert_allclose(np.var(leaf), bound**2 / 3, rtol=0.1)
      checked += 1
    else:  # BatchNorm scales and offsets keep their values
      np.testing.assert_array_equal(leaf, flat[path])
  assert checked == 2 * 7  # CNN-7: five convolutions and two dense layers, each a kernel and a bias


def test_fast_regularizer_penalises_blow_up_and_vanishes_when_satisfied():
  inp = Box(-jnp.ones((2, 4)), jnp.ones((2, 4)))
  # Radius 1 (= the input's), one active and one inactive neuron of equal centre and spread.
  balanced = Box(jnp.array([[-4.0, 2.0, -1.0, -1.0]] * 2), jnp.array([[-2.0, 4.0, 1.0, 1.0]] * 2))
  assert float(methods.fast_regularizer([balanced], inp)) == 0.0
  wide = Box(balanced.lower * 100, balanced.upper * 100)
  one_sided = Box(jnp.abs(balanced.lower) + 0.5, jnp.abs(balanced.upper) + 2.5)
  assert float(methods.fast_regularizer([wide], inp)) > 0.9
  assert float(methods.fast_regularizer([one_sided], inp)) > 0.9


def test_lr_decay_train_eps_factor_and_beta_tied_to_eps():
  assert lr_milestones("none") == () and lr_milestones("0.5,0.8") == (0.5, 0.8)
  for bad in ("0.9,0.5", "1.5", "x"):
    with pytest.raises(ValueError, match="--lr_decay"):
      lr_milestones(bad)
  config = tiny_config("unused", steps=100, eps=0.2, train_eps_factor=1.2, beta_schedule="eps")
  setup = make_setup(config, 10)
  for step in (0, 10, 25, 50, 100):
    eps0 = float(setup.eps0(step))
    assert float(setup.beta(step)) == pytest.approx(1 - eps0 / 0.24, abs=1e-6)
  assert float(setup.eps0(100)) == pytest.approx(0.24)
