"""Tests for cbudget.attacks (PGD in a non-uniform box)."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cbudget import attacks

H, W, C = 4, 4, 2
D = H * W * C


def _linear(seed, num_classes=2):
  """Returns (logits_fn, W, b) for logits = flatten(x) @ W + b."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(k1, (D, num_classes))
  b = 0.1 * jax.random.normal(k2, (num_classes,))
  return (lambda x: x.reshape(x.shape[0], -1) @ w + b), w, b


@functools.partial(jax.jit, static_argnames=("steps", "restarts", "loss"))
def _attack_linear(w, b, x, y, eps, key, *, steps=20, restarts=1, loss="margin"):
  """Jitted PGD on logits = flatten(x) @ w + b (compiled once per shape)."""
  fn = lambda z: z.reshape(z.shape[0], -1) @ w + b
  return attacks.pgd_attack(fn, x, y, eps, steps=steps, restarts=restarts, key=key, loss=loss)


def _data(seed, n=5):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.uniform(k1, (n, H, W, C))
  # Non-uniform budgets: per pixel, with some exact zeros and some large ones.
  eps = jax.random.uniform(k2, (n, H, W, 1), maxval=0.4)
  eps = jnp.where(jax.random.bernoulli(k3, 0.2, eps.shape), 0.0, eps)
  return x, eps


def _exact_min_margin_2class(w, b, x, y, eps):
  """Exact min over [x-eps, x+eps] ∩ [0,1] of the margin of a 2-class linear model."""
  sign = jnp.where(y == 0, 1.0, -1.0)[:, None]
  d = sign * (w[:, 0] - w[:, 1])[None, :]  # margin = d·x + c
  c = sign[:, 0] * (b[0] - b[1])
  eps = jnp.broadcast_to(eps, x.shape)
  lo = jnp.maximum(x - eps, 0.0).reshape(x.shape[0], -1)
  hi = jnp.minimum(x + eps, 1.0).reshape(x.shape[0], -1)
  x_star = jnp.where(d > 0, lo, hi)
  return jnp.sum(d * x_star, axis=1) + c, x_star


