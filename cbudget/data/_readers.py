"""Readers for the raw distribution files of MNIST, Fashion-MNIST and CIFAR-10, and the TFDS fallback.

Every reader returns raw uint8 pixels (NHWC) and integer labels; scaling to float32 happens in `load`, after
`num_examples` has cut the arrays down, so that small runs never pay for converting a whole split.

All failures of the input (missing files, corrupt or truncated files, wrong formats) raise `DataError` with a
one-line message that starts with the offending file name. Readers of untrusted bytes (the IDX parser and the
CIFAR unpickler) are written so that *any* byte string gives either valid arrays or a DataError; the tests
fuzz them to check this.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import pickletools
import zlib
from pathlib import Path

import numpy as np

from cbudget.data._types import DataError

# ----------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX files)
# ----------------------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 0x00000803  # uint8 data (0x08), 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # uint8 data (0x08), 1 dimension
MNIST_IMAGE_SHAPE = (28, 28)

# Stems of the standard file names; each may be stored gzipped (".gz", as distributed) or uncompressed.
MNIST_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DISPLAY_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


def read_file_bytes(path: Path) -> bytes:
  """Returns the contents of `path`, gunzipped when the name ends in ".gz".

  The suffix, not content sniffing, decides: a ".gz" file that is not gzip data is reported as such,
  which is the actual problem (typically a truncated or failed download).
  """
  path = Path(path)
  gzipped = path.name.endswith(".gz")
  try:
    if gzipped:
      with gzip.open(path, "rb") as f:
        return f.read()
    return path.read_bytes()
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    what = "gzip file" if gzipped else "file"
    raise DataError(
      f"{path.name}: cannot read {what} ({type(e).__name__}: {_first_line(e)}); re-download it"
    ) from e


def parse_idx(data: bytes, filename: str, expected_magic: int, description: str) -> np.ndarray:
  """Parses an IDX byte string whose magic number must equal `expected_magic`.

  IDX layout: 4-byte big-endian magic (two zero bytes, a type code, the number of dimensions), then one
  4-byte big-endian size per dimension, then the row-major payload. Only uint8 payloads (type 0x08) are
  used by MNIST, so `expected_magic` pins both the type and the rank. The payload length must equal the
  product of the sizes exactly: shorter means a truncated file, longer means it is not the file we think.

  Returns a read-only uint8 view of `data` with the header's shape.
  """
  if len(data) < 4:
    raise DataError(
      f"{filename}: only {len(data)} bytes, too short for an IDX header; "
      f"is this an {description} file?"
    )
  magic = int.from_bytes(data[:4], "big")
  if magic != expected_magic:
    raise DataError(
      f"{filename}: bad magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
      f"(IDX uint8 {description}); is this an {description} file?"
    )
  ndim = data[3]
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise DataError(
      f"{filename}: truncated IDX header ({len(data)} of {header_len} bytes); re-download it"
    )
  dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  payload_len = len(data) - header_len
  expected_len = math.prod(dims)
  if payload_len < expected_len:
    raise DataError(
      f"{filename}: truncated: the header promises {expected_len} bytes of data "
      f"(shape {list(dims)}) but only {payload_len} follow; re-download it"
    )
  if payload_len > expected_len:
    raise DataError(
      f"{filename}: {payload_len - expected_len} unexpected bytes after the "
      f"{expected_len} bytes of data the header promises (shape {list(dims)}); "
      f"is this an {description} file?"
    )
  return np.frombuffer(data, np.uint8, count=expected_len, offset=header_len).reshape(dims)


def read_mnist_images(path: Path) -> np.ndarray:
  """Reads an MNIST-format image file into uint8 [N, 28, 28]."""
  path = Path(path)
  images = parse_idx(read_file_bytes(path), path.name, IDX_IMAGES_MAGIC, "MNIST image")
  if images.shape[1:] != MNIST_IMAGE_SHAPE:
    raise DataError(
      f"{path.name}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28; "
      "is this an MNIST image file?"
    )
  return images


def read_mnist_labels(path: Path, num_classes: int = 10) -> np.ndarray:
  """Reads an MNIST-format label file into uint8 [N], checking every label is below `num_classes`."""
  path = Path(path)
  labels = parse_idx(read_file_bytes(path), path.name, IDX_LABELS_MAGIC, "MNIST label")
  if labels.size and labels.max() >= num_classes:
    bad = int(np.argmax(labels >= num_classes))
    raise DataError(
      f"{path.name}: label {labels[bad]} at index {bad} is out of range "
      f"0..{num_classes - 1}; is this an MNIST label file?"
    )
  return labels


def find_mnist_files(data_dir: Path, name: str, split: str) -> tuple[Path, Path]:
  """Finds the (images, labels) files of `split` in `data_dir` or `data_dir/<name>/`.

  Both files must come from the same folder, so a stray file in `data_dir` cannot pair up with its
  partner in the subfolder. Within a folder the gzipped name is preferred over the uncompressed one.
  """
  display = _DISPLAY_NAMES[name]
  stems = MNIST_FILES[split]
  folders = [data_dir, data_dir / name]
  for folder in folders:
    found = [_find_variant(folder, stem) for stem in stems]
    if all(found):
      return found[0], found[1]
    if any(found):
      have, missing = (found[0], stems[1]) if found[0] else (found[1], stems[0])
      raise DataError(
        f"{folder}: found {have.name} but not {missing}.gz (or {missing}); "
        f"put both {display} {split} files in the same folder"
      )
  where = " or ".join(str(f) for f in folders)
  raise DataError(
    f"no {display} {split} files in {where}: expected {stems[0]}.gz and {stems[1]}.gz "
    f"(or the uncompressed names without .gz); pass --data_dir pointing at a folder with the "
    f"standard {display} files"
  )


def read_mnist(data_dir: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads MNIST or Fashion-MNIST (same format) from `data_dir`: uint8 images [N, 28, 28, 1], labels [N]."""
  images_path, labels_path = find_mnist_files(Path(data_dir), name, split)
  images = read_mnist_images(images_path)
  labels = read_mnist_labels(labels_path)
  if images.shape[0] != labels.shape[0]:
    raise DataError(
      f"{images_path.name}: holds {images.shape[0]} images but {labels_path.name} holds "
      f"{labels.shape[0]} labels; the two files must come from the same {split} split"
    )
  return images[..., None], labels


