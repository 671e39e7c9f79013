"""Tests for cbudget.data._readers: the MNIST (IDX) and CIFAR-10 (pickle) readers, and fuzzing them."""

from __future__ import annotations

import gzip
import pickle
import pickletools
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbudget import data
from cbudget.data import DataError, _readers
from tests.data_files import (
  idx_bytes,
  write_file,
  write_mnist,
  cifar_batch_bytes,
  random_mnist,
  random_cifar_rows,
  write_cifar,
)


# ----------------------------------------------------------------------------------------------------------
# MNIST reader
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_round_trip(tmp_path, gz, split):
  images, labels = random_mnist(5, seed=1)
  write_mnist(tmp_path, split, images, labels, gz=gz)
  ds = data.load("mnist", split, tmp_path)
  assert ds.images.dtype == np.float32 and ds.images.shape == (5, 28, 28, 1)
  assert ds.labels.dtype == np.int32 and ds.labels.shape == (5,)
  np.testing.assert_array_equal(ds.images[..., 0], images.astype(np.float32) / 255)
  np.testing.assert_array_equal(ds.labels, labels)
  assert ds.masks is None and ds.num_classes == 10 and ds.name == "mnist"


def test_mnist_found_in_named_subfolder_and_num_examples(tmp_path):
  images, labels = random_mnist(6, seed=2)
  write_mnist(tmp_path / "fashion_mnist", "train", images, labels)
  ds = data.load("fashion_mnist", "train", str(tmp_path), num_examples=4)
  assert ds.name == "fashion_mnist"
  np.testing.assert_array_equal(ds.images[..., 0], images[:4].astype(np.float32) / 255)
  np.testing.assert_array_equal(ds.labels, labels[:4])
  with pytest.raises(DataError, match="num_examples=7 but fashion_mnist train has only 6"):
    data.load("fashion_mnist", "train", tmp_path, num_examples=7)


def test_mnist_missing_files(tmp_path):
  with pytest.raises(
    DataError, match=r"no MNIST train files in .*train-images-idx3-ubyte\.gz.*--data_dir"
  ):
    data.load("mnist", "train", tmp_path)
  with pytest.raises(DataError, match="does not exist"):
    data.load("mnist", "train", tmp_path / "nowhere")
  images, labels = random_mnist(2, seed=0)
  _, labels_path = write_mnist(tmp_path, "test", images, labels)
  labels_path.unlink()
  with pytest.raises(
    DataError, match=r"found t10k-images-idx3-ubyte\.gz but not t10k-labels-idx1-ubyte"
  ):
    data.load("mnist", "test", tmp_path)


def test_mnist_bad_magic(tmp_path):
  images, labels = random_mnist(2, seed=0)
  images_path, _ = write_mnist(tmp_path, "train", images, labels)
  write_file(images_path, idx_bytes(images, magic=0))
  with pytest.raises(
    DataError,
    match=r"train-images-idx3-ubyte\.gz: bad magic number 0x00000000, "
    r"expected 0x00000803",
  ):
    data.load("mnist", "train", tmp_path)
  # Swapped files: the label magic where images are expected.
  write_file(images_path, idx_bytes(labels))
  with pytest.raises(DataError, match="bad magic number 0x00000801, expected 0x00000803"):
    data.load("mnist", "train", tmp_path)


@pytest.mark.parametrize("which", ["images", "labels"])
def test_mnist_truncated_or_padded_payload(tmp_path, which):
  images, labels = random_mnist(3, seed=0)
  paths = dict(zip(["images", "labels"], write_mnist(tmp_path, "train", images, labels)))
  payload = idx_bytes(images if which == "images" else labels)
  write_file(paths[which], payload[:-1])
  with pytest.raises(DataError, match=rf"{paths[which].name}: truncated"):
    data.load("mnist", "train", tmp_path)
  write_file(paths[which], payload + b"\0")
  with pytest.raises(DataError, match=rf"{paths[which].name}: 1 unexpected bytes"):
    data.load("mnist", "train", tmp_path)