@pytest.mark.parametrize("loss", ["margin", "ce"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_model_finds_analytic_worst_case(seed, loss):
  logits_fn, w, b = _linear(seed)
  x, eps = _data(seed + 10)
  y = jnp.array([0, 1, 0, 1, 1])
  x_adv = _attack_linear(w, b, x, y, eps, jax.random.key(seed), steps=20, loss=loss)
  exact, x_star = _exact_min_margin_2class(w, b, x, y, eps)
  got = attacks.margins(logits_fn(x_adv), y)
  np.testing.assert_allclose(got, exact, atol=1e-4)
  # The worst case is unique where w differs; the attack lands on it.
  np.testing.assert_allclose(x_adv.reshape(5, -1), x_star, atol=1e-5)


def test_margin_definition():
  logits = jnp.array([[1.0, 3.0, 2.0], [5.0, 1.0, 4.5]])
  np.testing.assert_allclose(attacks.margins(logits, jnp.array([1, 0])), [1.0, 0.5])
  np.testing.assert_allclose(attacks.margins(logits, jnp.array([0, 2])), [-2.0, -0.5])


EPS_SHAPES = [(), (1,), (5, H, W, 1), (5, H, W, C), (H, W, C), (5, 1, 1, 1)]


@settings(max_examples=25, deadline=None)
@given(
  shape=st.sampled_from(EPS_SHAPES),
  seed=st.integers(0, 2**16),
  scale=st.floats(0.0, 1.5),
  restarts=st.integers(1, 2),
)
def test_adversarial_points_stay_in_box_and_domain(shape, seed, scale, restarts):
  _, w, b = _linear(seed % 7, num_classes=3)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(size=(5, H, W, C)), jnp.float32)
  eps = jnp.asarray(scale * rng.uniform(size=shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=5))
  x_adv = _attack_linear(w, b, x, y, eps, jax.random.key(seed), steps=5, restarts=restarts)
  assert x_adv.shape == x.shape
  e = jnp.broadcast_to(eps, x.shape)
  assert bool(jnp.all(x_adv >= jnp.maximum(x - e, 0.0)))
  assert bool(jnp.all(x_adv <= jnp.minimum(x + e, 1.0)))


@settings(max_examples=10, deadline=None)
@given(
  eps=hnp.arrays(
    np.float32,
    (3, H, W, C),
    elements=st.floats(0.0, 0.5, width=32),
  ),
  seed=st.integers(0, 100),
)
def test_in_box_hypothesis_per_element_eps(eps, seed):
  _, w, b = _linear(seed, num_classes=2)
  x = jax.random.uniform(jax.random.key(seed), (3, H, W, C))
  y = jnp.array([0, 1, 1])
  x_adv = _attack_linear(w, b, x, y, eps, jax.random.key(1), steps=4)
  # Same float arithmetic as the box definition (x ± eps), no tolerance.
  assert bool(jnp.all((x_adv >= x - eps) & (x_adv <= x + eps)))
  assert bool(jnp.all((x_adv >= 0.0) & (x_adv <= 1.0)))
  # Up to rounding, the displacement is bounded by the budget.
  assert bool(jnp.all(jnp.abs(x_adv - x) <= eps + 1e-6))


def test_zero_width_eps_returns_x():
  logits_fn, _, _ = _linear(0)
  x, _ = _data(3)
  y = jnp.array([0, 1, 0, 1, 1])
  x_adv = attacks.pgd_attack(logits_fn, x, y, 0.0, steps=5, restarts=2, key=jax.random.key(0))
  np.testing.assert_array_equal(x_adv, x)


def test_zero_budget_dimensions_never_move():
  logits_fn, _, _ = _linear(4, num_classes=3)
  x, eps = _data(5)
  eps = eps.at[:, :2].set(0.0)  # Zero budget in the top two rows.
  y = jnp.array([0, 1, 2, 1, 0])
  x_adv = attacks.pgd_attack(logits_fn, x, y, eps, steps=10, restarts=3, key=jax.random.key(0))
  zero = jnp.broadcast_to(eps == 0, x.shape)
  np.testing.assert_array_equal(x_adv[zero], x[zero])
  assert bool(jnp.any(x_adv[~zero] != x[~zero]))


def test_larger_budget_dimensions_move_more():
  """Per-dimension steps alpha_i = ratio·eps_i: every dimension reaches its own corner."""
  logits_fn, _, _ = _linear(6)
  x = jnp.full((1, H, W, C), 0.5)
  eps = jnp.linspace(0.01, 0.3, D).reshape(1, H, W, C)
  y = jnp.array([0])
  # For a linear model the worst case is the box corner, reached within
  # 2 / ratio = 8 steps in every dimension because alpha_i scales with eps_i.
  x_adv = attacks.pgd_attack(logits_fn, x, y, eps, steps=8, key=jax.random.key(0))
  np.testing.assert_allclose(jnp.abs(x_adv - x), eps, atol=1e-6)


def test_jit_compatible_and_deterministic():
  logits_fn, _, _ = _linear(0, num_classes=3)
  x, eps = _data(1)
  y = jnp.array([0, 1, 2, 0, 1])
  attack = jax.jit(functools.partial(attacks.pgd_attack, logits_fn, steps=6, restarts=2))
  a = attack(x, y, eps, key=jax.random.key(3))
  b = attacks.pgd_attack(logits_fn, x, y, eps, steps=6, restarts=2, key=jax.random.key(3))
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_best_iterate_never_worse_than_clean():
  """On a small nonlinear net the returned margin is ≤ the clean margin."""
  k1, k2 = jax.random.split(jax.random.key(0))
  w1 = jax.random.normal(k1, (D, 32)) / np.sqrt(D)
  w2 = jax.random.normal(k2, (32, 4)) / np.sqrt(32)
  logits_fn = lambda x: jax.nn.relu(x.reshape(x.shape[0], -1) @ w1) @ w2
  x, eps = _data(2, n=5)
  y = jnp.array([0, 1, 2, 3, 0])
  clean = attacks.margins(logits_fn(x), y)
  m = lambda r: attacks.margins(
    logits_fn(
      attacks.pgd_attack(logits_fn, x, y, eps, steps=10, restarts=r, key=jax.random.key(0))
    ),
    y,
  )
  m1, m3 = m(1), m(3)
  assert bool(jnp.all(m1 <= clean + 1e-6))
  assert bool(jnp.all(m3 <= clean + 1e-6))
  assert bool(jnp.any(m1 < clean - 1e-3))


def test_pgd_error():
  logits_fn, w, b = _linear(0)
  x, eps = _data(7)
  y = jnp.array([0, 1, 0, 1, 1])
  err = attacks.pgd_error(logits_fn, x, y, eps, steps=20, key=jax.random.key(0))
  exact, _ = _exact_min_margin_2class(w, b, x, y, eps)
  assert err.dtype == jnp.bool_ and err.shape == (5,)
  np.testing.assert_array_equal(err, exact < 0)
  # Zero budget: error == clean misclassification.
  err0 = attacks.pgd_error(logits_fn, x, y, 0.0, key=jax.random.key(0))
  np.testing.assert_array_equal(err0, jnp.argmax(logits_fn(x), -1) != y)


def test_unknown_loss_raises():
  logits_fn, _, _ = _linear(0)
  x, eps = _data(0)
  with pytest.raises(ValueError):
    attacks.pgd_attack(logits_fn, x, jnp.zeros(5, int), eps, key=jax.random.key(0), loss="l2")
