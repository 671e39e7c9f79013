"""Tests for the canvas datasets (cbudget.data._synthetic.make_canvas_dataset).

Canvases are built from generated base images, never from the network or the shared data: MNIST-like
"digits" (exact-zero background, strokes with many exact ones, like real MNIST) for the statistics and
the leak test, and unique bright images (every pixel > 0.5, random low bits) to identify sources exactly.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from cbudget import data, metrics
from cbudget.data import DataError, Dataset, _synthetic

SLOT = 28


def mnist_like(n: int, seed: int = 0, size: int = SLOT) -> Dataset:
  """Zero background; a quarter of the central pixels inked, 60 % of the ink at exactly 1."""
  rng = np.random.default_rng(seed)
  images = np.zeros((n, size, size, 1), np.float32)
  lo, hi = size // 7, size - size // 7
  inked = rng.random((n, hi - lo, hi - lo, 1)) < 0.25
  ink = np.where(rng.random(inked.shape) < 0.6, 255, rng.integers(1, 255, inked.shape)) / 255
  images[:, lo:hi, lo:hi] = np.where(inked, ink, 0).astype(np.float32)
  return Dataset(images, rng.integers(0, 10, n).astype(np.int32), None, 10, "base")


def unique_bright(n: int, h: int, w: int, c: int, seed: int = 0) -> Dataset:
  """Values in [0.5, 1] with random low bits: exact matches identify the source image."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0.5, 1.0, (n, h, w, c)).astype(np.float32)
  return Dataset(images, rng.integers(0, 10, n).astype(np.int32), None, 10, "base")


def slots(ds: Dataset, h: int, w: int) -> np.ndarray:
  """[N, num_slots, h, w, C]: the canvas cut into its slots, row by row."""
  n, height, width, c = ds.images.shape
  rows, cols = height // h, width // w
  split = ds.images.reshape(n, rows, h, cols, w, c).transpose(0, 1, 3, 2, 4, 5)
  return split.reshape(n, rows * cols, h, w, c)


def labelled_slot(ds: Dataset, h: int, w: int) -> np.ndarray:
  """Index of the masked slot of each canvas, checking that the mask is exactly one whole slot."""
  n, height, width, _ = ds.masks.shape
  rows, cols = height // h, width // w
  per_slot = ds.masks[..., 0].reshape(n, rows, h, cols, w).mean(axis=(2, 4)).reshape(n, -1)
  assert set(np.unique(per_slot)) <= {0.0, 1.0}, "the mask is not a union of whole slots"
  np.testing.assert_array_equal(per_slot.sum(axis=1), 1)  # exactly one slot
  return per_slot.argmax(axis=1)


# ----------------------------------------------------------------------------------------------------------
# markers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(5, 5), (8, 8), (28, 28), (32, 32), (6, 11)])
def test_marker_patterns(h, w):
  band, frame, decoy = _synthetic.marker_patterns(h, w)
  y, x = np.mgrid[:h, :w]
  ring = np.minimum(np.minimum(y, h - 1 - y), np.minimum(x, w - 1 - x))
  np.testing.assert_array_equal(band, ring <= 1)
  np.testing.assert_array_equal(frame, ring == 0)
  assert not (decoy & ~band).any()
  assert decoy.sum() == frame.sum()  # the same band histogram in every slot
  assert (frame & ~decoy).any()  # ... but the decoy leaves outer-ring pixels empty
  assert (decoy & (ring == 0)).any() and (
    decoy & (ring == 1)
  ).any()  # and looks like a broken frame


def test_marker_needs_room():
  with pytest.raises(DataError, match="too small for the 2-pixel marker band"):
    _synthetic.marker_patterns(4, 28)
  with pytest.raises(DataError, match="too small"):
    data.make_canvas_dataset(unique_bright(3, 4, 4, 1), "mnist_canvas", seed=0)


