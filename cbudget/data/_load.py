"""`load`: one entry point from a dataset name and split to a validated in-memory `Dataset`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cbudget.data import _readers, _synthetic
from cbudget.data._types import DataError, Dataset, validate

DATASETS = ("mnist", "fashion_mnist", "cifar10", "shapes", "mnist_canvas", "cifar_canvas")
DEFAULT_DATASET = "shapes"
SPLITS = ("train", "test")

_REAL = ("mnist", "fashion_mnist", "cifar10")
_CANVAS_BASE = {"mnist_canvas": "mnist", "cifar_canvas": "cifar10"}


def load(
  name: str,
  split: str,
  data_dir: str | os.PathLike | None = None,
  *,
  seed: int = 0,
  num_examples: int | None = None,
) -> Dataset:
  """Loads split `split` ("train" or "test") of dataset `name` (one of `DATASETS`).

  - mnist, fashion_mnist, cifar10: read from the standard raw files in `data_dir` (or `data_dir/<name>/`,
    and for CIFAR also `data_dir/cifar-10-batches-py/` and `data_dir/cifar10/cifar-10-batches-py/`); with
    `data_dir=None`, through tensorflow-datasets. No masks. `seed` is unused.
  - shapes: generated from `seed` (no files): 4000 train / 1000 test 16x16 grayscale images, 4 classes.
  - mnist_canvas, cifar_canvas: built from MNIST / CIFAR-10 (read as above) with layouts drawn from `seed`.

  Train and test use different random streams, `(seed, 0)` and `(seed, 1)`.

  `num_examples` keeps the first N examples of the split's fixed order (no reshuffle), so a small run sees
  a prefix of the full run's data; for canvases, example i is the same whatever N is.

  Returns a Dataset with float32 images in [0, 1] (NHWC), int32 labels, and masks or None; it has passed
  `validate`. Raises DataError on any problem with the arguments or the data.
  """
  if name not in DATASETS:
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r} for {name}; choose 'train' or 'test'")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise DataError(f"seed must be a non-negative int, got {seed!r}")
  if num_examples is not None and (
    not isinstance(num_examples, (int, np.integer)) or num_examples < 1
  ):
    raise DataError(f"num_examples must be a positive int or None, got {num_examples!r}")
  split_seed = (int(seed), SPLITS.index(split))

  if name == "shapes":
    full = _synthetic.make_shapes(_synthetic.SHAPES_SPLIT_SIZES[split], split_seed, name=name)
    dataset = _take(full, num_examples, split)
  elif name in _CANVAS_BASE:
    base = _load_real(_CANVAS_BASE[name], split, data_dir, limit=None)
    _check_available(name, split, base.images.shape[0], num_examples)
    dataset = _synthetic.make_canvas_dataset(base, name, split_seed, num_examples=num_examples)
  else:
    dataset = _load_real(name, split, data_dir, limit=num_examples)
  return validate(dataset)


def _load_real(
  name: str, split: str, data_dir: str | os.PathLike | None, limit: int | None
) -> Dataset:
  """Reads a real dataset as uint8, keeps the first `limit` examples, then converts to float32."""
  if data_dir is None:
    images, labels = _readers.read_tfds(name, split)
  else:
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
      raise DataError(
        f"data_dir {folder} does not exist or is not a folder; pass --data_dir "
        f"pointing at a folder with the standard {name} files"
      )
    if name == "cifar10":
      images, labels = _readers.read_cifar10(folder, split, limit=limit)
    else:
      images, labels = _readers.read_mnist(folder, name, split)
  _check_available(name, split, images.shape[0], limit)
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  return Dataset(
    images=to_float(images), labels=labels.astype(np.int32), masks=None, num_classes=10, name=name
  )


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [0, 1] as x / 255, C-contiguous (transposed CIFAR views are laid out anew)."""
  out = images.astype(np.float32, order="C")
  out /= np.float32(255)  # in place: no second full-size temporary
  return out


def _take(dataset: Dataset, num_examples: int | None, split: str) -> Dataset:
  if num_examples is None:
    return dataset
  _check_available(dataset.name, split, dataset.images.shape[0], num_examples)
  masks = None if dataset.masks is None else dataset.masks[:num_examples]
  return dataset._replace(
    images=dataset.images[:num_examples], labels=dataset.labels[:num_examples], masks=masks
  )


def _check_available(name: str, split: str, available: int, num_examples: int | None) -> None:
  if num_examples is not None and num_examples > available:
    raise DataError(
      f"num_examples={num_examples} but {name} {split} has only {available} examples; "
      f"pass at most {available}"
    )