def test_mnist_count_mismatch(tmp_path):
  images, labels = random_mnist(5, seed=0)
  write_mnist(tmp_path, "train", images, labels[:4])
  with pytest.raises(
    DataError,
    match=r"train-images-idx3-ubyte\.gz: holds 5 images but "
    r"train-labels-idx1-ubyte\.gz holds 4 labels",
  ):
    data.load("mnist", "train", tmp_path)


def test_mnist_wrong_image_size(tmp_path):
  _, labels = random_mnist(2, seed=0)
  write_mnist(tmp_path, "train", np.zeros((2, 27, 28), np.uint8), labels)
  with pytest.raises(
    DataError, match=r"train-images-idx3-ubyte\.gz: images are 27x28, expected 28x28"
  ):
    data.load("mnist", "train", tmp_path)


def test_mnist_bad_gzip(tmp_path):
  images, labels = random_mnist(2, seed=0)
  images_path, _ = write_mnist(tmp_path, "train", images, labels)
  images_path.write_bytes(b"definitely not gzip")
  with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read gzip file"):
    data.load("mnist", "train", tmp_path)
  images_path.write_bytes(gzip.compress(idx_bytes(images))[:-12])  # cut inside the deflate stream
  with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read gzip file"):
    data.load("mnist", "train", tmp_path)


def test_mnist_label_out_of_range(tmp_path):
  images, labels = random_mnist(3, seed=0)
  labels[1] = 10
  write_mnist(tmp_path, "test", images, labels)
  with pytest.raises(
    DataError,
    match=r"t10k-labels-idx1-ubyte\.gz: label 10 at index 1 is out of "
    r"range 0\.\.9",
  ):
    data.load("mnist", "test", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 reader
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [".", "cifar-10-batches-py", "cifar10/cifar-10-batches-py"])
def test_cifar_round_trip(tmp_path, layout):
  train_rows, train_labels, test_rows, test_labels = write_cifar(tmp_path / layout)
  for split, rows, labels in [
    ("train", train_rows, train_labels),
    ("test", test_rows, test_labels),
  ]:
    ds = data.load("cifar10", split, tmp_path)
    assert ds.images.dtype == np.float32 and ds.images.shape == (len(rows), 32, 32, 3)
    assert ds.images.flags.c_contiguous
    assert ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.labels, labels)
    expected = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255
    np.testing.assert_array_equal(ds.images, expected)


def test_cifar_rows_are_channel_first(tmp_path):
  rows = np.zeros((1, 3072), np.uint8)
  # Pixel (y=1, x=2) sits at offset 1 * 32 + 2 of each 1024-value plane: R, then G, then B.
  rows[0, 0 * 1024 + 34], rows[0, 1 * 1024 + 34], rows[0, 2 * 1024 + 34] = 255, 102, 51
  write_file(tmp_path / "test_batch", cifar_batch_bytes(rows, [7]))
  ds = data.load("cifar10", "test", tmp_path)
  np.testing.assert_array_equal(ds.images[0, 1, 2], np.float32([1.0, 0.4, 0.2]))
  assert ds.images.sum() == np.float32(1.6)
  assert ds.labels.tolist() == [7]


def test_cifar_accepts_str_keys(tmp_path):
  rows, labels = random_cifar_rows(2, 0)
  write_file(
    tmp_path / "test_batch", pickle.dumps({"data": rows, "labels": labels.tolist()}, protocol=2)
  )
  np.testing.assert_array_equal(data.load("cifar10", "test", tmp_path).labels, labels)


def test_cifar_num_examples_reads_only_needed_batches(tmp_path):
  train_rows, train_labels, _, _ = write_cifar(tmp_path, per_batch=3)
  (tmp_path / "data_batch_5").write_bytes(b"corrupt, but never read")
  ds = data.load("cifar10", "train", tmp_path, num_examples=4)
  np.testing.assert_array_equal(ds.labels, train_labels[:4])
  with pytest.raises(DataError, match="data_batch_5: cannot unpickle"):
    data.load("cifar10", "train", tmp_path)


def test_cifar_missing_files(tmp_path):
  with pytest.raises(DataError, match=r"no CIFAR-10 test files in .*test_batch.*--data_dir"):
    data.load("cifar10", "test", tmp_path)
  write_cifar(tmp_path)
  (tmp_path / "data_batch_3").unlink()
  with pytest.raises(DataError, match="missing data_batch_3"):
    data.load("cifar10", "train", tmp_path)