# ----------------------------------------------------------------------------------------------------------
# layout, markers and content
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mnist_canvas", "cifar_canvas"])
def test_canvas_layout_markers_and_distractors(kind):
  n, c = 12, (1 if kind == "mnist_canvas" else 3)
  base = unique_bright(n, SLOT, SLOT, c)
  ds = data.make_canvas_dataset(base, kind, seed=5)
  expected = (n, 2 * SLOT, 2 * SLOT) if kind == "mnist_canvas" else (n, SLOT, 2 * SLOT)
  assert ds.images.shape == expected + (c,) and ds.masks.shape == expected + (1,)
  assert ds.images.dtype == np.float32 and ds.masks.dtype == np.float32
  assert ds.name == kind and ds.num_classes == 10
  np.testing.assert_array_equal(ds.labels, base.labels)
  data.validate(ds)  # float32, values in [0, 1]
  band, frame, decoy = _synthetic.marker_patterns(SLOT, SLOT)
  labelled = labelled_slot(ds, SLOT, SLOT)
  pieces = slots(ds, SLOT, SLOT)
  for i in range(n):
    for s in range(pieces.shape[1]):
      piece = pieces[i, s]
      marker = frame if s == labelled[i] else decoy
      # The band is noise-free and exactly the marker, in every channel.
      np.testing.assert_array_equal(
        piece[band], np.repeat(marker[band, None], c, 1).astype(np.float32)
      )
      # Inside the band: a base image at full intensity (bright base: the noise floor changes nothing),
      # the labelled image in the labelled slot and another example elsewhere.
      sources = [j for j in range(n) if np.array_equal(piece[~band], base.images[j][~band])]
      assert len(sources) == 1
      assert (sources[0] == i) == (s == labelled[i])


def test_mnist_canvas_noise_floor_is_the_same_inside_and_outside_the_labelled_slot():
  # Empty base images: every slot's interior is pure noise floor, the labelled one included.
  base = Dataset(np.zeros((200, SLOT, SLOT, 1), np.float32), np.zeros(200, np.int32), None, 10, "b")
  ds = data.make_canvas_dataset(base, "mnist_canvas", seed=2)
  band = _synthetic.marker_patterns(SLOT, SLOT)[0]
  pieces = slots(ds, SLOT, SLOT)[..., 0][:, :, ~band]  # [N, 4, interior pixels]
  is_labelled = labelled_slot(ds, SLOT, SLOT)[:, None] == np.arange(4)
  inside, outside = pieces[is_labelled].ravel(), pieces[~is_labelled].ravel()
  for values in (inside, outside):
    assert 0.0 <= values.min() and values.max() < 0.1
  # The same distribution U[0, 0.1): equal deciles (the standard error of a decile is ~3e-4 here).
  deciles = np.linspace(0.1, 0.9, 9)
  np.testing.assert_allclose(np.quantile(inside, deciles), 0.1 * deciles, atol=2e-3)
  np.testing.assert_allclose(np.quantile(outside, deciles), 0.1 * deciles, atol=2e-3)
  # On MNIST-like digits: no exact zeros anywhere but in the band, and the labelled digit keeps its ink.
  digits = mnist_like(20)
  ds = data.make_canvas_dataset(digits, "mnist_canvas", seed=2)
  labelled = slots(ds, SLOT, SLOT)[np.arange(20), labelled_slot(ds, SLOT, SLOT)][..., 0]
  assert (slots(ds, SLOT, SLOT)[..., 0][:, :, ~band] > 0).all()
  source = digits.images[..., 0]
  np.testing.assert_array_equal(labelled[:, ~band], np.maximum(source, labelled)[:, ~band])
  bright = (source >= 0.1) & ~band
  np.testing.assert_array_equal(
    labelled[bright], source[bright]
  )  # ink above the floor is untouched


def test_cifar_canvas_has_no_noise_floor():
  base = Dataset(np.zeros((6, SLOT, SLOT, 3), np.float32), np.zeros(6, np.int32), None, 10, "b")
  ds = data.make_canvas_dataset(base, "cifar_canvas", seed=0)
  band = _synthetic.marker_patterns(SLOT, SLOT)[0]
  assert (slots(ds, SLOT, SLOT)[:, :, ~band] == 0).all()


