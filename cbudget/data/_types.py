"""The in-memory dataset container, the facts about each dataset, the data error type and the validation
every loader ends with."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DataError(ValueError):
  """Any problem with data files, dataset contents or data-layer arguments.

  Messages are one line: the file (or argument) concerned, what is wrong, and how to fix it. It subclasses
  ValueError so callers that already handle bad values keep working.
  """


class DatasetInfo(NamedTuple):
  """What is known about a dataset before loading it (the table is `cbudget.data.INFO`).

  Attributes:
      name: the dataset name.
      num_classes: number of classes.
      shape: one image's shape (H, W, C).
      mean, std: per-channel normalisation constants in pixel space [0, 1], applied inside the
          classifier (boxes stay in pixel space); (0,) and (1,) for none.
      base: the raw dataset read from files (itself for mnist, fashion_mnist, cifar10; mnist or cifar10
          for a canvas), or None for data generated from the seed alone.
      has_mask: whether examples carry masks of the label-relevant pixels.
  """

  name: str
  num_classes: int
  shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  base: str | None
  has_mask: bool


class Dataset(NamedTuple):
  """A whole split held in memory.

  Attributes:
      images: float32 [N, H, W, C], values in [0, 1].
      labels: int32 [N], values in [0, num_classes).
      masks: float32 [N, H, W, 1] with 1 on label-relevant pixels and 0 on label-irrelevant ones, or
          None when the dataset does not know which pixels matter (plain MNIST / CIFAR-10).
      num_classes: number of classes.
      name: the dataset name, one of `DATASETS` for datasets made by `load`.
  """

  images: np.ndarray
  labels: np.ndarray
  masks: np.ndarray | None
  num_classes: int
  name: str


def validate(dataset: Dataset) -> Dataset:
  """Checks dtypes, shapes and value ranges of `dataset` and returns it unchanged.

  Raises DataError naming the dataset and the first violated property. Ranges are checked with min/max
  rather than `isfinite`: NaN propagates through min/max and fails the comparison, and +-inf falls outside
  [0, 1], so one pass per bound covers both properties.
  """
  name = dataset.name
  images, labels, masks = dataset.images, dataset.labels, dataset.masks

  if not isinstance(images, np.ndarray) or images.dtype != np.float32 or images.ndim != 4:
    raise DataError(
      f"{name}: images must be a float32 array [N, H, W, C], got "
      f"{_describe(images)}; convert with images.astype(np.float32)"
    )
  n = images.shape[0]
  if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.shape != (n,):
    raise DataError(
      f"{name}: labels must be an int32 array [{n}] matching the images, got {_describe(labels)}"
    )
  if not isinstance(dataset.num_classes, (int, np.integer)) or dataset.num_classes < 1:
    raise DataError(f"{name}: num_classes must be a positive int, got {dataset.num_classes!r}")
  if n and images.size:
    lo, hi = images.min(), images.max()
    if not (0.0 <= lo and hi <= 1.0):
      raise DataError(
        f"{name}: image values must be finite and in [0, 1], found range [{lo}, {hi}]; "
        "scale uint8 pixels by 1/255"
      )
  if n:
    lo, hi = labels.min(), labels.max()
    if lo < 0 or hi >= dataset.num_classes:
      raise DataError(
        f"{name}: labels must be in [0, {dataset.num_classes}), found range [{lo}, {hi}]"
      )
  if masks is not None:
    expected = images.shape[:3] + (1,)
    if not isinstance(masks, np.ndarray) or masks.dtype != np.float32 or masks.shape != expected:
      raise DataError(
        f"{name}: masks must be a float32 array {list(expected)} or None, got {_describe(masks)}"
      )
    if masks.size:
      lo, hi = masks.min(), masks.max()
      if not (0.0 <= lo and hi <= 1.0):
        raise DataError(
          f"{name}: mask values must be finite and in [0, 1], found range [{lo}, {hi}]"
        )
  return dataset


def _describe(x: object) -> str:
  if isinstance(x, np.ndarray):
    return f"{x.dtype} array of shape {list(x.shape)}"
  return type(x).__name__
