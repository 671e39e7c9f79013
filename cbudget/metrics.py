"""Metrics relating learned perturbation budgets to ground-truth relevance masks.

A budget network that has learned "what matters" should give *small* budgets
to relevant pixels (the object) and *large* budgets elsewhere.  These metrics
quantify this, per example:

* :func:`relevance_auroc`: AUROC of the score ``-log eps_i`` for detecting
  relevant pixels (``mask == 1``).  1.0 = every relevant pixel has a smaller
  budget than every irrelevant one, 0.5 = no relation, 0.0 = reversed.
* :func:`context_auroc`: the same AUROC, but comparing only pixels of equal
  intensity, so that it measures what a budget map knows beyond each pixel's
  own value (a map that is a function of intensity scores 0.5).
* :func:`budget_ratio_out_in`: mean budget outside the mask divided by the
  mean budget inside it (> 1 means the budget is spent on the background).

and one that tests a *dataset* for leaks, with no budgets involved:

* :func:`intensity_rule_auroc`: the relevance AUROC of the best budget rule
  that looks only at a pixel's own intensity (thresholds in either direction,
  and two-sided rules such as "x == 0 or x > t").  Near 0.5 means intensity
  alone does not reveal the mask, so a high relevance AUROC needs context.

Shape conventions (``eps`` and ``mask`` have the same leading batch axis):

* 4-D arrays are ``[N, H, W, C]``.  Metrics are computed per *pixel*: a
  multi-channel ``eps`` is reduced over channels first (geometric mean, i.e.
  the mean of ``log eps``, for the AUROC; arithmetic mean for the ratio), and
  a multi-channel mask is reduced with "any" (a pixel is relevant if any
  channel is).  ``[N, H, W]`` arrays are treated as single-channel.  A pixel's
  intensity is the mean of its channels.
* Other ranks (e.g. ``[N, D]``) are compared element-wise after flattening.

Everything is computed in float64 numpy; jax arrays are accepted.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

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


def _average_ranks(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
  """1-based ranks of the flat ``values`` within each group of equal ``groups`` key.

  Tied values in a group get their average rank.  Vectorised: one lexsort over
  (group, value); tie runs are the runs of equal (group, value) in sorted order.
  """
  size = values.size
  order = np.lexsort((values, groups))
  sorted_vals, sorted_groups = values[order], groups[order]
  positions = np.arange(size)
  new_group = np.ones(size, dtype=bool)
  new_group[1:] = sorted_groups[1:] != sorted_groups[:-1]
  new_tie = new_group.copy()
  new_tie[1:] |= sorted_vals[1:] != sorted_vals[:-1]
  tie_start = positions[new_tie]
  tie_end = np.append(tie_start[1:], size) - 1  # inclusive
  average_position = 0.5 * (tie_start + tie_end)[np.cumsum(new_tie) - 1]
  group_start = positions[new_group][np.cumsum(new_group) - 1]
  ranks = np.empty(size, dtype=np.float64)
  ranks[order] = average_position - group_start + 1.0
  return ranks


def _mann_whitney(
  scores: np.ndarray, positive: np.ndarray, strata: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Per-row Mann-Whitney counts of ``scores [N, P]``, positives vs negatives.

  Returns ``(u, pairs)``, both ``[N]``: ``pairs`` is the number of (positive,
  negative) pixel pairs compared, and ``u`` the number of them where the
  positive scores higher, ties counting 1/2.  With ``strata [N, P]``
  (non-negative ints) only pairs in the same stratum of the same row are
  compared: the sums run over strata.  ``u / pairs`` is the AUROC.
  """
  n, p = scores.shape
  num_strata = 1 if strata is None else int(strata.max(initial=0)) + 1
  row = np.repeat(np.arange(n), p)
  keys = row * num_strata + (0 if strata is None else strata.reshape(-1))
  pos = positive.reshape(-1).astype(np.float64)
  ranks = _average_ranks(scores.reshape(-1), keys)
  size = n * num_strata
  n_pos = np.bincount(keys, weights=pos, minlength=size)
  n_all = np.bincount(keys, minlength=size).astype(np.float64)
  rank_sum_pos = np.bincount(keys, weights=ranks * pos, minlength=size)
  u = (rank_sum_pos - n_pos * (n_pos + 1) / 2.0).reshape(n, num_strata).sum(axis=1)
  pairs = (n_pos * (n_all - n_pos)).reshape(n, num_strata).sum(axis=1)
  return u, pairs


