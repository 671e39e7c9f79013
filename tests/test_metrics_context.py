"""Tests for the intensity-aware metrics: context_auroc, intensity_levels, best_intensity_rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbudget import metrics


def _toy(n: int = 4, p: int = 400, levels: int = 5, seed: int = 0):
  """Images on a few intensity levels, a random mask independent of them."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, levels, (n, p)) / (levels - 1)
  mask = rng.random((n, p)) < 0.3
  return images, mask


def _brute_force_context_auroc(eps, mask, images, num_levels):
  levels = metrics.intensity_levels(images, num_levels)
  scores = -np.log(eps)
  out = []
  for s, m, lv in zip(scores, mask.astype(bool), levels):
    wins = pairs = 0.0
    for a, b in itertools.product(np.flatnonzero(m), np.flatnonzero(~m)):
      if lv[a] == lv[b]:
        pairs += 1
        wins += 1.0 if s[a] > s[b] else 0.5 if s[a] == s[b] else 0.0
    out.append(wins / pairs if pairs else np.nan)
  return np.array(out)


# ----------------------------------------------------------------------------------------------------------
# intensity levels
# ----------------------------------------------------------------------------------------------------------


def test_intensity_levels():
  x = np.array([[0.0, 1e-6, 1 / 255, 0.5, 1.0]], np.float32)
  np.testing.assert_array_equal(metrics.intensity_levels(x), [[0, 1, 2, 129, 256]])
  # Channels are averaged: a pixel is exactly 0 only when every channel is.
  rgb = np.zeros((1, 1, 2, 3), np.float32)
  rgb[0, 0, 1] = [0.0, 0.0, 3 / 255]
  np.testing.assert_array_equal(metrics.intensity_levels(rgb), [[0, 2]])
  np.testing.assert_array_equal(metrics.intensity_levels(x, num_levels=2), [[0, 1, 1, 2, 3]])
  with pytest.raises(ValueError, match="num_levels must be a positive int"):
    metrics.intensity_levels(x, num_levels=0)


# ----------------------------------------------------------------------------------------------------------
# context_auroc
# ----------------------------------------------------------------------------------------------------------


def test_context_auroc_perfect_inverted_random():
  images, mask = _toy()
  perfect = np.where(mask, 0.1, 1.0)
  np.testing.assert_array_equal(metrics.context_auroc(perfect, mask, images), 1.0)
  np.testing.assert_array_equal(metrics.context_auroc(1 / perfect, mask, images), 0.0)
  rng = np.random.default_rng(1)
  random = rng.uniform(0.1, 1.0, (40, 400))
  images, mask = _toy(n=40)
  assert abs(metrics.mean_context_auroc(random, mask, images) - 0.5) < 0.02