def test_labelled_slot_is_uniform():
  """Every slot is labelled about equally often, so a fixed budget map cannot predict relevance."""
  ds = data.make_canvas_dataset(unique_bright(800, 6, 6, 1), "mnist_canvas", seed=3)
  counts = np.bincount(labelled_slot(ds, 6, 6), minlength=4)
  np.testing.assert_allclose(counts / 800, 0.25, atol=0.05)  # ~3.3 standard errors
  cifar = data.make_canvas_dataset(unique_bright(400, 6, 6, 3), "cifar_canvas", seed=3)
  np.testing.assert_allclose(np.bincount(labelled_slot(cifar, 6, 6)) / 400, 0.5, atol=0.07)


def test_canvas_determinism_and_prefix():
  base = mnist_like(10)
  for kind, b in [("mnist_canvas", base), ("cifar_canvas", unique_bright(10, 8, 8, 3))]:
    a = data.make_canvas_dataset(b, kind, seed=1)
    again = data.make_canvas_dataset(b, kind, seed=1)
    other = data.make_canvas_dataset(b, kind, seed=2)
    head = data.make_canvas_dataset(b, kind, seed=1, num_examples=4)
    for x, y in zip(a[:3], again[:3]):
      np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images, other.images)
    for x, y in zip(head[:3], a[:3]):
      np.testing.assert_array_equal(x, y[:4])


def test_canvas_carries_base_masks():
  base = unique_bright(4, 8, 8, 1)
  masks = np.zeros((4, 8, 8, 1), np.float32)
  masks[:, 2:5, 3:6] = 1
  ds = data.make_canvas_dataset(base._replace(masks=masks), "mnist_canvas", seed=0, grid=3)
  assert ds.masks.shape == (4, 24, 24, 1)
  for i in range(4):
    ys, xs = np.nonzero(ds.masks[i, ..., 0])
    assert ds.masks[i].sum() == 9 and ys.min() % 8 == 2 and xs.min() % 8 == 3


def test_canvas_errors():
  with pytest.raises(DataError, match="unknown canvas kind"):
    data.make_canvas_dataset(unique_bright(3, 8, 8, 1), "tiles", seed=0)
  with pytest.raises(DataError, match="at least 2"):
    data.make_canvas_dataset(unique_bright(1, 8, 8, 1), "cifar_canvas", seed=0)
  with pytest.raises(DataError, match="grid >= 2"):
    data.make_canvas_dataset(unique_bright(3, 8, 8, 1), "mnist_canvas", seed=0, grid=1)
  with pytest.raises(DataError, match="num_examples=4 but the base dataset has 3"):
    data.make_canvas_dataset(unique_bright(3, 8, 8, 1), "mnist_canvas", seed=0, num_examples=4)


def test_mnist_canvas_through_load(tmp_path):
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 5, dtype=np.uint8)
  folder = tmp_path / "mnist"
  folder.mkdir()
  for name, array, magic in [
    ("t10k-images-idx3-ubyte.gz", images, 0x0803),
    ("t10k-labels-idx1-ubyte.gz", labels, 0x0801),
  ]:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    (folder / name).write_bytes(gzip.compress(header + array.tobytes()))
  ds = data.load("mnist_canvas", "test", tmp_path, seed=1, num_examples=3)
  assert ds.images.shape == (3, 56, 56, 1) and ds.labels.tolist() == labels[:3].tolist()
  base = Dataset(images[..., None] / np.float32(255), labels.astype(np.int32), None, 10, "mnist")
  np.testing.assert_array_equal(
    ds.images, data.make_canvas_dataset(base, "mnist_canvas", (1, 1), num_examples=3).images
  )


# ----------------------------------------------------------------------------------------------------------
# the frame can be neither forged nor erased by a box of half-width < 1/2
# ----------------------------------------------------------------------------------------------------------


def marked_slots(images: np.ndarray, h: int, w: int) -> np.ndarray:
  """The frame detector of the docstring: [N, num_slots] bool, every outer-ring pixel > 1/2."""
  frame = _synthetic.marker_patterns(h, w)[1]
  pieces = slots(Dataset(images, None, None, 10, "x"), h, w)
  return (pieces[:, :, frame] > _synthetic.MARKER_THRESHOLD).all(axis=(2, 3))


