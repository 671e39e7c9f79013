"""Tests for cbudget.data._pipeline: batching, resuming mid-epoch, augmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbudget import data
from cbudget.data import DataError, Dataset


# ----------------------------------------------------------------------------------------------------------
# batches and augmentation
# ----------------------------------------------------------------------------------------------------------


def indexed_dataset(n: int, with_masks: bool = True, size: int = 4) -> Dataset:
  """Image i is constant i / 1000, so a batch's images reveal which examples it holds."""
  images = np.broadcast_to(
    (np.arange(n, dtype=np.float32) / 1000)[:, None, None, None], (n, size, size, 1)
  ).copy()
  masks = np.ones_like(images) if with_masks else None
  return Dataset(images, (np.arange(n) % 3).astype(np.int32), masks, 3, "indexed")


def batch_ids(batch: dict) -> list[int]:
  return np.rint(batch["image"][:, 0, 0, 0] * 1000).astype(int).tolist()


def test_batches_structure_and_determinism():
  ds = indexed_dataset(10)
  run = list(data.batches(ds, 3, seed=0, epoch=2))
  assert len(run) == data.num_batches(ds, 3) == 3
  for b in run:
    assert set(b) == {"image", "label", "mask"}
    assert b["image"].dtype == np.float32 and b["image"].shape == (3, 4, 4, 1)
    assert b["label"].dtype == np.int32 and b["label"].shape == (3,)
    assert b["mask"].dtype == np.float32 and b["mask"].shape == (3, 4, 4, 1)
    np.testing.assert_array_equal(b["label"], np.array(batch_ids(b)) % 3)
  again = list(data.batches(ds, 3, seed=0, epoch=2))
  assert [batch_ids(b) for b in run] == [batch_ids(b) for b in again]
  assert "mask" not in next(data.batches(indexed_dataset(10, with_masks=False), 3, seed=0))


def test_batches_epochs_and_seeds_differ():
  ds = indexed_dataset(50)
  orders = {
    (s, e): sum(map(batch_ids, data.batches(ds, 10, seed=s, epoch=e)), [])
    for s in (0, 1)
    for e in (0, 1)
  }
  assert len({tuple(o) for o in orders.values()}) == 4
  assert all(sorted(o) == list(range(50)) for o in orders.values())
  unshuffled = sum(map(batch_ids, data.batches(ds, 10, seed=0, shuffle=False)), [])
  assert unshuffled == list(range(50))


@settings(max_examples=60, deadline=None)
@given(
  n=st.integers(1, 40),
  batch_size=st.integers(1, 12),
  seed=st.integers(0, 2**32),
  epoch=st.integers(0, 5),
  drop_remainder=st.booleans(),
)
def test_batches_cover_each_example_once(n, batch_size, seed, epoch, drop_remainder):
  ds = indexed_dataset(n, size=1)
  if drop_remainder and batch_size > n:
    with pytest.raises(DataError, match=f"batch_size={batch_size} exceeds the {n} examples"):
      data.batches(ds, batch_size, seed=seed, epoch=epoch)
    return
  run = list(data.batches(ds, batch_size, seed=seed, epoch=epoch, drop_remainder=drop_remainder))
  assert len(run) == data.num_batches(ds, batch_size, drop_remainder)
  ids = sum(map(batch_ids, run), [])
  assert len(ids) == len(set(ids))
  if drop_remainder:
    assert all(len(batch_ids(b)) == batch_size for b in run) and len(ids) == n - n % batch_size
  else:
    assert sorted(ids) == list(range(n))


def test_start_batch_resumes_mid_epoch():
  ds = indexed_dataset(23)
  for augment in (False, True):
    full = list(data.batches(ds, 4, seed=7, epoch=3, augment=augment))
    for k in range(len(full) + 1):
      resumed = list(data.batches(ds, 4, seed=7, epoch=3, augment=augment, start_batch=k))
      assert len(resumed) == len(full) - k
      for a, b in zip(resumed, full[k:]):
        for key in a:
          np.testing.assert_array_equal(a[key], b[key])
  with pytest.raises(DataError, match="start_batch=6 is outside the epoch's 5 batches"):
    data.batches(ds, 4, seed=7, start_batch=6)


def test_batches_argument_errors():
  ds = indexed_dataset(5)
  for kwargs, message in [
    (dict(batch_size=0), "batch_size must be a positive int"),
    (dict(batch_size=6), "batch_size=6 exceeds the 5 examples of indexed"),
    (dict(batch_size=2, epoch=-1), "epoch must be a non-negative int"),
  ]:
    with pytest.raises(DataError, match=message):
      data.batches(ds, seed=0, **{"epoch": 0, **kwargs})
  assert len(list(data.batches(ds, 6, seed=0, drop_remainder=False))) == 1


def test_augment_keeps_images_and_masks_aligned():
  # Images equal to their masks must stay equal: both go through the same crop and flip.
  shapes = data.load("shapes", "test", num_examples=64)
  ds = shapes._replace(images=shapes.masks.copy())
  for b in data.batches(ds, 16, seed=1, augment=True):
    np.testing.assert_array_equal(b["image"], b["mask"])
  # Augmentation varies with the batch and the epoch.
  a = next(data.batches(shapes, 16, seed=1, epoch=0, augment=True, shuffle=False))
  b = next(data.batches(shapes, 16, seed=1, epoch=1, augment=True, shuffle=False))
  plain = next(data.batches(shapes, 16, seed=1, epoch=0, shuffle=False))
  assert not np.array_equal(a["image"], plain["image"]) and not np.array_equal(
    a["image"], b["image"]
  )


def test_random_crop_flip_is_a_padded_crop_and_flip():
  rng = np.random.default_rng(0)
  images = rng.uniform(0.1, 1.0, (32, 5, 6, 2)).astype(np.float32)
  masks = rng.integers(0, 2, (32, 5, 6, 1)).astype(np.float32)
  out, out_masks = data.random_crop_flip(images, masks, np.random.default_rng(1), padding=2)
  assert out.shape == images.shape and out.dtype == np.float32 and out_masks.shape == masks.shape
  seen = set()
  for i in range(len(images)):
    padded = np.pad(images[i], ((2, 2), (2, 2), (0, 0)))
    padded_mask = np.pad(masks[i], ((2, 2), (2, 2), (0, 0)))
    found = [
      (y, x, f)
      for y, x, f in itertools.product(range(5), range(5), (False, True))
      if np.array_equal(out[i], _crop_flip(padded, y, x, f, 5, 6))
    ]
    assert found, f"example {i} is not a crop/flip of its padded input"
    assert any(np.array_equal(out_masks[i], _crop_flip(padded_mask, *t, 5, 6)) for t in found)
    seen.update(found)
  assert len({t[2] for t in seen}) == 2 and len({t[:2] for t in seen}) > 5
  images_only, none = data.random_crop_flip(images, None, np.random.default_rng(1), padding=2)
  assert none is None
  np.testing.assert_array_equal(images_only, out)


def _crop_flip(padded: np.ndarray, y: int, x: int, flip: bool, h: int, w: int) -> np.ndarray:
  crop = padded[y : y + h, x : x + w]
  return crop[:, ::-1] if flip else crop