def _find_variant(folder: Path, stem: str) -> Path | None:
  for filename in (stem + ".gz", stem):
    if (folder / filename).is_file():
      return folder / filename
  return None


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)
# ----------------------------------------------------------------------------------------------------------

CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR_ROW_LEN = 3 * 32 * 32
CIFAR_SUBDIRS = (".", "cifar-10-batches-py", "cifar10/cifar-10-batches-py")


class _DtypeStub:
  """Stands in for `numpy.dtype` while unpickling: plain numeric dtypes only, state checked in Python.

  numpy's own `dtype.__setstate__` trusts its input: a corrupt state tuple (found by fuzzing: an int where
  None belongs) crashes the interpreter. The stubs rebuild only what a data file needs, from validated
  pieces, so no untrusted value reaches numpy's C-level unpickling code.
  """

  # No bool: arbitrary payload bytes would make invalid bools.
  _CODES = frozenset("i1 u1 i2 u2 i4 u4 i8 u8 f2 f4 f8".split())
  dtype: np.dtype | None = None  # stays None for an instance made without __init__ (NEWOBJ)

  def __init__(self, code: object, align: object = False, copy: object = True):
    code = (
      code.decode("latin1") if isinstance(code, bytes) else code
    )  # Python 2 str arrive as bytes
    if not isinstance(code, str) or code not in self._CODES:
      raise pickle.UnpicklingError(f"dtype {code!r} is not a plain numeric dtype")
    self.dtype = np.dtype(code)

  def __setstate__(self, state: object) -> None:
    # numpy's layout: (version, byte order, subarray, names, fields, elsize, alignment, flags
    # [, metadata]).
    order = state[1] if isinstance(state, tuple) and len(state) in (8, 9) else None
    order = order.decode("latin1") if isinstance(order, bytes) else order
    if (
      order not in ("<", ">", "|", "=")
      or any(x is not None for x in state[2:5])
      or self.dtype is None
    ):
      raise pickle.UnpicklingError("dtype state is not that of a plain numeric dtype")
    if order in "<>":
      self.dtype = self.dtype.newbyteorder(order)


