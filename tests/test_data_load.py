"""Tests for cbudget.data._load: the dataset facts table, `load`'s arguments, the tfds fallback,
validation, and canvases built from files."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cbudget import data
from cbudget.data import DataError, Dataset
from tests.data_files import write_mnist, random_mnist, write_cifar


# ----------------------------------------------------------------------------------------------------------
# load: arguments, tfds fallback, validate
# ----------------------------------------------------------------------------------------------------------


def test_public_constants():
  assert data.DATASETS == (
    "mnist",
    "fashion_mnist",
    "cifar10",
    "shapes",
    "mnist_canvas",
    "cifar_canvas",
  )
  assert data.DEFAULT_DATASET == "shapes"


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(name="imagenet", split="train"), "unknown dataset 'imagenet'"),
    (dict(name="shapes", split="validation"), "unknown split 'validation'"),
    (dict(name="shapes", split="train", num_examples=0), "num_examples must be a positive int"),
    (
      dict(name="shapes", split="train", num_examples=4001),
      "num_examples=4001 but shapes train has only 4000",
    ),
    (dict(name="shapes", split="train", seed=-1), "seed must be a non-negative int"),
  ],
)
def test_load_argument_errors(kwargs, message):
  with pytest.raises(DataError, match=message):
    data.load(**kwargs)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "mnist_canvas"])
def test_load_without_data_dir_fails_clearly_when_tfds_is_unavailable(monkeypatch, name):
  monkeypatch.setitem(
    sys.modules, "tensorflow_datasets", None
  )  # makes `import tensorflow_datasets` fail
  with pytest.raises(
    DataError,
    match=r"cannot load \w+ train through tensorflow-datasets \(\w*Error.*"
    r"pass --data_dir",
  ):
    data.load(name, "train")


class _FakeSource(list):
  def __getitems__(self, keys):
    return [self[k] for k in keys]


def test_load_without_data_dir_uses_tfds_data_source(monkeypatch):
  images, labels = random_mnist(3, seed=4)
  records = _FakeSource(
    {"image": x[..., None], "label": np.int64(y)} for x, y in zip(images, labels)
  )
  calls = []

  def data_source(name, split):
    calls.append((name, split))
    return records

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", type(sys)("tensorflow_datasets"))
  monkeypatch.setattr(sys.modules["tensorflow_datasets"], "data_source", data_source, raising=False)
  ds = data.load("fashion_mnist", "test", num_examples=2)
  assert calls == [("fashion_mnist", "test")]
  np.testing.assert_array_equal(ds.images[..., 0], images[:2] / np.float32(255))
  np.testing.assert_array_equal(ds.labels, labels[:2])


def test_validate():
  images = np.zeros((2, 4, 4, 1), np.float32)
  labels = np.array([0, 1], np.int32)
  ok = Dataset(images, labels, np.ones_like(images), 2, "toy")
  assert data.validate(ok) is ok
  bad_images = images.copy()
  bad_images[1, 2, 3, 0] = np.nan
  cases = [
    (ok._replace(images=bad_images), "finite and in \\[0, 1\\]"),
    (ok._replace(images=images + 2), "finite and in \\[0, 1\\]"),
    (ok._replace(images=images.astype(np.float64)), "float32"),
    (ok._replace(labels=labels.astype(np.int64)), "int32"),
    (ok._replace(labels=np.array([0, 2], np.int32)), "labels must be in \\[0, 2\\)"),
    (ok._replace(masks=np.ones((2, 4, 4, 3), np.float32)), "masks must be"),
    (ok._replace(masks=np.full((2, 4, 4, 1), 2, np.float32)), "mask values"),
  ]
  for dataset, message in cases:
    with pytest.raises(DataError, match=f"toy: .*{message}"):
      data.validate(dataset)


def test_canvases_through_load(tmp_path):
  images, labels = random_mnist(5, seed=3)
  write_mnist(tmp_path / "mnist", "test", images, labels)
  write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py", per_batch=2)
  m = data.load("mnist_canvas", "test", tmp_path, seed=1, num_examples=3)
  assert m.images.shape == (3, 56, 56, 1) and m.labels.tolist() == labels[:3].tolist()
  assert m.masks.shape == (3, 56, 56, 1) and m.masks[0].sum() == 28 * 28
  c = data.load("cifar_canvas", "train", tmp_path, seed=1)
  assert c.images.shape == (10, 32, 64, 3) and c.masks.shape == (10, 32, 64, 1)
  with pytest.raises(DataError, match="num_examples=6 but mnist_canvas test has only 5"):
    data.load("mnist_canvas", "test", tmp_path, num_examples=6)


def test_dataset_facts():
  assert set(data.INFO) == set(data.DATASETS)
  assert (data.info("mnist").mean, data.info("mnist").std) == ((0.1307,), (0.3081,))
  assert (data.info("cifar10").mean, data.info("cifar10").std) == (
    (0.4914, 0.4822, 0.4465),
    (0.2471, 0.2435, 0.2616),
  )
  for canvas, base in (("mnist_canvas", "mnist"), ("cifar_canvas", "cifar10")):
    facts = data.info(canvas)
    assert facts.base == base and facts.has_mask
    # A canvas is normalised with the statistics of the images it is made of.
    assert (facts.mean, facts.std) == (data.info(base).mean, data.info(base).std)
  assert data.info("shapes").base is None
  with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
    data.info("imagenet")


def test_loaded_data_agrees_with_its_facts(monkeypatch):
  ds = data.load("shapes", "test", num_examples=3)
  facts = data.info("shapes")
  assert ds.images.shape[1:] == facts.shape and ds.num_classes == facts.num_classes
  assert (ds.masks is not None) == facts.has_mask
  monkeypatch.setitem(data.INFO, "shapes", facts._replace(num_classes=5))
  with pytest.raises(DataError, match="disagrees with cbudget.data.INFO"):
    data.load("shapes", "test", num_examples=3)
