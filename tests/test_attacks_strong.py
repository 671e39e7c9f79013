"""The stronger evaluation attack: APGD's step-size schedule, the worst case over attacks and
losses, and the guarantee that it finds every error PGD-20 finds with the same seed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbudget import attacks
from tests.test_attacks import _data, _exact_min_margin_2class, _linear


def _mlp(seed, d, hidden=32, k=4):
  k1, k2 = jax.random.split(jax.random.key(seed))
  w1 = jax.random.normal(k1, (d, hidden)) * 3 / np.sqrt(d)
  w2 = jax.random.normal(k2, (hidden, k)) / np.sqrt(hidden)
  return lambda x: jax.nn.relu(x.reshape(x.shape[0], -1) @ w1) @ w2


def test_apgd_checkpoints_are_apgds():
  points = attacks._apgd_checkpoints(100)
  assert points[:4] == [22, 41, 57, 70] and points == sorted(points) and points[-1] < 100


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_apgd_finds_the_analytic_worst_case_of_a_linear_model(loss):
  logits_fn, w, b = _linear(3)
  x, eps = _data(13)
  y = jnp.array([0, 1, 0, 1, 1])
  attack = jax.jit(
    lambda x, eps: attacks.apgd_attack(
      logits_fn, x, y, eps, steps=20, key=jax.random.key(0), loss=loss
    )
  )
  x_adv = attack(x, eps)
  exact, _ = _exact_min_margin_2class(w, b, x, y, eps)
  np.testing.assert_allclose(attacks.margins(logits_fn(x_adv), y), exact, atol=1e-4)
  lower, upper = jnp.maximum(x - eps, 0), jnp.minimum(x + eps, 1)
  assert np.all(x_adv >= lower) and np.all(x_adv <= upper)


@pytest.mark.parametrize("seed", [0, 1])
def test_strong_attack_finds_at_least_what_pgd20_finds(seed):
  """Per example, with the same seed: every error of PGD-20 is an error of the strong attack
  (and on this net, with budgets big enough to break some but not all examples, it finds more or
  as many)."""
  x, eps = _data(seed, n=64)
  logits_fn = _mlp(seed, x[0].size)
  y = jnp.argmax(logits_fn(x), -1)  # all clean-correct: only the attacks make errors
  key = jax.random.key(seed)
  pgd = jax.jit(lambda e: attacks.pgd_error(logits_fn, x, y, e, steps=20, key=key))
  strong = jax.jit(lambda e: attacks.strong_attack_error(logits_fn, x, y, e, steps=20, key=key))
  for scale in (0.05, 0.2):
    weak, worst = np.asarray(pgd(eps * scale)), np.asarray(strong(eps * scale))
    assert np.all(worst[weak]), "an example PGD-20 breaks must be broken by the strong attack"
    assert worst.sum() >= weak.sum()