_NDARRAY = (
  object()
)  # what the global numpy.ndarray resolves to: only a marker for _ArrayStub, not callable


class _ArrayStub:
  """Stands in for `numpy.core.multiarray._reconstruct(numpy.ndarray, shape, typecode)` while unpickling.

  The array itself is built in `__setstate__` (pickle's BUILD) with `np.frombuffer` from a byte string
  whose length is checked against shape and dtype; `_materialize` then swaps each stub for its array.
  """

  array: np.ndarray | None = None

  def __init__(self, subtype: object, shape: object, typecode: object):
    if subtype is not _NDARRAY:
      raise pickle.UnpicklingError("_reconstruct may only build numpy.ndarray")

  def __setstate__(self, state: object) -> None:
    # numpy's layout: ([version,] shape, dtype, is_fortran, raw data).
    if not isinstance(state, tuple) or len(state) not in (4, 5):
      raise pickle.UnpicklingError("ndarray state is not a 4- or 5-tuple")
    shape, dtype, fortran, raw = state[-4:]
    if not (
      isinstance(shape, tuple)
      and len(shape) <= 32
      and all(type(d) is int and d >= 0 for d in shape)
    ):
      raise pickle.UnpicklingError(f"bad ndarray shape {shape!r:.60}")
    if not (isinstance(dtype, _DtypeStub) and dtype.dtype is not None):
      raise pickle.UnpicklingError("ndarray dtype is not a plain numeric dtype")
    if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dtype.dtype.itemsize:
      expected = math.prod(shape) * dtype.dtype.itemsize
      raise pickle.UnpicklingError(f"ndarray data is not {expected} bytes")
    self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if fortran else "C")


def _materialize(obj: object) -> object:
  """Replaces every _ArrayStub in nested dicts, lists and tuples by its array (cycles: RecursionError)."""
  if isinstance(obj, _ArrayStub):
    if obj.array is None:
      raise pickle.UnpicklingError("ndarray without data (no BUILD)")
    return obj.array
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
  """Replaces `_codecs.encode`, which Python 3 pickles of protocol <= 2 use to store `bytes` objects.

  Only the latin-1 round trip that pickle emits is allowed; a general codec lookup by name is more power
  than a data file needs.
  """
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(
      f"_codecs.encode is only allowed as encode(str, 'latin1'), got "
      f"encode({type(text).__name__}, {encoding!r})"
    )
  return text.encode("latin1")


_ALLOWED_GLOBALS = {
  (
    "numpy.core.multiarray",
    "_reconstruct",
  ): _ArrayStub,  # written by numpy 1 (and Python 2 cPickle)
  ("numpy._core.multiarray", "_reconstruct"): _ArrayStub,  # written by numpy 2
  ("numpy", "ndarray"): _NDARRAY,
  ("numpy", "dtype"): _DtypeStub,
  ("_codecs", "encode"): _latin1_encode,  # bytes pickled by Python 3 with protocol 2
}