def test_context_auroc_is_half_for_any_function_of_intensity():
  """A leaky dataset: relevant pixels are the dark ones. A map that reads intensity scores well on
  relevance_auroc and exactly 0.5 on context_auroc; a map that knows the mask still scores 1."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 4, (6, 300)) / 3
  mask = (images == 0) | ((images < 0.5) & (rng.random(images.shape) < 0.3))
  by_intensity = np.exp(images) + 0.3 * images**2  # any function of the level
  assert metrics.mean_relevance_auroc(by_intensity, mask) > 0.8
  np.testing.assert_allclose(metrics.context_auroc(by_intensity, mask, images), 0.5)
  np.testing.assert_array_equal(metrics.context_auroc(np.where(mask, 1, 2), mask, images), 1.0)


def test_context_auroc_with_one_level_is_relevance_auroc():
  rng = np.random.default_rng(3)
  eps, mask = rng.uniform(0.1, 1, (5, 6, 6, 1)), rng.random((5, 6, 6, 1)) < 0.4
  same = np.full((5, 6, 6, 3), 0.7, np.float32)
  np.testing.assert_allclose(
    metrics.context_auroc(eps, mask, same), metrics.relevance_auroc(eps, mask)
  )


def test_context_auroc_nan_without_comparable_pairs_and_shape_errors():
  images = np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
  mask = np.array(
    [[1, 1, 0, 0], [1, 0, 0, 1]]
  )  # row 0: relevant and irrelevant never share a level
  out = metrics.context_auroc(np.ones((2, 4)), mask, images)
  assert np.isnan(out[0]) and out[1] == 0.5
  assert metrics.mean_context_auroc(np.ones((2, 4)), mask, images) == 0.5
  with pytest.raises(ValueError, match="images have 3 pixels per example but eps has 4"):
    metrics.context_auroc(np.ones((2, 4)), mask, images[:, :3])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 3), st.integers(2, 12))
def test_context_auroc_matches_brute_force(seed, n, p):
  rng = np.random.default_rng(seed)
  eps = rng.choice([0.1, 0.5, 1.0, 2.0], (n, p))  # ties on purpose
  mask = rng.random((n, p)) < 0.5
  images = rng.choice([0.0, 0.3, 1.0], (n, p))
  np.testing.assert_allclose(
    metrics.context_auroc(eps, mask, images, num_levels=4),
    _brute_force_context_auroc(eps, mask, images, 4),
  )


# ----------------------------------------------------------------------------------------------------------
# best intensity rule
# ----------------------------------------------------------------------------------------------------------


def _brute_force_best_rule(images, mask, num_levels):
  """Every interval of levels and its complement, scored by mean_relevance_auroc, and the graded maps."""
  levels = metrics.intensity_levels(images, num_levels)
  best = []
  for lo in range(num_levels + 2):
    for hi in range(lo, num_levels + 2):
      inside = (levels >= lo) & (levels <= hi)
      for flagged in (inside, ~inside):
        best.append(metrics.mean_relevance_auroc(np.where(flagged, 1.0, 2.0), mask))
  graded = metrics.mean_relevance_auroc(np.exp(-images), mask)
  return max(best + [graded, 1 - graded])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31))
def test_best_intensity_rule_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  images = rng.choice([0.0, 0.1, 0.35, 0.6, 0.8, 1.0], (3, 30))
  mask = rng.random((3, 30)) < rng.uniform(0.1, 0.9)
  mask |= (images == 0) & (rng.random((3, 30)) < 0.5)  # some structure to find
  rule = metrics.best_intensity_rule(images, mask, num_levels=5)
  assert rule.auroc == pytest.approx(_brute_force_best_rule(images, mask, 5), abs=1e-12)


@pytest.mark.parametrize(
  "relevant, description",
  [
    (lambda x: x > 0.5, "small budget iff x >= 0.500"),
    (lambda x: x < 0.3, "small budget iff x < 0.300"),
    (lambda x: (x == 0) | (x > 0.6), "small budget iff not (x > 0 and x < 0.602)"),
    (lambda x: (x > 0.2) & (x <= 0.4), "small budget iff x >= 0.202 and x < 0.402"),
  ],
)
def test_best_intensity_rule_finds_threshold_and_two_sided_rules(relevant, description):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 500)) / 255
  images[:, :50] = 0.0
  rule = metrics.best_intensity_rule(images, relevant(images))
  assert rule.auroc == 1.0 and rule.description == description
  assert metrics.intensity_rule_auroc(images, relevant(images)) == 1.0


def test_intensity_rule_auroc_without_a_leak_and_degenerate_masks():
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (50, 32, 32, 3)).astype(np.float32)
  mask = np.zeros((50, 32, 32, 1), bool)
  mask[:, :, :16] = True  # a fixed half, independent of the values
  assert abs(metrics.intensity_rule_auroc(images, mask) - 0.5) < 0.02
  all_relevant = np.ones((2, 4, 4, 1))
  assert np.isnan(metrics.intensity_rule_auroc(images[:2, :4, :4], all_relevant))
