"""The largest certified box around each input: how much a trained model tolerates, per example.

:func:`largest_certified_box` answers, per example, with

* ``uniform_eps``: the largest uniform ε found by bisection such that every point of
  ``[x - ε, x + ε] ∩ domain`` is classified as ``label``, certified by ``method``;
* ``eps``: a non-uniform budget of x's shape, certified by ``method``, whose equivalent ε
  ``exp(mean log eps)`` is made as large as the search can: gradient ascent on the shape of the
  log-budgets (at a fixed scale, the certified margin of a differentiable bound, CROWN-IBP or IBP,
  is maximised, and a Newton step keeps the scale where that margin is zero), then bisection on a
  global scale with ``method`` so that the box it returns is certified;
* ``equivalent_eps`` of ``eps`` (never below ``uniform_eps``: if the search finds nothing better,
  ``eps`` is the uniform box).

Budgets are capped where the box reaches the whole domain in that coordinate (``max(x - lo, hi -
x)``): beyond it the box does not grow, and an uncapped ε would inflate the equivalent ε for
nothing. The half-widths of the box actually certified (clipped to the domain) are reported too
(``effective_eps`` / ``uniform_effective_eps``).

Bisection returns a certified ε, but the largest one only where certification is monotone in ε:
IBP's is (interval arithmetic is monotone); CROWN's need not be (its relaxations change with the
box), so there ``uniform_eps`` is a certified lower estimate of the largest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbudget.bounds import Box, alpha_crown, crown, ibp
from cbudget.objective import margin_spec

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
SURROGATES = ("ibp", "crown-ibp")


class CertifiedBoxes(NamedTuple):
  uniform_eps: jax.Array  # [N]: the largest certified uniform ε found (0: not certified at all)
  eps: jax.Array  # x's shape: a certified non-uniform budget (0 where not certified)
  equivalent_eps: jax.Array  # [N]: exp(mean log eps)
  certified: jax.Array  # [N] bool: the returned boxes, re-checked by the method
  effective_eps: jax.Array  # [N]: equivalent half-width of [x - eps, x + eps] ∩ domain
  uniform_effective_eps: jax.Array  # [N]: the same for the uniform box


def margin_bounds(fn: Callable, method: str, **options) -> Callable:
  """``bounds(params, box, spec) -> [N, S]`` lower bounds of ``spec @ fn(params, x)`` over the box.

  ``options`` go to the method (``chunk_size``, ``memory_limit`` for full CROWN and α-CROWN,
  ``iterations``, ``lr``, ``optimize_intermediate`` for α-CROWN).
  """
  if method == "ibp":
    bound = ibp(fn)
  elif method == "crown-ibp":
    bound = crown(fn, need_upper=False)
  elif method == "crown":
    bound = crown(fn, "crown", need_upper=False, **options)
  elif method == "alpha-crown":
    bound = alpha_crown(fn, need_upper=False, **options)
  else:
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
  return lambda params, box, spec: bound(params, box, spec).lower


def _per_example(v, x):
  """Broadcast a per-example ``[N]`` value against x ``[N, ...]``."""
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def largest_certified_box(
  fn: Callable,
  params,
  x,
  labels,
  *,
  method: str = "crown",
  surrogate: str | None = None,
  domain: tuple[float, float] = (0.0, 1.0),
  bisection_steps: int = 12,
  optimize_steps: int = 40,
  lr: float = 0.1,
  scale_steps: int = 10,
  method_options: dict | None = None,
) -> CertifiedBoxes:
  """The largest certified uniform and non-uniform boxes around each example (module docstring).

  ``fn(params, x)`` gives logits ``[N, K]``; ``x`` is ``[N, ...]`` within ``domain``; ``labels``
  ``[N]``. ``bisection_steps`` halvings find ``uniform_eps`` in ``[0, max reach]``;
  ``optimize_steps`` gradient steps (Adam, ``lr`` on the log-budgets) shape the box under
  ``surrogate``'s bounds (default: IBP for ``method="ibp"``, else CROWN-IBP); ``scale_steps`` halvings of the global log-scale, between the uniform
  ε and twice the surrogate's, end at a box ``method`` certifies. Each certification is one batched
  call of ``method``, so the cost is about ``bisection_steps + scale_steps + 2`` of them.
  """
  if surrogate is None:
    surrogate = "ibp" if method == "ibp" else "crown-ibp"
  if surrogate not in SURROGATES:
    raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be floating point, got {x.dtype}")
  labels = jnp.asarray(labels)
  lo, hi = domain
  if bool(jnp.any(x < lo)) or bool(jnp.any(x > hi)):
    raise ValueError(f"x must lie in the domain {domain}")
  if labels.shape != x.shape[:1]:
    raise ValueError(f"labels must have shape [N] = {x.shape[:1]}, got {labels.shape}")
  num_classes = jax.eval_shape(fn, params, x).shape[-1]
  spec = margin_spec(labels, num_classes, x.dtype)
  reach = jnp.maximum(x - lo, hi - x)  # beyond this the box covers the coordinate's whole range
  bounds = jax.jit(margin_bounds(fn, method, **(method_options or {})))

  def certified(eps):
    box = Box.from_budget(x, jnp.minimum(eps, reach), domain)
    return jnp.all(bounds(params, box, spec) > 0, axis=1)

  # 1. Uniform ε by bisection; 0 is certified iff the clean prediction is right (exact bounds).
  base = certified(jnp.zeros_like(x))
  low = jnp.zeros(x.shape[:1], x.dtype)
  high = jnp.full_like(low, jnp.max(reach))
  for _ in range(bisection_steps):
    mid = (low + high) / 2
    ok = base & certified(jnp.broadcast_to(_per_example(mid, x), x.shape))
    low, high = jnp.where(ok, mid, low), jnp.where(ok, high, mid)
  uniform_eps = low
  uniform = jnp.broadcast_to(_per_example(uniform_eps, x), x.shape)

  # 2. The shape of the log-budgets, under the differentiable surrogate.
  active = uniform_eps > 0
  log_start = jnp.log(jnp.where(active, uniform_eps, 1.0))
  shape = _optimise_shape(
    margin_bounds(fn, surrogate), params, x, spec, reach, domain, log_start, optimize_steps, lr
  )
  shaped, log_scale = shape

  # 3. Bisection on the global log-scale with the method, from the uniform box (the fallback).
  def box_eps(t):
    return jnp.minimum(jnp.exp(_per_example(t, x) + shaped), reach)

  t_low = log_start
  t_high = jnp.maximum(log_scale, log_start) + jnp.log(2.0)
  found = jnp.zeros_like(active)
  for _ in range(scale_steps):
    mid = (t_low + t_high) / 2
    ok = active & certified(box_eps(mid))
    t_low, t_high = jnp.where(ok, mid, t_low), jnp.where(ok, t_high, mid)
    found = found | ok

  # 4. Re-check what is returned; the uniform box where the search found nothing larger.
  axes = tuple(range(1, x.ndim))
  shaped_eps = box_eps(t_low)
  shaped_equivalent = jnp.exp(jnp.mean(jnp.log(shaped_eps), axis=axes))
  use_shaped = found & (shaped_equivalent >= uniform_eps) & certified(shaped_eps)
  uniform_ok = active & certified(uniform)
  uniform_eps = jnp.where(uniform_ok, uniform_eps, 0)
  uniform = jnp.broadcast_to(_per_example(uniform_eps, x), x.shape)
  eps = jnp.where(_per_example(use_shaped, x), shaped_eps, uniform)
  return CertifiedBoxes(
    uniform_eps=uniform_eps,
    eps=eps,
    equivalent_eps=jnp.where(use_shaped, shaped_equivalent, uniform_eps),
    certified=use_shaped | uniform_ok,
    effective_eps=_effective(x, eps, domain),
    uniform_effective_eps=_effective(x, uniform, domain),
  )


def _effective(x, eps, domain):
  """Equivalent half-width of ``[x - eps, x + eps] ∩ domain`` per example (0 if any is 0)."""
  lo, hi = domain
  half = (jnp.minimum(x + eps, hi) - jnp.maximum(x - eps, lo)) / 2
  axes = tuple(range(1, x.ndim))
  positive = jnp.all(half > 0, axis=axes)
  return jnp.where(positive, jnp.exp(jnp.mean(jnp.log(jnp.where(half > 0, half, 1)), axis=axes)), 0)


def _optimise_shape(bounds, params, x, spec, reach, domain, log_start, steps, lr):
  """``(shape, log_scale)``: log-budgets ``log eps = log_scale + shape`` (``shape`` of mean 0 per
  example) where the surrogate's worst margin is about 0 at ``log_scale``, with ``shape`` moved by
  Adam to raise that margin (which raises the scale the margin allows).

  The scale follows a damped Newton step on the margin (the margin falls as the box grows); the
  shape is the ascent direction at fixed volume, which by the implicit-function theorem is the
  direction that raises the certified scale.
  """
  axes = tuple(range(1, x.ndim))

  def worst_margin(log_scale, raw):
    centred = raw - jnp.mean(raw, axis=axes, keepdims=True)
    eps = jnp.minimum(jnp.exp(_per_example(log_scale, x) + centred), reach)
    margins = bounds(params, Box.from_budget(x, eps, domain), spec)
    return jnp.min(margins, axis=1)

  optimizer = optax.adam(lr)
  margin_and_grads = jax.value_and_grad(
    lambda t, r: (lambda m: (jnp.sum(m), m))(worst_margin(t, r)), argnums=(0, 1), has_aux=True
  )

  def step(carry, _):
    log_scale, raw, opt_state = carry
    (_, margin), (d_scale, d_raw) = margin_and_grads(log_scale, raw)
    updates, opt_state = optimizer.update(-d_raw, opt_state, raw)
    raw = optax.apply_updates(raw, updates)
    # Newton on the scale towards margin 0, at most a factor e^0.25 per step; where the margin
    # does not fall with the scale (no information), step by the margin's sign.
    falls = d_scale < 0
    newton = jnp.where(falls, -margin / jnp.where(falls, d_scale, -1), jnp.sign(margin))
    log_scale = log_scale + jnp.clip(newton, -0.25, 0.25)
    return (log_scale, raw, opt_state), None

  raw = jnp.zeros_like(x)
  carry = (log_start, raw, optimizer.init(raw))
  (log_scale, raw, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(carry)
  return raw - jnp.mean(raw, axis=axes, keepdims=True), log_scale


def summary(boxes: CertifiedBoxes, proposed_eps=None) -> dict:
  """Medians over the examples of a :class:`CertifiedBoxes` (what ``eval.json`` and
  ``launch.certify_box`` report), and per-example lists. ``ratio`` is ``equivalent_eps /
  uniform_eps`` over the certified examples; ``effective_ratio`` the same for the boxes clipped to
  the domain; ``proposed_eps`` (a budget of x's shape, e.g. the generator's) adds its equivalent ε.
  """
  boxes = jax.tree.map(np.asarray, boxes)
  ok = boxes.uniform_eps > 0
  ratio = np.where(ok, boxes.equivalent_eps / np.where(ok, boxes.uniform_eps, 1), np.nan)
  eff_ok = boxes.uniform_effective_eps > 0
  effective_ratio = np.where(
    eff_ok, boxes.effective_eps / np.where(eff_ok, boxes.uniform_effective_eps, 1), np.nan
  )
  median = lambda v: float(np.nanmedian(v)) if np.any(~np.isnan(v)) else None
  out = {
    "num_examples": int(len(ok)),
    "certified": int(boxes.certified.sum()),
    "median_ratio": median(ratio),
    "median_effective_ratio": median(effective_ratio),
    "median_uniform_eps": float(np.median(boxes.uniform_eps)),
    "median_equivalent_eps": float(np.median(boxes.equivalent_eps)),
    "per_example": {
      "certified": boxes.certified.tolist(),
      "uniform_eps": boxes.uniform_eps.tolist(),
      "equivalent_eps": boxes.equivalent_eps.tolist(),
      "ratio": [None if np.isnan(r) else float(r) for r in ratio],
      "effective_eps": boxes.effective_eps.tolist(),
      "uniform_effective_eps": boxes.uniform_effective_eps.tolist(),
    },
  }
  if proposed_eps is not None:
    proposed = np.broadcast_to(np.asarray(proposed_eps), boxes.eps.shape)
    equiv = np.exp(np.mean(np.log(proposed), axis=tuple(range(1, proposed.ndim))))
    out["median_proposed_equivalent_eps"] = float(np.median(equiv))
    out["per_example"]["proposed_equivalent_eps"] = equiv.tolist()
  return out
