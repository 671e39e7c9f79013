"""Metrics relating learned perturbation budgets to ground-truth relevance masks.

A budget network that has learned "what matters" should give *small* budgets
to relevant pixels (the object) and *large* budgets elsewhere.  Two metrics
quantify this, per example:

* :func:`relevance_auroc`: AUROC of the score ``-log eps_i`` for detecting
  relevant pixels (``mask == 1``).  1.0 = every relevant pixel has a smaller
  budget than every irrelevant one, 0.5 = no relation, 0.0 = reversed.
* :func:`budget_ratio_out_in`: mean budget outside the mask divided by the
  mean budget inside it (> 1 means the budget is spent on the background).

Shape conventions (``eps`` and ``mask`` have the same leading batch axis):

* 4-D arrays are ``[N, H, W, C]``.  Metrics are computed per *pixel*: a
  multi-channel ``eps`` is reduced over channels first (geometric mean, i.e.
  the mean of ``log eps``, for the AUROC; arithmetic mean for the ratio), and
  a multi-channel mask is reduced with "any" (a pixel is relevant if any
  channel is).  ``[N, H, W]`` arrays are treated as single-channel.
* Other ranks (e.g. ``[N, D]``) are compared element-wise after flattening.

Everything is computed in float64 numpy; jax arrays are accepted.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

Array = Any


def _per_pixel(a: Array, reduce: str) -> np.ndarray:
  """Flattens ``a`` to ``[N, P]``, reducing a trailing channel axis of 4-D input."""
  a = np.asarray(a)
  if a.ndim == 4:
    if reduce == "logmean":
      with np.errstate(divide="ignore"):
        a = np.mean(np.log(a.astype(np.float64)), axis=-1)
    elif reduce == "mean":
      a = np.mean(a.astype(np.float64), axis=-1)
    elif reduce == "any":
      a = np.any(a != 0, axis=-1)
    else:
      raise ValueError(reduce)
  elif reduce == "logmean":
    with np.errstate(divide="ignore"):
      a = np.log(a.astype(np.float64))
  return a.reshape(a.shape[0], -1)


def _mask_per_pixel(mask: Array, n_pixels_eps: int) -> np.ndarray:
  m = _per_pixel(mask, "any").astype(bool)
  if m.shape[1] != n_pixels_eps:
    raise ValueError(f"mask has {m.shape[1]} pixels per example but eps has {n_pixels_eps}")
  return m


def _average_ranks(scores: np.ndarray) -> np.ndarray:
  """Row-wise 1-based ranks of ``scores [N, P]``; tied values get their average rank.

  Vectorised over rows: one lexsort over (row, value), then tie groups are the
  runs of equal (row, value) in sorted order.
  """
  n, p = scores.shape
  rows = np.repeat(np.arange(n), p)
  flat = scores.reshape(-1)
  order = np.lexsort((flat, rows))
  sorted_vals = flat[order]
  sorted_rows = rows[order]
  # New tie group wherever the row or the value changes.
  new_group = np.ones(n * p, dtype=bool)
  new_group[1:] = (sorted_rows[1:] != sorted_rows[:-1]) | (sorted_vals[1:] != sorted_vals[:-1])
  group_id = np.cumsum(new_group) - 1
  positions = np.arange(n * p)
  group_start = positions[new_group]
  group_end = np.append(group_start[1:], n * p) - 1  # inclusive
  # Rank within the row: global position minus the row's offset, 1-based.
  avg_global = 0.5 * (group_start + group_end)[group_id]
  ranks_sorted = avg_global - sorted_rows * p + 1.0
  ranks = np.empty(n * p, dtype=np.float64)
  ranks[order] = ranks_sorted
  return ranks.reshape(n, p)


def relevance_auroc(eps: Array, mask: Array) -> np.ndarray:
  """Per-example AUROC of ``-log eps`` for detecting relevant pixels.

  Args:
    eps: budgets ``[N, H, W, C]`` (or ``[N, ...]``, see module docstring),
      non-negative; zeros score ``+inf`` (most relevant).
    mask: relevance masks with the same number of pixels per example;
      nonzero = relevant (positive).

  Returns:
    ``[N]`` float64: the probability that a random relevant pixel scores
    higher (smaller budget) than a random irrelevant one, ties counting 1/2
    (the Mann-Whitney U statistic, computed exactly from average ranks).
    NaN for examples whose mask is all 0 or all 1.
  """
  scores = -_per_pixel(eps, "logmean")
  pos = _mask_per_pixel(mask, scores.shape[1])
  n_pos = pos.sum(axis=1).astype(np.float64)
  n_neg = pos.shape[1] - n_pos
  ranks = _average_ranks(scores)
  rank_sum_pos = np.sum(np.where(pos, ranks, 0.0), axis=1)
  u = rank_sum_pos - n_pos * (n_pos + 1) / 2.0
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = u / (n_pos * n_neg)
  return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _nanmean(values: np.ndarray) -> float:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", category=RuntimeWarning)
    return float(np.nanmean(values)) if values.size else float("nan")


def mean_relevance_auroc(eps: Array, mask: Array) -> float:
  """Mean of :func:`relevance_auroc` over examples, ignoring NaNs (NaN if all are)."""
  return _nanmean(relevance_auroc(eps, mask))


def budget_ratio_out_in(eps: Array, mask: Array) -> tuple[np.ndarray, float]:
  """Mean budget outside the mask / mean budget inside it.

  Multi-channel budgets are averaged over channels per pixel first.

  Returns:
    ``(per_example [N], mean)``: per-example ratios (NaN when the mask is
    all 0 or all 1, or the inside mean is 0) and their NaN-ignoring mean.
  """
  e = _per_pixel(eps, "mean").astype(np.float64)
  inside = _mask_per_pixel(mask, e.shape[1])
  n_in = inside.sum(axis=1)
  n_out = inside.shape[1] - n_in
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_in = np.sum(np.where(inside, e, 0.0), axis=1) / n_in
    mean_out = np.sum(np.where(inside, 0.0, e), axis=1) / n_out
    ratio = mean_out / mean_in
  valid = (n_in > 0) & (n_out > 0) & (mean_in > 0)
  ratio = np.where(valid, ratio, np.nan)
  return ratio, _nanmean(ratio)