class _RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that can rebuild numpy arrays and plain containers, and nothing else.

  `pickle.load` imports and calls whatever global a file names, so a malicious "dataset" could run
  arbitrary code. Every global goes through `find_class`, which here resolves only the names numpy's array
  pickles use, and resolves them to validating stand-ins (`_ArrayStub`, `_DtypeStub`) rather than numpy's
  own functions, since those crash on corrupt input.
  """

  def __init__(self, file: io.BufferedIOBase, filename: str):
    # encoding="bytes": the CIFAR files are Python 2 pickles whose str objects (dict keys) are byte
    # strings.
    super().__init__(file, encoding="bytes")
    self._filename = filename

  def find_class(self, module: str, name: str) -> object:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise DataError(
        f"{self._filename}: the pickle refers to {module}.{name}, which is not allowed "
        "(only numpy arrays and plain containers are read, because unpickling arbitrary "
        "objects can run code); is this a CIFAR-10 python batch file?"
      ) from None


# Protocol-5 buffer opcodes. BYTEARRAY8 makes the C unpickler allocate the (untrusted) 8-byte length before
# reading, so a corrupt file can request terabytes; the out-of-band buffer opcodes have no use in data files.
_REFUSED_OPCODES = frozenset({"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER"})


def unpickle_restricted(data: bytes, filename: str) -> object:
  """Unpickles `data` with `_RestrictedUnpickler`; every failure becomes a DataError naming `filename`.

  The opcode stream is first walked with `pickletools.genops`, which executes nothing and reads every
  argument from `data` itself (so its memory use is bounded by the file size), to refuse the opcodes in
  `_REFUSED_OPCODES` before the real unpickler sees them.
  """
  try:
    for opcode, _, position in pickletools.genops(data):
      if opcode.name in _REFUSED_OPCODES:
        raise DataError(
          f"{filename}: the pickle uses opcode {opcode.name} at byte {position}, which "
          "is not allowed in data files; is this an uncorrupted CIFAR-10 python batch "
          "file?"
        )
    return _materialize(_RestrictedUnpickler(io.BytesIO(data), filename).load())
  except DataError:
    raise
  except Exception as e:  # noqa: BLE001 -- corrupt pickles raise a zoo of types (EOFError, KeyError, ...).
    raise DataError(
      f"{filename}: cannot unpickle ({type(e).__name__}: {_first_line(e)}); "
      "is this an uncorrupted CIFAR-10 python batch file?"
    ) from e


def parse_cifar10_batch(obj: object, filename: str) -> tuple[np.ndarray, np.ndarray]:
  """Checks an unpickled CIFAR-10 batch and returns (uint8 rows [n, 3072], int64 labels [n])."""
  if not isinstance(obj, dict):
    raise DataError(
      f"{filename}: expected a dict with keys b'data' and b'labels', got a "
      f"{type(obj).__name__}; is this a CIFAR-10 python batch file?"
    )
  data, labels = _get_key(obj, "data", filename), _get_key(obj, "labels", filename)
  if not (
    isinstance(data, np.ndarray)
    and data.dtype == np.uint8
    and data.ndim == 2
    and data.shape[1] == CIFAR_ROW_LEN
  ):
    got = (
      f"{data.dtype} array of shape {list(data.shape)}"
      if isinstance(data, np.ndarray)
      else type(data).__name__
    )
    raise DataError(
      f"{filename}: b'data' must be a uint8 array [n, {CIFAR_ROW_LEN}], got {got}; "
      "is this a CIFAR-10 (not CIFAR-100 or binary-version) file?"
    )
  try:
    labels = np.asarray(labels)
  except Exception as e:  # noqa: BLE001 -- ragged or exotic label lists.
    raise DataError(f"{filename}: b'labels' is not a list of integers ({_first_line(e)})") from e
  if labels.dtype.kind not in "iu" or labels.shape != (data.shape[0],):
    raise DataError(
      f"{filename}: b'labels' must hold {data.shape[0]} integers (one per row of b'data'), "
      f"got {labels.dtype} values of shape {list(labels.shape)}"
    )
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    bad = int(np.argmax((labels < 0) | (labels > 9)))
    raise DataError(
      f"{filename}: label {labels[bad]} at index {bad} is out of range 0..9; "
      "is this a CIFAR-10 file?"
    )
  return data, labels.astype(np.int64)


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads one CIFAR-10 python batch file: (uint8 rows [n, 3072] channel-first, int64 labels [n])."""
  path = Path(path)
  return parse_cifar10_batch(unpickle_restricted(read_file_bytes(path), path.name), path.name)