@pytest.mark.parametrize(
  "case, message",
  [
    ("label_out_of_range", "label 10 at index 1 is out of range 0..9"),
    ("count_mismatch", r"b'labels' must hold 2 integers"),
    ("wrong_width", r"b'data' must be a uint8 array \[n, 3072\]"),
    ("wrong_dtype", r"b'data' must be a uint8 array"),
    ("not_a_dict", "expected a dict"),
    ("no_labels", r"no b'labels' key"),
    ("not_a_pickle", "cannot unpickle"),
    ("truncated", "cannot unpickle"),
  ],
)
def test_cifar_bad_batches(tmp_path, case, message):
  rows, labels = random_cifar_rows(2, 0)
  payload = {
    "label_out_of_range": lambda: cifar_batch_bytes(rows, [3, 10]),
    "count_mismatch": lambda: cifar_batch_bytes(rows, [1, 2, 3]),
    "wrong_width": lambda: cifar_batch_bytes(rows[:, :3000], labels),
    "wrong_dtype": lambda: pickle.dumps(
      {b"data": rows.astype(np.int64), b"labels": [1, 2]}, protocol=2
    ),
    "not_a_dict": lambda: pickle.dumps([rows, labels.tolist()], protocol=2),
    "no_labels": lambda: pickle.dumps({b"data": rows}, protocol=2),
    "not_a_pickle": lambda: b"\x00\x01 no pickle here",
    "truncated": lambda: cifar_batch_bytes(rows, labels)[:-100],
  }[case]()
  write_file(tmp_path / "test_batch", payload)
  with pytest.raises(DataError, match=f"test_batch: .*{message}"):
    data.load("cifar10", "test", tmp_path)


