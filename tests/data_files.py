"""Raw dataset files for the data tests, written in the real distribution formats (gzip IDX with proper
headers; CIFAR-10 batch pickles of protocol 2 with bytes keys) into tmp_path, so no test touches the
network or the shared data."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from cbudget.data import _readers


# ----------------------------------------------------------------------------------------------------------
# fixture writers
# ----------------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
  """Serialises a uint8 array as IDX: big-endian magic (0x0000 08 <ndim>), sizes, row-major payload."""
  array = np.asarray(array, np.uint8)
  if magic is None:
    magic = 0x0800 | array.ndim
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  return header + array.tobytes()


def write_file(path: Path, payload: bytes) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)
  return path


def write_mnist(
  folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True
) -> tuple[Path, Path]:
  suffix = ".gz" if gz else ""
  image_stem, label_stem = _readers.MNIST_FILES[split]
  return (
    write_file(folder / (image_stem + suffix), idx_bytes(images)),
    write_file(folder / (label_stem + suffix), idx_bytes(labels)),
  )


def cifar_batch_bytes(rows: np.ndarray, labels, **extra) -> bytes:
  """A CIFAR-10 python batch: a protocol-2 pickle of a dict with bytes keys, like the distributed files."""
  batch = {
    b"batch_label": b"testing batch 1 of 1",
    b"labels": [int(y) for y in labels],
    b"data": np.asarray(rows, np.uint8),
    b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    **extra,
  }
  return pickle.dumps(batch, protocol=2)


def random_mnist(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def random_cifar_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)


def write_cifar(folder: Path, per_batch: int = 3, seed: int = 0) -> tuple[np.ndarray, ...]:
  """Writes all six batch files; returns (train rows, train labels, test rows, test labels)."""
  parts = []
  for i, name in enumerate(_readers.CIFAR_FILES["train"] + _readers.CIFAR_FILES["test"]):
    rows, labels = random_cifar_rows(per_batch, seed * 10 + i)
    write_file(folder / name, cifar_batch_bytes(rows, labels))
    parts.append((rows, labels))
  train = parts[:5]
  return (np.concatenate([r for r, _ in train]), np.concatenate([y for _, y in train]), *parts[5])


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
  """(top, left, height, width) of a rectangular mask [H, W, 1]."""
  ys, xs = np.nonzero(mask[..., 0])
  top, left, height, width = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
  assert mask[..., 0].sum() == height * width, "mask is not a rectangle"
  return top, left, height, width
