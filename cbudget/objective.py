"""The certified objective: budgets -> box -> margin bounds -> robust cross-entropy.

This is the function training differentiates. Gradients reach the classifier (through the bounds
and the clean logits) and the budget model (through ε: the bounds are differentiable w.r.t. the box).
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from cbudget import budgets as budgets_lib
from cbudget.bounds import Box, crown, ibp

TRAIN_METHODS = ("ibp", "crown-ibp")
EVAL_METHODS = ("ibp", "crown-ibp", "crown")


def margin_spec(labels, num_classes: int, dtype=jnp.float32):
  """Spec rows ``e_y - e_j`` for every ``j != y``: shape ``[N, K-1, K]``.

  A lower bound > 0 on every row certifies that the logit of ``y`` beats all others.
  """
  eye = jnp.eye(num_classes, dtype=dtype)
  rows = eye[labels][:, None, :] - eye[None, :, :]  # [N, K, K], row y is zero
  others = jnp.argsort(jnp.arange(num_classes)[None, :] == labels[:, None], axis=1, stable=True)[
    :, : num_classes - 1
  ]  # the K-1 indices j != y
  return jnp.take_along_axis(rows, others[:, :, None], axis=1)


def robust_cross_entropy(margin_lower, labels, num_classes: int):
  """Cross-entropy of the worst-case logits ``z_j = -lower(logit_y - logit_j)``, ``z_y = 0``.

  ``margin_lower`` is ``[N, K-1]`` in the order of :func:`margin_spec`. This upper-bounds the
  cross-entropy at every point of the box (Wong & Kolter 2018; Gowal et al. 2018).
  """
  worst = jnp.concatenate([jnp.zeros_like(margin_lower[:, :1]), -margin_lower], axis=1)
  # Column 0 holds the true class; the cross-entropy of class 0 is what we want.
  return optax.softmax_cross_entropy_with_integer_labels(worst, jnp.zeros_like(labels)).mean()


def margin_lower_bounds(
  logits_fn: Callable,
  variables,
  box: Box,
  spec,
  method: str,
  beta=1.0,
  crown_chunk_size: int | None = None,
  crown_memory_limit: int | None = None,
):
  """Lower bounds ``[N, S]`` of ``spec @ logits_fn(variables, x)`` over ``box``.

  ``crown-ibp`` mixes ``beta * CROWN-IBP + (1 - beta) * IBP`` (Zhang et al. 2020): any convex
  combination of two lower bounds is a lower bound. ``crown_chunk_size`` or
  ``crown_memory_limit`` (bytes) cap the work of one backward pass of full CROWN (memory).
  """
  if method == "ibp":
    return ibp(logits_fn)(variables, box, spec).lower
  if method == "crown-ibp":
    lb_ibp = ibp(logits_fn)(variables, box, spec).lower
    lb_crown = crown(logits_fn, need_upper=False)(variables, box, spec).lower
    return beta * lb_crown + (1 - beta) * lb_ibp
  if method == "crown":
    return crown(
      logits_fn,
      "crown",
      chunk_size=crown_chunk_size,
      memory_limit=crown_memory_limit,
      need_upper=False,
    )(variables, box, spec).lower
  raise ValueError(f"unknown bound method {method!r}; choose one of {EVAL_METHODS}")


class ObjectiveOutput(NamedTuple):
  robust_loss: jax.Array
  clean_logits: jax.Array
  margin_lower: jax.Array  # [N, K-1]
  eps: jax.Array  # the budgets, x's shape
  new_batch_stats: Any  # BatchNorm running statistics after this batch (or None)


def certified_objective(
  classifier,
  budget_model,
  params,
  batch_stats,
  x,
  labels,
  *,
  config: budgets_lib.BudgetConfig,
  eps0,
  method: str = "ibp",
  beta=1.0,
  num_classes: int,
  train: bool = True,
) -> ObjectiveOutput:
  """Budgets for ``x``, the box they span, and the robust cross-entropy over it.

  ``classifier`` is a Flax module called as ``classifier(x, train=...)``; ``budget_model`` maps
  ``x`` to raw log-budgets (``None`` in ``uniform`` mode). ``params = {"classifier": ...,
  "budget": ...}``. With BatchNorm (``batch_stats`` not None) and ``train=True``, the clean pass uses
  the current batch's statistics, and the bounds use those same statistics, frozen as constants of
  the affine map, as in Shi et al. (2021); with ``train=False`` both use the running statistics.
  """
  has_bn = batch_stats is not None
  cls_vars = {"params": params["classifier"]}
  if has_bn and train:
    # A clone with momentum 0 returns the batch statistics themselves as its "running" averages.
    batch_model = classifier.clone(bn_momentum=0.0)
    clean_logits, batch_vars = batch_model.apply(
      {**cls_vars, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    stats_for_bounds = batch_vars["batch_stats"]
    momentum = classifier.bn_momentum
    new_batch_stats = jax.tree.map(
      lambda old, cur: momentum * old + (1 - momentum) * cur,
      batch_stats,
      jax.lax.stop_gradient(stats_for_bounds),
    )
  else:
    stats_for_bounds = batch_stats
    clean_logits = classifier.apply(
      {**cls_vars, **({"batch_stats": batch_stats} if has_bn else {})}, x, train=False
    )
    new_batch_stats = batch_stats

  raw = None if budget_model is None else budget_model.apply({"params": params["budget"]}, x)
  eps = budgets_lib.budgets(config, eps0, raw, x.shape)
  box = Box.from_budget(x, eps)
  bound_vars = {**cls_vars, **({"batch_stats": stats_for_bounds} if has_bn else {})}
  logits_fn = lambda v, z: classifier.apply(v, z, train=False)
  spec = margin_spec(labels, num_classes, x.dtype)
  lower = margin_lower_bounds(logits_fn, bound_vars, box, spec, method, beta)
  return ObjectiveOutput(
    robust_cross_entropy(lower, labels, num_classes), clean_logits, lower, eps, new_batch_stats
  )