@pytest.mark.parametrize("kind", ["mnist_canvas", "cifar_canvas"])
def test_frame_can_be_neither_forged_nor_erased(kind):
  base = mnist_like(16) if kind == "mnist_canvas" else unique_bright(16, SLOT, SLOT, 3)
  if kind == "cifar_canvas":  # full range of values, dark ones included
    base = base._replace(images=(base.images - 0.5) * 2)
  ds = data.make_canvas_dataset(base, kind, seed=4)
  clean = marked_slots(ds.images, SLOT, SLOT)  # exactly the labelled slot is marked
  np.testing.assert_array_equal(
    clean, labelled_slot(ds, SLOT, SLOT)[:, None] == np.arange(clean.shape[1])
  )
  delta = np.float32(0.4999)
  # Interval check: "all outer-ring pixels > 1/2" is increasing in every pixel, so over the box
  # [x - delta, x + delta] (clipped to [0, 1]) it is least likely at the lower corner and most likely at
  # the upper corner. The frame survives the lower corner and no frame appears at the upper corner.
  lower, upper = np.clip(ds.images - delta, 0, 1), np.clip(ds.images + delta, 0, 1)
  np.testing.assert_array_equal(marked_slots(lower, SLOT, SLOT), clean)
  np.testing.assert_array_equal(marked_slots(upper, SLOT, SLOT), clean)
  # Sampled points of the box, corners included.
  rng = np.random.default_rng(0)
  for _ in range(5):
    for offset in (
      rng.uniform(-delta, delta, ds.images.shape),
      rng.choice([-delta, delta], ds.images.shape),
    ):
      point = np.clip(ds.images + offset.astype(np.float32), 0, 1)
      np.testing.assert_array_equal(marked_slots(point, SLOT, SLOT), clean)
  # The bound is tight: at half-width 1/2 + a little, the upper corner forges a frame on every slot.
  assert marked_slots(np.clip(ds.images + 0.51, 0, 1), SLOT, SLOT).all()


# ----------------------------------------------------------------------------------------------------------
# no intensity leak
# ----------------------------------------------------------------------------------------------------------


def old_leaky_mnist_canvas(base: Dataset, seed: int) -> Dataset:
  """The previous mnist_canvas, reduced to its leak: the digit pasted as is (exact-zero background) into
  a random slot of a noise canvas (<= 0.1) whose other slots hold dimmed (0.3-0.6) other digits."""
  rng = np.random.default_rng(seed)
  n = base.images.shape[0]
  canvas = (rng.random((n, 2, SLOT, 2, SLOT, 1)) * 0.1).astype(np.float32)
  masks = np.zeros_like(canvas)
  slot = rng.integers(0, 4, n)
  for i in range(n):
    for s in range(4):
      r, c = divmod(s, 2)
      if s == slot[i]:
        canvas[i, r, :, c], masks[i, r, :, c] = base.images[i], 1
      else:
        dimmed = base.images[(i + 1 + s) % n] * rng.uniform(0.3, 0.6)
        canvas[i, r, :, c] = np.maximum(canvas[i, r, :, c], dimmed)
  shape = (n, 2 * SLOT, 2 * SLOT, 1)
  return Dataset(canvas.reshape(shape), base.labels, masks.reshape(shape), 10, "old")


def test_intensity_rule_finds_no_leak_in_the_new_canvases():
  digits = mnist_like(60, seed=1)
  new = data.make_canvas_dataset(digits, "mnist_canvas", seed=0)
  assert abs(metrics.intensity_rule_auroc(new.images, new.masks) - 0.5) < 0.05
  old = old_leaky_mnist_canvas(digits, seed=0)
  assert metrics.intensity_rule_auroc(old.images, old.masks) > 0.8
  # Natural-like colour images: brightness varies from image to image and from pixel to pixel. Many
  # small canvases: the per-example AUROC of a rule varies a lot with the two images' brightness.
  rng = np.random.default_rng(2)
  colour = rng.uniform(0, 1, (300, 8, 8, 3)) * rng.uniform(0.2, 1, (300, 1, 1, 1))
  base = Dataset(colour.astype(np.float32), np.zeros(300, np.int32), None, 10, "colour")
  cifar = data.make_canvas_dataset(base, "cifar_canvas", seed=0)
  assert abs(metrics.intensity_rule_auroc(cifar.images, cifar.masks) - 0.5) < 0.05