def _auroc(u: np.ndarray, pairs: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(pairs > 0, u / pairs, np.nan)


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
  return _auroc(*_mann_whitney(scores, _mask_per_pixel(mask, scores.shape[1])))


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


# ----------------------------------------------------------------------------------------------------------
# context: what a budget map knows beyond each pixel's own intensity
# ----------------------------------------------------------------------------------------------------------

INTENSITY_LEVELS = 255  # the uint8 grid of MNIST / CIFAR-10 pixels


def intensity_levels(images: Array, num_levels: int = INTENSITY_LEVELS) -> np.ndarray:
  """Per-pixel intensity levels ``[N, P]`` (ints in ``0 .. num_levels + 1``).

  The intensity of a pixel is the mean of its channels, x in [0, 1].  Level 0
  is exactly x == 0 (the empty background of MNIST, a leak on its own); level
  ``1 + round(x * num_levels)`` holds every other x, so with the default 255
  each uint8 value has its own level, and x in (0, 0.5/255) gets level 1.
  """
  if not isinstance(num_levels, (int, np.integer)) or num_levels < 1:
    raise ValueError(f"num_levels must be a positive int, got {num_levels!r}")
  x = np.clip(_per_pixel(images, "mean").astype(np.float64), 0.0, 1.0)
  return np.where(x <= 0, 0, 1 + np.rint(x * num_levels)).astype(np.int64)


def context_auroc(eps: Array, mask: Array, images: Array, *, num_levels: int = INTENSITY_LEVELS):
  """Per-example AUROC of ``-log eps`` for relevant pixels, among pixels of equal intensity.

  Like :func:`relevance_auroc`, but a relevant pixel is compared only with the
  irrelevant pixels of the same example at the same intensity level
  (:func:`intensity_levels`): the probability that a random relevant pixel
  has a smaller budget than a random irrelevant pixel of the same image and
  intensity, ties counting 1/2, pooled over levels (each level weighted by its
  number of (relevant, irrelevant) pairs).  Any budget map that is a function
  of the pixel's intensity level alone scores exactly 0.5, so a score above
  0.5 is knowledge of context.  (A map that reads intensity finer than a
  level can still score a little above 0.5 where the data have structure
  within levels: on the old cifar_canvas, whose dimmed half sat on half-steps
  of the uint8 grid, a budget decreasing in x scored 0.59.  On the framed
  canvases it scores 0.500.)

  Args:
    eps: budgets ``[N, H, W, C]`` (or ``[N, ...]``).
    mask: relevance masks with the same number of pixels per example.
    images: the images the budgets were computed for, same number of pixels.
    num_levels: resolution of the intensity levels.

  Returns:
    ``[N]`` float64; NaN for examples where no level holds both a relevant
    and an irrelevant pixel.
  """
  scores = -_per_pixel(eps, "logmean")
  positive = _mask_per_pixel(mask, scores.shape[1])
  levels = intensity_levels(images, num_levels)
  if levels.shape != scores.shape:
    raise ValueError(
      f"images have {levels.shape[1]} pixels per example but eps has {scores.shape[1]}"
    )
  return _auroc(*_mann_whitney(scores, positive, levels))


def mean_context_auroc(
  eps: Array, mask: Array, images: Array, *, num_levels: int = INTENSITY_LEVELS
) -> float:
  """Mean of :func:`context_auroc` over examples, ignoring NaNs (NaN if all are)."""
  return _nanmean(context_auroc(eps, mask, images, num_levels=num_levels))


class IntensityRule(NamedTuple):
  """A budget rule that looks only at a pixel's own intensity level, and its mean relevance AUROC."""

  auroc: float
  description: str


def best_intensity_rule(
  images: Array, mask: Array, *, num_levels: int = INTENSITY_LEVELS
) -> IntensityRule:
  """The intensity-only budget rule with the highest mean relevance AUROC on ``(images, mask)``.

  The candidate rules, with x the pixel intensity (:func:`intensity_levels`):

  * graded: budget decreasing in x, or increasing in x (the AUROC of x or -x
    as a score);
  * binary: small budget on pixels whose level is in an interval
    ``lo <= level <= hi``, or outside one.  This covers thresholds in both
    directions (x <= t, x > t) and two-sided rules such as
    "x == 0 or x > t", and bands t0 < x <= t1.

  Each rule's AUROC is the value :func:`mean_relevance_auroc` reports for its
  budget map (one rule for the whole dataset, AUROC per example, then the
  mean).  For a binary rule that is 0.5 + (TPR - FPR) / 2 per example, a sum
  of per-level weights, so the best interval is a maximum-sum subarray over
  levels (the best complement: the total minus a minimum-sum subarray).  The
  rule is fitted to the data it is scored on; with many pixels per level the
  optimism is small (about 0.01 on a few dozen canvases, less on more).
  """
  levels = intensity_levels(images, num_levels)
  positive = _mask_per_pixel(mask, levels.shape[1])
  n_pos = positive.sum(axis=1, keepdims=True)
  n_neg = positive.shape[1] - n_pos
  valid = ((n_pos > 0) & (n_neg > 0))[:, 0]
  if not valid.any():
    return IntensityRule(float("nan"), "no example has both relevant and irrelevant pixels")
  with np.errstate(invalid="ignore", divide="ignore"):
    pixel_weight = np.where(positive, 1.0 / n_pos, -1.0 / n_neg)[valid]
  level_weight = np.bincount(
    levels[valid].reshape(-1), weights=pixel_weight.reshape(-1), minlength=num_levels + 2
  )
  inside, outside = _best_interval(level_weight), _best_interval(-level_weight)

  def binary_rule(lo: int, hi: int, flag_inside: bool) -> tuple[float, str]:
    in_interval = (levels >= lo) & (levels <= hi)
    flagged = in_interval if flag_inside else ~in_interval
    auroc = mean_relevance_auroc(np.where(flagged, 1.0, 2.0), positive)
    where = _describe_levels(lo, hi, num_levels)
    return auroc, f"small budget iff {where if flag_inside else f'not ({where})'}"

  candidates = [binary_rule(*inside, True), binary_rule(*outside, False)]
  with np.errstate(over="ignore"):
    graded = mean_relevance_auroc(np.exp(-_per_pixel(images, "mean").astype(np.float64)), positive)
  candidates += [(graded, "budget decreasing in x"), (1.0 - graded, "budget increasing in x")]
  return IntensityRule(*max(candidates, key=lambda c: c[0]))


def intensity_rule_auroc(
  images: Array, mask: Array, *, num_levels: int = INTENSITY_LEVELS
) -> float:
  """The mean relevance AUROC of the best intensity-only budget rule (:func:`best_intensity_rule`).

  A leak test for datasets with masks: near 0.5 means that no budget map that
  looks only at each pixel's own intensity can predict relevance.
  """
  return best_intensity_rule(images, mask, num_levels=num_levels).auroc


def _best_interval(weights: np.ndarray) -> tuple[int, int]:
  """(lo, hi), inclusive, of a maximum-sum non-empty run of ``weights``.

  Prefix sums: a run (lo, hi] of the prefix sums has sum S[hi] - S[lo], so the
  best run ending at hi starts after the smallest earlier prefix sum.
  """
  prefix = np.concatenate([[0.0], np.cumsum(weights)])
  smallest_before = np.minimum.accumulate(prefix[:-1])
  hi = int(np.argmax(prefix[1:] - smallest_before))
  lo = int(np.argmin(prefix[: hi + 1]))
  return lo, hi


def _describe_levels(lo: int, hi: int, num_levels: int) -> str:
  """Levels lo..hi of `intensity_levels` as a condition on x."""
  if hi == 0:
    return "x == 0"
  upper = None if hi == num_levels + 1 else f"x < {(hi - 0.5) / num_levels:.3f}"
  lower = None if lo == 0 else "x > 0" if lo == 1 else f"x >= {(lo - 1.5) / num_levels:.3f}"
  return " and ".join(c for c in (lower, upper) if c) or "any x"
