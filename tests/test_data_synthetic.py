"""Tests for cbudget.data._synthetic: the `shapes` dataset and the canvas datasets."""

from __future__ import annotations


import numpy as np
import pytest

from cbudget import data
from cbudget.data import DataError, Dataset, _synthetic
from tests.data_files import mask_box


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


# ----------------------------------------------------------------------------------------------------------
# canvas datasets
# ----------------------------------------------------------------------------------------------------------


def small_base(n: int, h: int, w: int, c: int, seed: int = 0) -> Dataset:
  # Values in [0.5, 1] with random low bits: every image is unique, so exact matches identify the source.
  rng = np.random.default_rng(seed)
  images = rng.uniform(0.5, 1.0, (n, h, w, c)).astype(np.float32)
  return Dataset(images, rng.integers(0, 10, n).astype(np.int32), None, 10, "base")


def test_mnist_canvas_places_digit_at_mask():
  base = small_base(8, 28, 28, 1)
  ds = data.make_canvas_dataset(base, "mnist_canvas", seed=5)
  assert ds.images.shape == (8, 56, 56, 1) and ds.masks.shape == (8, 56, 56, 1)
  assert ds.name == "mnist_canvas" and ds.num_classes == 10
  np.testing.assert_array_equal(ds.labels, base.labels)
  data.validate(ds)
  positions = set()
  for i in range(8):
    top, left, height, width = mask_box(ds.masks[i])
    assert (height, width) == (28, 28) and top in (0, 28) and left in (0, 28)  # one of 2x2 slots
    np.testing.assert_array_equal(ds.images[i, top : top + 28, left : left + 28], base.images[i])
    positions.add((top, left))
    outside = ds.images[i][ds.masks[i] == 0]
    assert outside.max() <= 0.6  # distractors are dimmed copies of other digits
    assert (outside > 0.1).any()  # ... and some of them are visible (noise alone stays <= 0.1)
  assert len(positions) > 1


def test_mnist_canvas_slots_are_equally_likely():
  """Every slot holds the digit about equally often, so a fixed budget map cannot predict relevance."""
  ds = data.make_canvas_dataset(small_base(400, 4, 4, 1), "mnist_canvas", seed=3)
  frequency = ds.masks[..., 0].mean(axis=0)  # per pixel: share of canvases where relevant
  assert frequency.shape == (8, 8)
  np.testing.assert_allclose(frequency, 0.25, atol=0.06)
  for slot in ([0, 0], [0, 4], [4, 0], [4, 4]):  # constant within each slot
    block = frequency[slot[0] : slot[0] + 4, slot[1] : slot[1] + 4]
    assert np.all(block == block[0, 0])


def test_mnist_canvas_distractors_come_from_other_examples():
  # Only example 0 has ink. Its own canvas must then hold nothing but noise (<= 0.1) around the digit,
  # while the other canvases show dimmed crops of it.
  images = np.zeros((3, 28, 28, 1), np.float32)
  images[0] = 1.0
  ds = data.make_canvas_dataset(
    Dataset(images, np.arange(3, dtype=np.int32), None, 10, "base"), "mnist_canvas", seed=0
  )
  outside = [ds.images[i][ds.masks[i] == 0] for i in range(3)]
  assert outside[0].max() <= 0.1
  assert max(o.max() for o in outside[1:]) >= 0.3


def test_canvas_determinism_and_prefix():
  base = small_base(10, 28, 28, 1)
  for kind in ["mnist_canvas", "cifar_canvas"]:
    a = data.make_canvas_dataset(base, kind, seed=1)
    b = data.make_canvas_dataset(base, kind, seed=1)
    c = data.make_canvas_dataset(base, kind, seed=2)
    head = data.make_canvas_dataset(base, kind, seed=1, num_examples=4)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, c.images)
    np.testing.assert_array_equal(head.images, a.images[:4])
    np.testing.assert_array_equal(head.masks, a.masks[:4])
    np.testing.assert_array_equal(head.labels, a.labels[:4])


def test_cifar_canvas_halves():
  n = 20
  base = small_base(n, 32, 32, 3)
  ds = data.make_canvas_dataset(base, "cifar_canvas", seed=0)
  assert ds.images.shape == (n, 32, 64, 3) and ds.masks.shape == (n, 32, 64, 1)
  sides = []
  for i in range(n):
    top, left, height, width = mask_box(ds.masks[i])
    assert (top, height, width) == (0, 32, 32) and left in (0, 32)
    sides.append(left)
    np.testing.assert_array_equal(ds.images[i, :, left : left + 32], base.images[i])
    other = ds.images[i, :, 32 - left : 64 - left]  # another image, dimmed to half intensity
    matches = [j for j in range(n) if np.array_equal(other, np.float32(0.5) * base.images[j])]
    assert len(matches) == 1 and matches[0] != i
  assert set(sides) == {0, 32}


def test_canvas_carries_base_masks():
  base = small_base(4, 8, 8, 1)
  masks = np.zeros((4, 8, 8, 1), np.float32)
  masks[:, 2:5, 3:6] = 1
  ds = data.make_canvas_dataset(base._replace(masks=masks), "mnist_canvas", seed=0, grid=3)
  assert ds.masks.shape == (4, 24, 24, 1)
  for i in range(4):
    assert mask_box(ds.masks[i])[2:] == (3, 3)
    assert ds.masks[i].sum() == 9


def test_canvas_errors():
  with pytest.raises(DataError, match="unknown canvas kind"):
    data.make_canvas_dataset(small_base(3, 28, 28, 1), "tiles", seed=0)
  with pytest.raises(DataError, match="at least 2"):
    data.make_canvas_dataset(small_base(1, 28, 28, 1), "cifar_canvas", seed=0)
  with pytest.raises(DataError, match="grid >= 2"):
    data.make_canvas_dataset(small_base(3, 28, 28, 1), "mnist_canvas", seed=0, grid=1)
  with pytest.raises(DataError, match="num_examples=4 but the base dataset has 3"):
    data.make_canvas_dataset(small_base(3, 28, 28, 1), "mnist_canvas", seed=0, num_examples=4)
