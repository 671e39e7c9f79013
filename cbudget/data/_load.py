"""`load`: one entry point from a dataset name and split to a validated in-memory `Dataset`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cbudget.data import _readers, _synthetic
from cbudget.data._types import DataError, Dataset, DatasetInfo, validate

_MNIST_STATS = ((0.1307,), (0.3081,))
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
_NO_STATS = ((0.0,), (1.0,))
_CANVAS_SIDE = 28 * _synthetic.MNIST_CANVAS_GRID
_SHAPES_SIDE = _synthetic.SHAPES_IMAGE_SIZE
_SHAPES_CLASSES = len(_synthetic.SHAPE_NAMES)

# Every fact about a dataset that training, loading or evaluation needs, in one table. A canvas is
# normalised with the statistics of the dataset its images come from.
INFO: dict[str, DatasetInfo] = {
  info.name: info
  for info in (
    DatasetInfo("mnist", 10, (28, 28, 1), *_MNIST_STATS, base="mnist", has_mask=False),
    DatasetInfo("fashion_mnist", 10, (28, 28, 1), *_NO_STATS, "fashion_mnist", has_mask=False),
    DatasetInfo("cifar10", 10, (32, 32, 3), *_CIFAR10_STATS, base="cifar10", has_mask=False),
    DatasetInfo("shapes", _SHAPES_CLASSES, (_SHAPES_SIDE,) * 2 + (1,), *_NO_STATS, None, True),
    DatasetInfo("mnist_canvas", 10, (_CANVAS_SIDE,) * 2 + (1,), *_MNIST_STATS, "mnist", True),
    DatasetInfo("cifar_canvas", 10, (32, 64, 3), *_CIFAR10_STATS, base="cifar10", has_mask=True),
  )
}
DATASETS = tuple(INFO)
DEFAULT_DATASET = "shapes"
SPLITS = ("train", "test")


def info(name: str) -> DatasetInfo:
  """The facts about dataset `name` (classes, image shape, normalisation, base, masks)."""
  if name not in INFO:
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  return INFO[name]


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
  facts = info(name)
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r} for {name}; choose 'train' or 'test'")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise DataError(f"seed must be a non-negative int, got {seed!r}")
  if num_examples is not None and (
    not isinstance(num_examples, (int, np.integer)) or num_examples < 1
  ):
    raise DataError(f"num_examples must be a positive int or None, got {num_examples!r}")
  split_seed = (int(seed), SPLITS.index(split))

  if facts.base is None:
    full = _synthetic.make_shapes(_synthetic.SHAPES_SPLIT_SIZES[split], split_seed, name=name)
    dataset = _take(full, num_examples, split)
  elif facts.base != name:
    base = _load_real(facts.base, split, data_dir, limit=None)
    _check_available(name, split, base.images.shape[0], num_examples)
    dataset = _synthetic.make_canvas_dataset(base, name, split_seed, num_examples=num_examples)
  else:
    dataset = _load_real(name, split, data_dir, limit=num_examples)
  return _check_facts(validate(dataset), facts)


def _check_facts(dataset: Dataset, facts: DatasetInfo) -> Dataset:
  """The loaded data must agree with its row of `INFO` (what models are built from)."""
  found = DatasetInfo(
    facts.name,
    dataset.num_classes,
    tuple(dataset.images.shape[1:]),
    facts.mean,
    facts.std,
    facts.base,
    dataset.masks is not None,
  )
  if found != facts:
    raise DataError(f"{facts.name}: the data ({found}) disagrees with cbudget.data.INFO ({facts})")
  return dataset


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
    images=to_float(images),
    labels=labels.astype(np.int32),
    masks=None,
    num_classes=INFO[name].num_classes,
    name=name,
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
