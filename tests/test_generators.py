"""Tests for cbudget.models.generators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbudget.budgets import budgets, make_budget_config
from cbudget.models.generators import (
  CoarseGenerator,
  GlobalBudget,
  SmallGenerator,
  UNetGenerator,
  WideGenerator,
  budget_model,
  get_generator,
)


def _key(seed=0):
  # 'rbg' keys compile much faster on CPU than threefry ones (seconds per init).
  return jax.random.key(seed, impl="rbg")


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


@pytest.mark.parametrize("name", ["small", "unet", "coarse", "wide"])
@pytest.mark.parametrize("per_pixel", [True, False])
def test_output_shapes(name, per_pixel):
  # Shapes only (abstract evaluation, no compilation); 7x9 exercises odd
  # sizes through the U-Net's downsample / upsample.
  x = jax.ShapeDtypeStruct((2, 7, 9, 3), jnp.float32)
  gen = get_generator(name, per_pixel=per_pixel)
  out, _ = jax.eval_shape(gen.init_with_output, jax.random.key(0), x)
  assert out.shape == (2, 7, 9, 1 if per_pixel else 3)
  assert out.dtype == jnp.float32


def test_get_generator_types_and_unknown_name():
  assert isinstance(get_generator("small"), SmallGenerator)
  assert isinstance(get_generator("unet", per_pixel=False), UNetGenerator)
  assert get_generator("unet", width=8).width == 8
  assert isinstance(get_generator("coarse"), CoarseGenerator)
  assert isinstance(get_generator("wide"), WideGenerator)
  with pytest.raises(ValueError, match="small.*unet|unet.*small"):
    get_generator("resnet")


def test_input_normalisation_changes_output():
  x = _images((1, 6, 6, 3))
  a = SmallGenerator(features=(4,))
  b = SmallGenerator(features=(4,), input_mean=(0.5, 0.5, 0.5), input_std=(0.25, 0.25, 0.25))

  @jax.jit
  def both(key):
    params = a.init(key, x)  # same parameter structure for both
    return a.apply(params, x), b.apply(params, x)

  ya, yb = both(_key())
  assert np.all(np.isfinite(ya)) and not np.allclose(ya, yb)


@pytest.mark.parametrize(
  "name,shape",
  [
    ("small", (2, 28, 28, 1)),
    ("unet", (2, 32, 32, 3)),
    ("coarse", (2, 28, 28, 1)),
    ("wide", (2, 56, 56, 1)),
  ],
)
def test_near_uniform_at_init_and_gradients(name, shape):
  x = _images(shape, seed=1)
  gen = get_generator(name, per_pixel=True)
  cfg = make_budget_config("contextual", (0.25, 4.0), per_pixel=True)
  eps0 = 0.1
  # A non-invariant loss (sum of eps is stationary at uniform budgets, so weight it).
  w = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)

  @jax.jit
  def run(key):  # one compilation: init, budgets and gradient
    params = gen.init(key, x)
    eps_fn = lambda p: budgets(cfg, eps0, gen.apply(p, x), x.shape)
    return eps_fn(params), jax.grad(lambda p: jnp.sum(w * eps_fn(p)))(params)

  eps, grads = run(_key())
  assert eps.shape == shape
  log_eps = np.log(np.asarray(eps, np.float64))
  dev = np.max(np.abs(log_eps - np.log(eps0)))
  assert 0 < dev < 0.05, f"budgets not near-uniform at init: max |log eps - log eps0| = {dev}"
  np.testing.assert_allclose(np.mean(log_eps, axis=(1, 2, 3)), np.log(eps0), atol=1e-5)

  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert all(np.all(np.isfinite(g)) for _, g in leaves)
  assert any(np.any(g != 0) for _, g in leaves)
  # The small (not zero) head init lets the gradient reach the body, not only the head.
  body = [g for path, g in leaves if "head" not in jax.tree_util.keystr(path)]
  assert body and any(np.any(g != 0) for g in body)


def test_global_budget_module():
  x = jnp.asarray(np.random.default_rng(10).uniform(size=(3, 5, 5, 3)), jnp.float32)
  for per_pixel, pshape in ((True, (5, 5, 1)), (False, (5, 5, 3))):
    gb = GlobalBudget(per_pixel=per_pixel)
    params = gb.init(jax.random.key(0), x)
    p = params["params"]["raw_log_budgets"]
    assert p.shape == pshape
    np.testing.assert_array_equal(p, 0.0)
    raw = gb.apply(params, x)
    assert raw.shape == (3,) + pshape
    cfg = make_budget_config("global", (0.5, 2.0), per_pixel=per_pixel)
    np.testing.assert_allclose(budgets(cfg, 0.1, raw, x.shape), 0.1, rtol=1e-6)  # uniform at init
    w = jnp.asarray(np.random.default_rng(11).normal(size=x.shape), jnp.float32)
    g = jax.jit(jax.grad(lambda prm: jnp.sum(w * budgets(cfg, 0.1, gb.apply(prm, x), x.shape))))(
      params
    )
    gp = g["params"]["raw_log_budgets"]
    assert np.all(np.isfinite(gp)) and np.any(gp != 0)


def test_budget_model_of_each_mode():
  assert budget_model("uniform") is None
  assert budget_model("global", per_pixel=False) == GlobalBudget(per_pixel=False)
  assert isinstance(budget_model("contextual", "small"), SmallGenerator)


def test_wide_generator_sees_a_slot_and_the_rings_that_pooling_averages_away():
  """What a budget depends on: a pixel 18 away (a 28-pixel canvas slot's marker is up to 14 away)
  reaches the wide generator's budget, not the coarse one's; and two images that differ only in
  which of two adjacent rows is lit (a canvas frame against a decoy) look the same to the coarse
  generator, which pools pixels first, but not to the wide one."""
  x = _images((1, 56, 56, 1), seed=3)
  swapped = x.at[:, 20].set(x[:, 21]).at[:, 21].set(x[:, 20])  # rows 20, 21: one pooling block

  @jax.jit
  def probe(key):
    out = {}
    for name, gen in (
      ("coarse", CoarseGenerator(head_init_scale=1.0)),
      ("wide", WideGenerator(head_init_scale=1.0)),
    ):
      params = gen.init(key, x)
      centre = lambda z, gen=gen, params=params: gen.apply(params, z)[0, 28, 28, 0]
      far = jax.grad(centre)(x)[0, 28, 28 + 18, 0]
      out[name] = far, jnp.max(jnp.abs(gen.apply(params, x) - gen.apply(params, swapped)))
    return out

  out = probe(_key(4))
  assert out["coarse"][0] == 0 and out["wide"][0] != 0
  assert out["coarse"][1] < 1e-6 and out["wide"][1] > 1e-3  # (the coarse one: summation order)
