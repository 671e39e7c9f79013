"""Tests for cbudget.metrics on hand-made budget maps with known answers."""

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cbudget import metrics


def _square_mask(n=2, h=6, w=6):
  mask = np.zeros((n, h, w, 1))
  mask[:, 2:4, 1:5] = 1.0
  return mask


def _brute_force_auroc(eps, mask):
  """Pairwise count: P(score_pos > score_neg) + 0.5 P(tie), score = -log eps."""
  out = []
  for e, m in zip(eps.reshape(len(eps), -1), mask.reshape(len(mask), -1)):
    with np.errstate(divide="ignore"):
      s = -np.log(e.astype(np.float64))
    pos, neg = s[m != 0], s[m == 0]
    if len(pos) == 0 or len(neg) == 0:
      out.append(np.nan)
      continue
    greater = pos[:, None] > neg[None, :]  # comparisons, not differences: inf-safe
    ties = pos[:, None] == neg[None, :]
    out.append((greater.sum() + 0.5 * ties.sum()) / greater.size)
  return np.array(out)


def test_perfect_separation_is_one():
  mask = _square_mask()
  eps = np.where(mask == 1, 0.01, 0.2)
  np.testing.assert_allclose(metrics.relevance_auroc(eps, mask), [1.0, 1.0])
  assert metrics.mean_relevance_auroc(eps, mask) == pytest.approx(1.0)


def test_reversed_is_zero():
  mask = _square_mask()
  eps = np.where(mask == 1, 0.3, 0.05)
  np.testing.assert_allclose(metrics.relevance_auroc(eps, mask), [0.0, 0.0])


def test_all_equal_budgets_is_half():
  mask = _square_mask()
  eps = np.full(mask.shape, 0.1)
  np.testing.assert_allclose(metrics.relevance_auroc(eps, mask), [0.5, 0.5])


def test_zero_budget_is_most_relevant():
  mask = _square_mask(n=1)
  eps = np.where(mask == 1, 0.0, 0.1)
  np.testing.assert_allclose(metrics.relevance_auroc(eps, mask), [1.0])


def test_hand_computed_small_case_with_ties():
  # 4 pixels: positives have eps {0.1, 0.2}, negatives {0.2, 0.4}.
  # Pairs (pos vs neg): 0.1<0.2 ✓, 0.1<0.4 ✓, 0.2=0.2 ½, 0.2<0.4 ✓ → 3.5/4.
  eps = np.array([[0.1, 0.2, 0.2, 0.4]])
  mask = np.array([[1, 1, 0, 0]])
  np.testing.assert_allclose(metrics.relevance_auroc(eps, mask), [0.875])


def test_degenerate_masks_are_nan_and_ignored_by_mean():
  eps = np.random.default_rng(0).uniform(0.01, 0.3, size=(3, 4, 4, 1))
  mask = np.zeros((3, 4, 4, 1))
  mask[1] = 1.0  # all relevant
  mask[2, :2] = 1.0  # proper mask, perfectly separated below
  eps[2, :2] = 0.001
  auc = metrics.relevance_auroc(eps, mask)
  assert np.isnan(auc[0]) and np.isnan(auc[1])
  assert auc[2] == pytest.approx(1.0)
  assert metrics.mean_relevance_auroc(eps, mask) == pytest.approx(1.0)
  assert np.isnan(metrics.mean_relevance_auroc(eps[:2], mask[:2]))


def test_multichannel_eps_uses_mean_log_over_channels():
  # Pixel 0: eps (0.1, 0.4) → geometric mean 0.2; pixel 1: (0.2, 0.2) → 0.2 (tie);
  # pixel 2: (0.05, 0.05). Arithmetic mean would break the tie between 0 and 1.
  eps = np.array([[[[0.1, 0.4], [0.2, 0.2], [0.05, 0.05]]]])  # [1, 1, 3, 2]
  mask = np.array([[[[1], [0], [0]]]])
  # pos score = -log 0.2; negatives: tie with pixel 1, loses to pixel 2 → 0.25.
  np.testing.assert_allclose(metrics.relevance_auroc(eps, mask), [0.25])


def test_accepts_jax_arrays_and_flat_shapes():
  mask = _square_mask(n=1)
  eps = np.where(mask == 1, 0.01, 0.2)
  got = metrics.relevance_auroc(jnp.asarray(eps[..., 0]), jnp.asarray(mask))
  np.testing.assert_allclose(got, [1.0])
  got = metrics.relevance_auroc(eps.reshape(1, -1), mask.reshape(1, -1))
  np.testing.assert_allclose(got, [1.0])


def test_pixel_count_mismatch_raises():
  with pytest.raises(ValueError):
    metrics.relevance_auroc(np.ones((1, 4, 4, 1)), np.ones((1, 3, 3, 1)))


@settings(max_examples=60, deadline=None)
@given(
  data=st.data(),
  n=st.integers(1, 4),
  p=st.integers(1, 12),
)
def test_matches_brute_force_pairwise_count(data, n, p):
  # Few distinct values so ties are common; include zero budgets.
  eps = data.draw(
    hnp.arrays(np.float64, (n, p), elements=st.sampled_from([0.0, 0.01, 0.1, 0.2, 0.5]))
  )
  mask = data.draw(hnp.arrays(np.int8, (n, p), elements=st.integers(0, 1)))
  got = metrics.relevance_auroc(eps, mask)
  np.testing.assert_allclose(got, _brute_force_auroc(eps, mask), equal_nan=True)


@settings(max_examples=30, deadline=None)
@given(
  eps=hnp.arrays(np.float64, (3, 3, 3, 1), elements=st.floats(1e-4, 1.0, allow_nan=False)),
  mask=hnp.arrays(np.int8, (3, 3, 3, 1), elements=st.integers(0, 1)),
)
def test_matches_brute_force_continuous(eps, mask):
  np.testing.assert_allclose(
    metrics.relevance_auroc(eps, mask), _brute_force_auroc(eps, mask), equal_nan=True
  )


def test_budget_ratio_hand_computed():
  # Example 0: inside {0.1, 0.3} mean 0.2; outside {0.4, 0.6, 0.5, 0.5} mean 0.5 → 2.5.
  # Example 1: inside {0.2} ; outside {0.1, 0.1, 0.1, 0.1, 0.1} → 0.5.
  eps = np.array([[0.1, 0.3, 0.4, 0.6, 0.5, 0.5], [0.2, 0.1, 0.1, 0.1, 0.1, 0.1]]).reshape(
    2, 2, 3, 1
  )
  mask = np.array([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).reshape(2, 2, 3, 1)
  per_example, mean = metrics.budget_ratio_out_in(eps, mask)
  np.testing.assert_allclose(per_example, [2.5, 0.5])
  assert mean == pytest.approx(1.5)


def test_budget_ratio_channels_and_degenerate():
  # Channel mean per pixel: pixel 0 (0.1, 0.3) → 0.2, pixel 1 (0.4, 0.8) → 0.6.
  eps = np.array([[[[0.1, 0.3], [0.4, 0.8]]], [[[0.1, 0.1], [0.2, 0.2]]]])
  mask = np.array([[[[1], [0]]], [[[0], [0]]]])
  per_example, mean = metrics.budget_ratio_out_in(eps, mask)
  np.testing.assert_allclose(per_example[0], 3.0)
  assert np.isnan(per_example[1])
  assert mean == pytest.approx(3.0)