class _RunsCode:
  """Pickles into a call of os.system: what a malicious "dataset" file would contain."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    import os

    return os.system, (f"touch {self.marker}",)


def test_cifar_pickle_with_disallowed_class_is_refused(tmp_path):
  marker = tmp_path / "code_ran"
  rows, labels = random_cifar_rows(2, 0)
  write_file(tmp_path / "test_batch", cifar_batch_bytes(rows, labels, payload=_RunsCode(marker)))
  with pytest.raises(
    DataError,
    match=r"test_batch: the pickle refers to (posix|nt|os)\.system, which is "
    r"not allowed",
  ):
    data.load("cifar10", "test", tmp_path)
  assert not marker.exists()


def test_codecs_encode_only_allows_latin1(tmp_path):
  # Protocol-2 pickles from Python 3 store bytes as _codecs.encode(str, "latin1"); other codecs are refused.
  # encode("abc", "base64"), written out by hand: GLOBAL _codecs.encode, two BINUNICODE args, REDUCE.
  evil = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R."
  with pytest.raises(DataError, match="f: cannot unpickle .*only allowed as encode"):
    _readers.unpickle_restricted(evil, "f")
  assert _readers.unpickle_restricted(pickle.dumps(b"\xff\x00", protocol=2), "f") == b"\xff\x00"


def test_corrupt_dtype_state_is_an_error_not_a_crash(tmp_path):
  # Regression (found by fuzzing): turning the opcode after the dtype's byte order '|' into BININT, which
  # swallows the next 4 bytes, gave a state tuple that crashed numpy's dtype.__setstate__ (segfault).
  valid = cifar_batch_bytes(*random_cifar_rows(2, 0))
  ops = list(pickletools.genops(valid))
  where = next(ops[i + 1][2] for i, (_, arg, _) in enumerate(ops) if arg == "|")
  corrupt = valid[:where] + b"J" + valid[where + 1 :]
  write_file(tmp_path / "test_batch", corrupt)
  with pytest.raises(DataError, match="test_batch: cannot unpickle .*dtype state"):
    data.load("cifar10", "test", tmp_path)


def test_protocol5_bytearray_is_refused():
  # BYTEARRAY8 with a huge length would make the C unpickler allocate it before reading; the opcode scan
  # stops at the length check (only 1 byte follows) or, for a well-formed one, at the opcode itself.
  bomb = b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b"."
  with pytest.raises(DataError, match="data_batch_1: cannot unpickle .*1099511627776 bytes"):
    _readers.unpickle_restricted(bomb, "data_batch_1")
  with pytest.raises(DataError, match="data_batch_1: the pickle uses opcode BYTEARRAY8"):
    _readers.unpickle_restricted(pickle.dumps(bytearray(b"ab"), protocol=5), "data_batch_1")


def test_numpy_pickles_of_other_layouts_still_load():
  # Fortran order, a big-endian float dtype and a 0-d array all rebuild exactly through the stubs.
  for array in [
    np.asfortranarray(np.arange(6, dtype=np.uint8).reshape(2, 3)),
    np.arange(3, dtype=">f8"),
    np.array(5, np.int32),
  ]:
    for protocol in (2, 4):
      out = _readers.unpickle_restricted(pickle.dumps({b"a": [array]}, protocol=protocol), "f")[
        b"a"
      ][0]
      assert out.dtype == array.dtype and out.shape == array.shape
      np.testing.assert_array_equal(out, array)


# ----------------------------------------------------------------------------------------------------------
# fuzzing: the readers of untrusted bytes raise DataError or return valid data, nothing else
# ----------------------------------------------------------------------------------------------------------

_FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw, valid: bytes, hot: int = 64):
  """`valid` with a few byte edits, mostly near the start and end where the structure is, then maybe cut."""
  out = bytearray(valid)
  n = len(out)
  for _ in range(draw(st.integers(0, 4))):
    region = draw(st.sampled_from(["head", "tail", "any"]))
    lo, hi = {"head": (0, min(hot, n)), "tail": (max(0, n - hot), n), "any": (0, n)}[region]
    out[draw(st.integers(lo, hi - 1))] = draw(st.integers(0, 255))
  if draw(st.booleans()):
    out = out[: draw(st.integers(0, len(out)))]
  return bytes(out)


def _read_in_tmp(filename: str, payload: bytes, reader):
  with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / filename
    path.write_bytes(payload)
    try:
      return reader(path)
    except DataError as e:
      assert filename in str(e) and "\n" not in str(e)
      return None


_VALID_IMAGES = idx_bytes(random_mnist(2, 0)[0])
_VALID_LABELS = idx_bytes(np.arange(6, dtype=np.uint8))


@_FUZZ
@given(
  st.one_of(st.binary(max_size=64), mutated(_VALID_IMAGES, hot=24), mutated(_VALID_LABELS, hot=24)),
  st.booleans(),
)
def test_fuzz_idx_readers(payload, gz):
  suffix = ".gz" if gz else ""
  if gz and payload[:1] != b"\x1f":  # gzip about half the time, so both layers are exercised
    payload = gzip.compress(payload)
  images = _read_in_tmp("train-images-idx3-ubyte" + suffix, payload, _readers.read_mnist_images)
  if images is not None:
    assert images.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == (28, 28)
  labels = _read_in_tmp("train-labels-idx1-ubyte" + suffix, payload, _readers.read_mnist_labels)
  if labels is not None:
    assert labels.dtype == np.uint8 and labels.ndim == 1 and (labels <= 9).all()


@_FUZZ
@given(st.binary(max_size=64), st.booleans())
def test_fuzz_gzip_layer(payload, mutate_valid_gzip):
  if mutate_valid_gzip:  # a valid gzip stream with its tail overwritten by the random bytes
    valid = gzip.compress(_VALID_LABELS)
    payload = valid[: max(10, len(valid) - len(payload))] + payload
  _read_in_tmp("t10k-labels-idx1-ubyte.gz", payload, _readers.read_mnist_labels)


_VALID_CIFAR = cifar_batch_bytes(*random_cifar_rows(2, 0))


@_FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(_VALID_CIFAR, hot=300)))
def test_fuzz_cifar_reader(payload):
  result = _read_in_tmp("data_batch_1", payload, _readers.read_cifar10_batch)
  if result is not None:
    rows, labels = result
    assert rows.dtype == np.uint8 and rows.ndim == 2 and rows.shape[1] == 3072
    assert labels.shape == (rows.shape[0],) and ((labels >= 0) & (labels <= 9)).all()
