"""The certified objective: margin specs, bound methods, the robust cross-entropy and the mix of
clean and robust loss that training minimises.

Pure functions of logits, bounds and labels; :class:`cbudget.model.CertifiedModel` composes them with
the budgets and the box. Gradients reach the classifier (through the bounds and the clean logits) and
the budget model (through ε: the bounds are differentiable w.r.t. the box).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cbudget.bounds import (
  Box,
  alpha_crown,
  crown,
  crown_ibp,
  crown_ibp_head,
  ibp,
  in_example_blocks,
)

EVAL_METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
DEFAULT_EVAL_METHODS = EVAL_METHODS[:3]  # α-CROWN is slow: evaluation runs it only when asked


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
  block_size: int | None = None,
):
  """Lower bounds ``[N, S]`` of ``spec @ logits_fn(variables, x)`` over ``box``.

  ``crown-ibp`` mixes ``beta * CROWN-IBP + (1 - beta) * IBP`` (Zhang et al. 2020): any convex
  combination of two lower bounds is a lower bound. ``crown_chunk_size`` or
  ``crown_memory_limit`` (bytes) cap the work of one backward pass of full CROWN and α-CROWN
  (memory). ``block_size`` bounds CROWN-IBP on blocks of that many examples
  (:func:`cbudget.bounds.in_example_blocks`: the same bounds, faster on a CPU); IBP's forward pass
  gained nothing from blocks, and full CROWN and α-CROWN size their passes with the two options
  above instead.
  """
  if method == "ibp":
    return ibp(logits_fn)(variables, box, spec).lower
  if method == "crown-ibp":
    bound = in_example_blocks(crown_ibp(logits_fn, need_upper=False), block_size)
    both = bound(variables, box, spec)  # one IBP forward pass
    return beta * both.crown.lower + (1 - beta) * both.ibp.lower
  if method in ("crown", "alpha-crown"):
    memory = dict(chunk_size=crown_chunk_size, memory_limit=crown_memory_limit, need_upper=False)
    if method == "crown":
      return crown(logits_fn, "crown", **memory)(variables, box, spec).lower
    return alpha_crown(logits_fn, **memory)(variables, box, spec).lower
  raise ValueError(f"unknown bound method {method!r}; choose one of {EVAL_METHODS}")


class Losses(NamedTuple):
  loss: jax.Array  # what training minimises: kappa * clean + (1 - kappa) * robust
  clean: jax.Array  # cross-entropy of the clean logits
  robust: jax.Array  # robust cross-entropy over the box (an upper bound of the worst case)


def clean_cross_entropy(clean_logits, labels):
  """Mean cross-entropy of the clean logits."""
  return optax.softmax_cross_entropy_with_integer_labels(clean_logits, labels).mean()


def certified_loss(clean_logits, margin_lower, labels, kappa) -> Losses:
  """``kappa * clean + (1 - kappa) * robust`` cross-entropy (``kappa`` from a schedule, 1 -> end)."""
  num_classes = clean_logits.shape[-1]
  clean = clean_cross_entropy(clean_logits, labels)
  robust = robust_cross_entropy(margin_lower, labels, num_classes)
  return Losses(kappa * clean + (1 - kappa) * robust, clean, robust)


def _exp_shift(margins_lower):
  """``s = max(0, max_j -lower(m_j))`` ``[N, 1]``: the interval upper bound of every ``exp`` input
  ``-m_j``, subtracted so that ``exp`` never overflows however large the margins' bounds (an
  overflow would make the bound ``inf`` and its gradient NaN). Held constant under ``jax.grad``."""
  shift = jnp.max(-margins_lower, axis=1, keepdims=True)
  return jax.lax.stop_gradient(jnp.maximum(jnp.nan_to_num(shift), 0))


def negative_exp_sum_of_margins(margins, margins_box: Box):
  """``-(e^{-s} + sum_j e^{-m_j - s})`` ``[N, 1]`` with ``s`` from :func:`_exp_shift`: minus the
  softmax's normaliser relative to the true class, ``e^{CE - s}``, for the margins
  ``m_j = z_y - z_j`` ``[N, K-1]``, written to be bounded over ``margins_box``.

  Negated because :func:`cbudget.bounds.crown_ibp_head` with ``need_upper=False`` bounds from
  below. The relaxations commute with the shift (the chord and tangent of ``e^{z - s}`` are
  ``e^{-s}`` times those of ``e^z``), so it changes the rounding only.
  """
  shift = _exp_shift(margins_box.lower)
  return -(jnp.exp(-shift) + jnp.sum(jnp.exp(-margins - shift), axis=1, keepdims=True))


def negative_cross_entropy_of_margins(margins, margins_box: Box):
  """``-log(1 + sum_j exp(-m_j))`` ``[N, 1]``, the cross-entropy's negative as a function of the
  margins, in the overflow-free form ``-(s + log(-negative_exp_sum_of_margins))``.

  Bounding it whole relaxes ``log`` by a tangent (at the middle of its input's interval, as
  auto_LiRPA's loss fusion does); :func:`fused_bounds` instead applies ``log`` after bounding its
  input, which is tighter. Kept as the tangent form for comparison (``bench.loss_fusion``) and as
  a head through both ``exp`` and ``log`` rules.
  """
  shift = _exp_shift(margins_box.lower)
  return -(shift + jnp.log(-negative_exp_sum_of_margins(margins, margins_box)))


class FusedBounds(NamedTuple):
  """Loss fusion's bounds (:func:`fused_bounds`)."""

  margins: Box  # [N, K-1]: IBP bounds of the margins z_y - z_j, the spec folded into the last layer
  cross_entropy: jax.Array  # [N]: upper bounds of the cross-entropy over the box


def fused_bounds(
  logits_fn: Callable, variables, box: Box, labels, num_classes: int, block_size: int | None = None
) -> FusedBounds:
  """Loss fusion (Xu et al. 2020): a CROWN-IBP upper bound of the cross-entropy itself, one backward
  row per example instead of one per margin.

  The cross-entropy is ``s + log(E)`` with ``E = e^{-s} + sum_j e^{-m_j - s}``
  (:func:`negative_exp_sum_of_margins`). :func:`cbudget.bounds.crown_ibp_head` bounds ``E`` from
  above through the engine's ``exp`` relaxation (chords) and one CROWN backward pass; ``log`` is
  increasing, so ``s + log(upper(E))`` bounds the cross-entropy, and more tightly than relaxing
  ``log`` by a tangent at any point ``d`` (``log U <= log d + (U - d)/d``, concavity), which is what
  bounding the whole cross-entropy (auto_LiRPA's loss fusion) does. ``upper(E)`` is also capped by
  ``E``'s interval upper bound: that cap is the IBP margins' robust cross-entropy, so the fused
  bound is never looser than IBP's, per example.

  The margins' intervals come from IBP with the spec folded into the last layer (far tighter than
  differencing the logits' intervals, as auto_LiRPA does for loss fusion); one interval pass serves
  both. ``block_size``: as in :func:`margin_lower_bounds`.
  """
  spec = margin_spec(labels, num_classes, box.dtype)
  head = crown_ibp_head(logits_fn, negative_exp_sum_of_margins, need_upper=False)
  bounds = in_example_blocks(head, block_size)(variables, box, spec)
  # E <= min(CROWN-IBP's upper bound, IBP's), and E >= IBP's lower bound > 0; both caps are sound.
  upper = -jnp.maximum(bounds.crown.lower, bounds.ibp.lower)[:, 0]
  upper = jnp.maximum(upper, -bounds.ibp.upper[:, 0])
  upper = jnp.maximum(upper, jnp.finfo(upper.dtype).tiny)  # E > 0: log stays finite
  shift = _exp_shift(bounds.spec.lower)[:, 0]
  return FusedBounds(bounds.spec, shift + jnp.log(upper))


def fused_robust_cross_entropy(logits_fn: Callable, variables, box: Box, labels, num_classes: int):
  """Per-example upper bounds ``[N]`` of the cross-entropy over ``box`` (:func:`fused_bounds`)."""
  return fused_bounds(logits_fn, variables, box, labels, num_classes).cross_entropy


def fused_certified_loss(
  logits_fn: Callable,
  variables,
  box: Box,
  clean_logits,
  labels,
  kappa,
  beta=1.0,
  block_size: int | None = None,
) -> tuple[Losses, jax.Array]:
  """CROWN-IBP training's loss with loss fusion, and sound margin lower bounds ``[N, K-1]``.

  robust = ``beta * mean(fused bound) + (1 - beta) * robust CE of the IBP margins``: a convex
  combination of two upper bounds of the worst-case cross-entropy, so again one; at ``beta = 0``
  it equals the margin form's IBP loss. The margin bounds (for metrics) are the IBP margins, raised
  where the fused bound ``U`` certifies more: ``exp(z_j - z_y) <= expm1(U)`` for every ``j != y``,
  so the margin is at least ``-log(expm1(U))``.
  """
  num_classes = clean_logits.shape[-1]
  bounds = fused_bounds(logits_fn, variables, box, labels, num_classes, block_size)
  ibp_lower, fused = bounds.margins.lower, bounds.cross_entropy
  robust = beta * fused.mean() + (1 - beta) * robust_cross_entropy(ibp_lower, labels, num_classes)
  clean = clean_cross_entropy(clean_logits, labels)
  from_fused = -jnp.log(jnp.expm1(jax.lax.stop_gradient(fused)))
  margin_lower = jnp.maximum(ibp_lower, from_fused[:, None])
  return Losses(kappa * clean + (1 - kappa) * robust, clean, robust), margin_lower
