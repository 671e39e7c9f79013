"""Tests for cbudget.data: raw-file readers, generated datasets, batching and augmentation.

Fixture files are written in the real distribution formats (gzip IDX with proper headers; CIFAR-10 batch
pickles of protocol 2 with bytes keys) into tmp_path, so no test touches the network or the shared data.
"""

from __future__ import annotations

import gzip
import itertools
import pickle
import pickletools
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbudget import data
from cbudget.data import DataError, Dataset, _readers, _synthetic

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


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
  ys, xs = np.nonzero(mask[..., 0])
  top, left, height, width = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
  assert mask[..., 0].sum() == height * width, "mask is not a rectangle"
  return top, left, height, width


def test_mnist_canvas_places_digit_at_mask():
  base = small_base(8, 28, 28, 1)
  ds = data.make_canvas_dataset(base, "mnist_canvas", seed=5)
  assert ds.images.shape == (8, 56, 56, 1) and ds.masks.shape == (8, 56, 56, 1)
  assert ds.name == "mnist_canvas" and ds.num_classes == 10
  np.testing.assert_array_equal(ds.labels, base.labels)
  data.validate(ds)
  positions = set()
  for i in range(8):
    top, left, height, width = _mask_box(ds.masks[i])
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
    top, left, height, width = _mask_box(ds.masks[i])
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
    assert _mask_box(ds.masks[i])[2:] == (3, 3)
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


def test_canvases_through_load(tmp_path):
  images, labels = random_mnist(5, seed=3)
  write_mnist(tmp_path / "mnist", "test", images, labels)
  write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py", per_batch=2)
  m = data.load("mnist_canvas", "test", tmp_path, seed=1, num_examples=3)
  assert m.images.shape == (3, 56, 56, 1) and m.labels.tolist() == labels[:3].tolist()
  top, left, _, _ = _mask_box(m.masks[0])
  np.testing.assert_array_equal(
    m.images[0, top : top + 28, left : left + 28, 0], images[0] / np.float32(255)
  )
  c = data.load("cifar_canvas", "train", tmp_path, seed=1)
  assert c.images.shape == (10, 32, 64, 3) and c.masks.shape == (10, 32, 64, 1)
  with pytest.raises(DataError, match="num_examples=6 but mnist_canvas test has only 5"):
    data.load("mnist_canvas", "test", tmp_path, num_examples=6)


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