def find_cifar10_files(data_dir: Path, split: str) -> list[Path]:
  """Finds the batch files of `split` in the first of data_dir, data_dir/cifar-10-batches-py and
  data_dir/cifar10/cifar-10-batches-py that holds any of them (all must then be there)."""
  names = CIFAR_FILES[split]
  for sub in CIFAR_SUBDIRS:
    folder = data_dir / sub
    present = [(folder / n).is_file() for n in names]
    if all(present):
      return [folder / n for n in names]
    if any(present):
      missing = ", ".join(n for n, p in zip(names, present) if not p)
      raise DataError(
        f"{folder.resolve()}: missing {missing}; the CIFAR-10 {split} split needs "
        f"{', '.join(names)} (re-extract cifar-10-python.tar.gz)"
      )
  where = ", ".join(str(data_dir / s) for s in CIFAR_SUBDIRS[1:])
  raise DataError(
    f"no CIFAR-10 {split} files in {data_dir} or {where}: expected {', '.join(names)} "
    "from cifar-10-python.tar.gz; pass --data_dir pointing at a folder with the extracted "
    "cifar-10-batches-py"
  )


def read_cifar10(
  data_dir: Path, split: str, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Reads CIFAR-10 `split` from `data_dir`: uint8 images [N, 32, 32, 3] (NHWC), labels [N].

  With `limit`, batch files are read in order only until `limit` examples are in hand (the rest of the
  split is then known to exist but not read), which makes small runs start fast.
  """
  rows, labels = [], []
  for path in find_cifar10_files(Path(data_dir), split):
    if limit is not None and sum(len(y) for y in labels) >= limit:
      break
    x, y = read_cifar10_batch(path)
    rows.append(x)
    labels.append(y)
  images = (
    np.concatenate(rows).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  )  # rows are R, G, B planes
  return images, np.concatenate(labels)


def _get_key(obj: dict, key: str, filename: str) -> object:
  # Python 2 pickles read with encoding="bytes" have bytes keys; files re-saved from Python 3 have str keys.
  for k in (key.encode(), key):
    if k in obj:
      return obj[k]
  raise DataError(
    f"{filename}: no {key.encode()!r} key (keys: {sorted(map(repr, obj))[:6]}); "
    "is this a CIFAR-10 python batch file?"
  )


# ----------------------------------------------------------------------------------------------------------
# tensorflow-datasets fallback
# ----------------------------------------------------------------------------------------------------------

_RAW_FILES_HINT = {
  "mnist": "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
  "t10k-labels-idx1-ubyte.gz",
  "fashion_mnist": "the Fashion-MNIST train-images-idx3-ubyte.gz, ..., t10k-labels-idx1-ubyte.gz",
  "cifar10": "cifar-10-batches-py/data_batch_1..5 and test_batch",
}


def read_tfds(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads `name`/`split` through `tfds.data_source` (array_record; no TensorFlow needed once prepared).

  Anything that goes wrong (tfds not installed, no network to download, no prepared copy) becomes a
  DataError pointing at --data_dir, since the raw files are the dependable offline route.
  """
  try:
    import tensorflow_datasets as tfds  # Imported lazily: slow, and not needed with data_dir.

    source = tfds.data_source(name, split=split)
    records = source.__getitems__(range(len(source)))
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([int(r["label"]) for r in records], np.int64)
  except Exception as e:  # noqa: BLE001 -- failures span import, network, filesystem and format errors.
    raise DataError(
      f"cannot load {name} {split} through tensorflow-datasets ({type(e).__name__}: "
      f"{_first_line(e)[:200]}); pass --data_dir pointing at a folder with the standard "
      f"raw files ({_RAW_FILES_HINT[name]})"
    ) from e
  return images, labels


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else "no details"
