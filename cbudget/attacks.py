"""Projected gradient descent (PGD) inside a non-uniform box.

Threat model: for an input ``x`` and a per-dimension budget ``eps`` the
adversary may pick any point of ``[x - eps, x + eps] ∩ [lo, hi]`` (``domain``,
``[0, 1]`` for images).  Budgets differ per dimension, so step sizes do too:
dimension ``i`` moves by ``alpha_i = step_size_ratio * eps_i`` per signed
gradient step, which lets dimensions with larger budgets travel further and
keeps dimensions with ``eps_i = 0`` fixed.

The attack is an upper bound on the robust error (a lower bound on what a
certificate must cover): it is used to sanity-check certified bounds and to
report empirical robustness.  All loops are ``lax`` loops, so ``pgd_attack``
can be wrapped in ``jax.jit`` (with ``logits_fn``, ``steps``, ``restarts``,
``loss`` and ``domain`` static, e.g. through ``functools.partial``).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp

from cbudget.bounds import Box

Array = Any
LogitsFn = Callable[[Array], Array]

_LOSSES = ("margin", "ce")


def margins(logits: Array, y: Array) -> Array:
  """Per-example margin ``logit_y - max_{j != y} logit_j`` (negative = misclassified)."""
  num_classes = logits.shape[-1]
  onehot = jax.nn.one_hot(y, num_classes, dtype=bool)
  true_logit = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  return true_logit - other


def _attack_objective(logits: Array, y: Array, loss: str) -> Array:
  """Per-example quantity the attack *maximises*."""
  if loss == "margin":
    return -margins(logits, y)
  # Cross-entropy of the true class.
  return -jnp.take_along_axis(
    jax.nn.log_softmax(logits, axis=-1), y[:, None].astype(jnp.int32), axis=-1
  )[:, 0]


def _per_example_where(cond: Array, a: Array, b: Array) -> Array:
  """``where`` with a per-example ``[N]`` condition broadcast over ``a``'s trailing axes."""
  return jnp.where(cond.reshape(cond.shape + (1,) * (a.ndim - 1)), a, b)


def pgd_attack(
  logits_fn: LogitsFn,
  x: Array,
  y: Array,
  eps: Array,
  *,
  steps: int = 20,
  restarts: int = 1,
  step_size_ratio: float = 0.25,
  key: Array,
  domain: tuple[float, float] = (0.0, 1.0),
  loss: str = "margin",
) -> Array:
  """Signed-gradient PGD in the box ``[x - eps, x + eps] ∩ domain``.

  Args:
    logits_fn: maps a batch ``[N, ...]`` to logits ``[N, K]``; each example's
      logits must depend only on that example (e.g. BN in inference mode).
    x: clean inputs ``[N, ...]``, assumed to lie in ``domain``.
    y: integer labels ``[N]``.
    eps: non-negative budgets broadcastable to ``x.shape`` (scalar, per-pixel
      ``[N, H, W, 1]``, or per-element).
    steps: gradient steps per restart.
    restarts: independent random starts.
    step_size_ratio: per-dimension step size ``alpha_i = ratio * eps_i``.
    key: PRNG key for the random starts.
    domain: ``(low, high)`` valid input range, intersected with the box.
    loss: ``"margin"`` (ascend ``-margin``) or ``"ce"`` (ascend cross-entropy).

  Returns:
    ``x_adv`` with ``x.shape``: per example, the most violating point seen
    (lowest margin ``logit_y - max_{j != y} logit_j``) among the clean input,
    every random start and every PGD iterate of every restart.  Ties keep the
    earlier point, so ``eps = 0`` returns ``x`` exactly.
  """
  if loss not in _LOSSES:
    raise ValueError(f"Unknown loss {loss!r}; valid: {_LOSSES}")
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  eps = jnp.broadcast_to(jnp.asarray(eps, dtype=x.dtype), x.shape)
  lower, upper = Box.from_budget(x, eps, domain)
  alpha = step_size_ratio * eps

  def project(z: Array) -> Array:
    return jnp.clip(z, lower, upper)

  def objective_and_margin(z: Array) -> tuple[Array, Array]:
    logits = logits_fn(z)
    obj = _attack_objective(logits, y, loss)
    return jnp.sum(obj), margins(logits, y)

  grad_fn = jax.value_and_grad(objective_and_margin, has_aux=True)

  def keep_best(best, z, margin):
    best_x, best_m = best
    better = margin < best_m
    return _per_example_where(better, z, best_x), jnp.where(better, margin, best_m)

  def one_restart(best, restart_key):
    u = jax.random.uniform(restart_key, x.shape, dtype=x.dtype)
    z0 = project(lower + u * (upper - lower))

    def step(_, carry):
      z, best = carry
      (_, margin), g = grad_fn(z)
      best = keep_best(best, z, margin)
      z = project(z + alpha * jnp.sign(g))
      return z, best

    z, best = jax.lax.fori_loop(0, steps, step, (z0, best))
    best = keep_best(best, z, margins(logits_fn(z), y))
    return best, None

  best0 = (x, margins(logits_fn(x), y))
  (best_x, _), _ = jax.lax.scan(one_restart, best0, jax.random.split(key, restarts))
  return best_x


def pgd_error(logits_fn: LogitsFn, x: Array, y: Array, eps: Array, **kwargs: Any) -> Array:
  """Per-example bool: clean input misclassified or PGD found a misclassified point.

  ``kwargs`` are forwarded to :func:`pgd_attack` (``key`` is required).
  Misclassified means ``argmax(logits) != y``.
  """
  x_adv = pgd_attack(logits_fn, x, y, eps, **kwargs)
  clean_wrong = jnp.argmax(logits_fn(x), axis=-1) != y
  adv_wrong = jnp.argmax(logits_fn(x_adv), axis=-1) != y
  return clean_wrong | adv_wrong
