"""Batching and augmentation of in-memory datasets, reproducible and resumable by (seed, epoch, batch).

Epoch e's order is a permutation drawn from `np.random.default_rng((seed, e))`, and batch b's augmentation
uses `np.random.default_rng((seed, e, b, _AUGMENT_STREAM))`. Both depend only on those integers, never on
how many batches were consumed before, so a run restarted at (epoch e, batch k) with `start_batch=k` sees
exactly the batches the uninterrupted run would have seen, at the cost of one permutation.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from cbudget.data._types import DataError, Dataset

# Distinguishes the augmentation streams from the shuffle stream (different SeedSequence entropy).
_AUGMENT_STREAM = 1


def num_batches(dataset: Dataset, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches `batches` yields per epoch with these settings."""
  n = dataset.images.shape[0]
  _check_batch_size(dataset, batch_size, drop_remainder)
  return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
  dataset: Dataset,
  batch_size: int,
  *,
  seed: int,
  epoch: int = 0,
  shuffle: bool = True,
  drop_remainder: bool = True,
  augment: bool = False,
  start_batch: int = 0,
) -> Iterator[dict]:
  """Yields the batches of one epoch as dicts of numpy arrays.

  Each batch is {"image": float32 [B, H, W, C], "label": int32 [B]} plus "mask": float32 [B, H, W, 1]
  when the dataset has masks. Arrays are fresh copies, so callers may modify them.

  Args:
    dataset: the examples.
    batch_size: examples per batch.
    seed, epoch: select the order (and augmentation) of this epoch; see the module docstring.
    shuffle: if False, examples come in dataset order.
    drop_remainder: if True, the last partial batch is dropped, so every batch has `batch_size` examples
      (fixed shapes avoid recompiling jitted steps); if False, it is yielded smaller.
    augment: apply `random_crop_flip` (to images and masks alike).
    start_batch: skip the first `start_batch` batches of the epoch without materialising them (resume).
  """
  n = num_batches(dataset, batch_size, drop_remainder)
  for name, value in (("seed", seed), ("epoch", epoch)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise DataError(f"batches: {name} must be a non-negative int, got {value!r}")
  if not 0 <= start_batch <= n:
    raise DataError(
      f"batches: start_batch={start_batch} is outside the epoch's {n} batches; use 0..{n}"
    )
  return _iterate(dataset, batch_size, seed, epoch, shuffle, augment, start_batch, n)


def _iterate(
  dataset: Dataset,
  batch_size: int,
  seed: int,
  epoch: int,
  shuffle: bool,
  augment: bool,
  start_batch: int,
  n: int,
) -> Iterator[dict]:
  # A separate generator function, so that argument errors in `batches` surface at the call, not at the
  # first next().
  size = dataset.images.shape[0]
  order = np.random.default_rng((seed, epoch)).permutation(size) if shuffle else np.arange(size)
  for b in range(start_batch, n):
    index = order[b * batch_size : (b + 1) * batch_size]
    images = dataset.images[index]
    masks = None if dataset.masks is None else dataset.masks[index]
    if augment:
      rng = np.random.default_rng((seed, epoch, b, _AUGMENT_STREAM))
      images, masks = random_crop_flip(images, masks, rng)
    batch = {"image": images, "label": dataset.labels[index].astype(np.int32)}
    if masks is not None:
      batch["mask"] = masks
    yield batch


def random_crop_flip(
  images: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator, *, padding: int = 4
) -> tuple[np.ndarray, np.ndarray | None]:
  """CIFAR-style augmentation (as in CROWN-IBP): zero-pad by `padding`, random crop, random horizontal flip.

  Every example gets its own offset in [0, 2 * padding]^2 and flip coin; masks get exactly the same
  transform, and their padding is 0 as well, since pixels shifted in from outside the image carry no label
  information. Vectorised as one gather from the padded batch.

  Args:
    images: [B, H, W, C].
    masks: [B, H, W, 1] or None.
    rng: source of the offsets and flips.
    padding: pixels of zero padding on each side.

  Returns:
    (images, masks) of the input shapes and dtypes (masks None if given None).
  """
  b, h, w = images.shape[:3]
  top = rng.integers(0, 2 * padding + 1, size=b)
  left = rng.integers(0, 2 * padding + 1, size=b)
  flip = rng.integers(0, 2, size=b).astype(bool)
  rows = top[:, None] + np.arange(h)  # [B, H] rows of the padded image
  cols = left[:, None] + np.arange(w)  # [B, W]
  cols = np.where(
    flip[:, None], cols[:, ::-1], cols
  )  # flipping the crop = reading its columns backwards
  index = (np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :])

  def transform(x: np.ndarray) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return padded[index]

  return transform(images), None if masks is None else transform(masks)


def _check_batch_size(dataset: Dataset, batch_size: int, drop_remainder: bool) -> None:
  n = dataset.images.shape[0]
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
  if drop_remainder and batch_size > n:
    raise DataError(
      f"batch_size={batch_size} exceeds the {n} examples of {dataset.name}, so with "
      "drop_remainder=True there would be no batch; lower --batch_size or use more "
      "examples"
    )
