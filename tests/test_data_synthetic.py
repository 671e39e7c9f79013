"""Tests for cbudget.data._synthetic: the `shapes` dataset (the canvases: test_data_canvas.py)."""

from __future__ import annotations


import numpy as np

from cbudget import data
from cbudget.data import _synthetic


# ----------------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------------

_TEMPLATE_PIXELS = {0: 25, 1: 9, 2: 10, 3: 9}  # square, plus, pair of bars, X


def test_shapes_properties():
  ds = data.load("shapes", "train")
  n = 4000
  assert (
    ds.images.shape == (n, 16, 16, 1) and ds.masks.shape == (n, 16, 16, 1) and ds.num_classes == 4
  )
  assert ds.images.min() >= 0 and ds.images.max() <= 1
  assert set(np.unique(ds.masks)) == {0.0, 1.0}
  counts = np.bincount(ds.labels, minlength=4)
  assert counts.min() > 0.2 * n and counts.max() < 0.3 * n

  bright = ds.images[..., 0] >= _synthetic.SHAPE_MIN_INTENSITY
  inside = ds.masks[..., 0] == 1
  assert not (bright & ~inside).any(), "a shape pixel lies outside the mask"
  assert (ds.images[..., 0][~inside] <= _synthetic.CLUTTER_MAX_INTENSITY).all()
  for i in range(200):
    assert bright[i].sum() == _TEMPLATE_PIXELS[int(ds.labels[i])]
    # The mask is the shape's bounding box dilated by one pixel (clipped to the image).
    ys, xs = np.nonzero(bright[i])
    expected = np.zeros((16, 16), bool)
    expected[max(ys.min() - 1, 0) : ys.max() + 2, max(xs.min() - 1, 0) : xs.max() + 2] = True
    np.testing.assert_array_equal(inside[i], expected)
  # There is clutter outside the masks, and the mask position varies.
  assert (ds.images[..., 0][~inside] > 0.15).mean() > 0.02
  assert len({tuple(np.argwhere(m[..., 0])[0]) for m in ds.masks[:50]}) > 10


def test_shapes_deterministic_by_seed_and_split():
  a, b = data.load("shapes", "test", seed=3), data.load("shapes", "test", seed=3)
  for x, y in zip(a[:3], b[:3]):
    np.testing.assert_array_equal(x, y)
  c = data.load("shapes", "test", seed=4)
  assert not np.array_equal(a.images, c.images)
  train = data.load("shapes", "train", seed=3)
  assert len(train.labels) == 4000 and len(a.labels) == 1000
  assert not np.array_equal(train.images[:1000], a.images)
  head = data.load("shapes", "train", seed=3, num_examples=10)
  np.testing.assert_array_equal(head.images, train.images[:10])
  np.testing.assert_array_equal(head.masks, train.masks[:10])
