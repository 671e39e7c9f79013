"""Generated datasets whose label-relevant pixels are known exactly: `shapes` and the canvas datasets.

Each image is the sum of a label-relevant part and label-irrelevant clutter with disjoint supports, and the
mask marks the region that holds the relevant part. Clutter never enters the masked region, so "the label
is a function of the masked pixels only" holds by construction; that is what per-pixel budgets exploit.

Everything is a deterministic function of the `seed` argument (anything `np.random.default_rng` accepts:
an int or a sequence of ints; `load` passes `(seed, split_index)` so train and test get different streams).
Rendering is vectorised with broadcast box tests and fancy indexing instead of per-example Python loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cbudget.data._types import DataError, Dataset

# ----------------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------------

SHAPES_IMAGE_SIZE = 16
SHAPES_SPLIT_SIZES = {"train": 4000, "test": 1000}
SHAPE_NAMES = ("square", "plus", "bars", "cross")

# 5x5 templates. They differ in ways a 3x3 convolution sees at once (solid area, straight vs diagonal
# strokes, vertical stroke present or not), so a tiny CNN separates them within a few hundred steps.
_T = 5
_SHAPE_TEMPLATES = np.zeros((4, _T, _T), np.float32)
_SHAPE_TEMPLATES[0] = 1.0  # filled square
_SHAPE_TEMPLATES[1, _T // 2, :] = _SHAPE_TEMPLATES[1, :, _T // 2] = 1.0  # plus
_SHAPE_TEMPLATES[2, [0, _T - 1], :] = 1.0  # pair of horizontal bars
_SHAPE_TEMPLATES[3] = np.maximum(np.eye(_T), np.eye(_T)[::-1])  # diagonal cross (X)

# Shapes are drawn at intensity >= SHAPE_MIN_INTENSITY and clutter stays <= CLUTTER_MAX_INTENSITY: the gap
# keeps the classes learnable, and lets tests find shape pixels by thresholding.
SHAPE_MIN_INTENSITY = 0.7
CLUTTER_MAX_INTENSITY = 0.35
_NUM_BLOBS = 3
_BLOB_SIZE = 2
_NOISE_MAX = 0.1


def make_shapes(
  num_examples: int,
  seed: int | Sequence[int] = 0,
  *,
  image_size: int = SHAPES_IMAGE_SIZE,
  name: str = "shapes",
) -> Dataset:
  """Generates `num_examples` grayscale images of four simple shapes on cluttered backgrounds.

  Each image holds one 5x5 shape (square, plus, pair of bars, X; the label is its index) at a uniformly
  random position and intensity in [0.7, 1]. The mask is the shape's bounding box dilated by one pixel
  (clipped to the image): the dilation keeps a margin of pixels whose change could alter the visible
  outline, so "outside the mask" is safely irrelevant. Outside the mask lie faint uniform noise (<= 0.1) and
  a few faint 2x2 blobs (0.15-0.35). Labels are drawn uniformly at random (not balanced exactly), so any
  prefix of the dataset is an i.i.d. sample.

  Returns a Dataset with images [N, S, S, 1], masks [N, S, S, 1], 4 classes.
  """
  if image_size < _T + 2:
    raise DataError(f"shapes: image_size={image_size} is too small; use at least {_T + 2}")
  rng = np.random.default_rng(seed)
  n, s = num_examples, image_size
  labels = rng.integers(0, len(SHAPE_NAMES), size=n)
  rows, cols = (rng.integers(0, s - _T + 1, size=n) for _ in range(2))
  intensity = rng.uniform(SHAPE_MIN_INTENSITY, 1.0, size=n).astype(np.float32)
  blob_rows, blob_cols = (
    rng.integers(0, s - _BLOB_SIZE + 1, size=(_NUM_BLOBS, n)) for _ in range(2)
  )
  blob_values = rng.uniform(0.15, CLUTTER_MAX_INTENSITY, size=(_NUM_BLOBS, n)).astype(np.float32)
  noise = rng.random((n, s, s), dtype=np.float32) * np.float32(_NOISE_MAX)

  # The shape layer: paste each template scaled by its intensity.
  shape_layer = np.zeros((n, s, s), np.float32)
  _paste(shape_layer, _SHAPE_TEMPLATES[labels] * intensity[:, None, None], rows, cols)

  mask = _box(
    s, s, rows - 1, cols - 1, _T + 2, _T + 2
  )  # dilated bounding box, clipped by construction
  clutter = noise
  for k in range(_NUM_BLOBS):
    blob = _box(s, s, blob_rows[k], blob_cols[k], _BLOB_SIZE, _BLOB_SIZE)
    clutter = np.maximum(clutter, blob * blob_values[k][:, None, None])
  images = shape_layer + clutter * (1.0 - mask)  # disjoint supports: the sum never exceeds 1
  return Dataset(
    images=images[..., None],
    labels=labels.astype(np.int32),
    masks=mask[..., None],
    num_classes=len(SHAPE_NAMES),
    name=name,
  )


# ----------------------------------------------------------------------------------------------------------
# canvas datasets
# ----------------------------------------------------------------------------------------------------------

CANVAS_KINDS = ("mnist_canvas", "cifar_canvas")
MNIST_CANVAS_GRID = 2  # the canvas is a grid x grid array of image-sized slots
_NUM_DISTRACTORS = 4  # crops of other digits per mnist canvas
_DISTRACTOR_INTENSITY = (0.3, 0.6)
_CANVAS_NOISE_MAX = 0.1
_CIFAR_OTHER_INTENSITY = 0.5  # the irrelevant half of a cifar canvas is another image, dimmed


def make_canvas_dataset(
  base: Dataset,
  kind: str,
  seed: int | Sequence[int] = 0,
  *,
  num_examples: int | None = None,
  grid: int = MNIST_CANVAS_GRID,
) -> Dataset:
  """Places every image of `base` on a larger canvas whose remaining area holds label-irrelevant content.

  kind="mnist_canvas": the canvas is a `grid` x `grid` array of HxW slots ((grid*H) x (grid*W) pixels) and
    each image goes to a uniformly random slot. The rest of the canvas holds clutter: random (H/2)x(W/2)
    crops of *other* examples of `base` at intensity 0.3-0.6, anywhere, and uniform noise <= 0.1. The
    clutter is cleared from the chosen slot, so it holds exactly the labelled image and nothing else.
    Every pixel is relevant in exactly 1/grid**2 of the layouts, so no fixed budget map (``global`` mode)
    can predict relevance: its expected AUROC is exactly 0.5, and only a map that looks at the image can
    do better. (A free position on a plain larger canvas would not do: the centre would be covered more
    often than the border, which a fixed map can learn.)
  kind="cifar_canvas": each HxW image goes to the left or right half (fair coin) of an H x 2W canvas; the
    other half holds another random example of `base`, dimmed to half intensity: that is what marks it as
    irrelevant (two equally bright images would leave the label ambiguous).

  The mask is the region where the labelled image sits (if `base` has masks, the base mask moved there).
  Distractors are always other examples (index != i), never the labelled image itself.

  All random choices are drawn for every example of `base` before rendering, so example i is the same
  whatever `num_examples` is: `num_examples` renders only the first examples, it does not change them.
  """
  n = base.images.shape[0]
  if kind not in CANVAS_KINDS:
    raise DataError(f"unknown canvas kind {kind!r}; choose one of {', '.join(CANVAS_KINDS)}")
  if n < 2:
    raise DataError(
      f"{kind}: the base dataset {base.name!r} has {n} examples; canvases need at least 2 "
      "(distractors come from other examples)"
    )
  m = n if num_examples is None else num_examples
  if not 0 <= m <= n:
    raise DataError(f"{kind}: num_examples={num_examples} but the base dataset has {n} examples")
  base_masks = (
    base.masks if base.masks is not None else np.ones(base.images.shape[:3] + (1,), np.float32)
  )
  rng = np.random.default_rng(seed)
  if kind == "mnist_canvas":
    images, masks = _paste_canvas(base.images, base_masks, rng, m, grid)
  else:
    images, masks = _side_by_side_canvas(base.images, base_masks, rng, m)
  return Dataset(
    images=images,
    labels=base.labels[:m].copy(),
    masks=masks,
    num_classes=base.num_classes,
    name=kind,
  )


def _other_indices(rng: np.random.Generator, n: int, size: tuple[int, ...]) -> np.ndarray:
  """Indices of other examples: for slot [..., i] a uniform choice among the n - 1 indices != i."""
  return (np.arange(n) + rng.integers(1, n, size=size)) % n


def _paste_canvas(
  images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, m: int, grid: int
) -> tuple[np.ndarray, np.ndarray]:
  n, h, w, c = images.shape
  if grid < 2:
    raise DataError(f"mnist_canvas: grid={grid}, but a canvas needs at least 2x2 slots (grid >= 2)")
  canvas_h, canvas_w = grid * h, grid * w
  crop_h, crop_w = max(1, h // 2), max(1, w // 2)
  k = _NUM_DISTRACTORS
  # Draw everything for all n examples first (see make_canvas_dataset), then use the first m.
  slots = rng.integers(0, grid * grid, size=n)[:m]
  rows, cols = (slots // grid) * h, (slots % grid) * w
  sources = _other_indices(rng, n, (k, n))[:, :m]
  # Crops come from the central part of the source, where strokes are, rather than the empty border.
  src_rows = rng.integers(h // 8, h - crop_h - h // 8 + 1, size=(k, n))[:, :m]
  src_cols = rng.integers(w // 8, w - crop_w - w // 8 + 1, size=(k, n))[:, :m]
  dst_rows = rng.integers(0, canvas_h - crop_h + 1, size=(k, n))[:, :m]
  dst_cols = rng.integers(0, canvas_w - crop_w + 1, size=(k, n))[:, :m]
  strength = rng.uniform(*_DISTRACTOR_INTENSITY, size=(k, n)).astype(np.float32)[:, :m]
  # Uniform draws consume the stream one value at a time in C order, so a fresh generator's first m
  # canvases of noise are the same whatever m is; this avoids drawing noise for unrendered examples.
  noise_rng = np.random.default_rng(rng.integers(0, 2**63))
  canvas = noise_rng.random((m, canvas_h, canvas_w, c), dtype=np.float32)
  canvas *= np.float32(_CANVAS_NOISE_MAX)

  for j in range(k):
    crops = _crop(images, sources[j], src_rows[j], src_cols[j], crop_h, crop_w)
    _paste(
      canvas, crops * strength[j, :, None, None, None], dst_rows[j], dst_cols[j], combine=np.maximum
    )
  # Pasting overwrites the whole HxW square, which removes any clutter that fell on it.
  _paste(canvas, images[:m], rows, cols)
  canvas_masks = np.zeros((m, canvas_h, canvas_w, 1), np.float32)
  _paste(canvas_masks, masks[:m], rows, cols)
  return canvas, canvas_masks


def _side_by_side_canvas(
  images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, m: int
) -> tuple[np.ndarray, np.ndarray]:
  n, h, w, c = images.shape
  on_left = rng.integers(0, 2, size=n).astype(bool)[:m]
  others = _other_indices(rng, n, (n,))[:m]
  own = np.arange(m)
  # Filling preallocated halves by index keeps the peak memory near the output size (CIFAR train is large).
  canvas = np.empty((m, h, 2 * w, c), np.float32)
  canvas[:, :, :w] = images[np.where(on_left, own, others)]
  canvas[:, :, w:] = images[np.where(on_left, others, own)]
  canvas[~on_left, :, :w] *= np.float32(_CIFAR_OTHER_INTENSITY)
  canvas[on_left, :, w:] *= np.float32(_CIFAR_OTHER_INTENSITY)
  canvas_masks = np.zeros((m, h, 2 * w, 1), np.float32)
  side = on_left[:, None, None, None]
  canvas_masks[:, :, :w] = np.where(side, masks[:m], 0.0)
  canvas_masks[:, :, w:] = np.where(side, 0.0, masks[:m])
  return canvas, canvas_masks


# ----------------------------------------------------------------------------------------------------------
# vectorised drawing helpers
# ----------------------------------------------------------------------------------------------------------


def _box(
  height: int, width: int, top: np.ndarray, left: np.ndarray, box_h: int, box_w: int
) -> np.ndarray:
  """float32 [n, height, width] indicator of the box [top, top+box_h) x [left, left+box_w), clipped."""
  y = np.arange(height)[None, :, None]
  x = np.arange(width)[None, None, :]
  top, left = np.asarray(top)[:, None, None], np.asarray(left)[:, None, None]
  inside = (y >= top) & (y < top + box_h) & (x >= left) & (x < left + box_w)
  return inside.astype(np.float32)


def _paste(
  canvas: np.ndarray,
  patches: np.ndarray,
  top: np.ndarray,
  left: np.ndarray,
  combine: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> None:
  """In place: canvas[i, top[i]:top[i]+h, left[i]:left[i]+w] = patches[i] for every i (boxes must fit).

  With `combine` (e.g. np.maximum) the region becomes combine(region, patches) instead. Only the pasted
  regions are gathered and scattered, never whole canvases.
  """
  n, h, w = patches.shape[:3]
  index = (
    np.arange(n)[:, None, None],
    top[:, None, None] + np.arange(h)[None, :, None],
    left[:, None, None] + np.arange(w),
  )
  canvas[index] = patches if combine is None else combine(canvas[index], patches)


def _crop(
  images: np.ndarray, index: np.ndarray, top: np.ndarray, left: np.ndarray, h: int, w: int
) -> np.ndarray:
  """images[index[i], top[i]:top[i]+h, left[i]:left[i]+w] stacked over i."""
  i = index[:, None, None]
  return images[
    i, top[:, None, None] + np.arange(h)[None, :, None], left[:, None, None] + np.arange(w)
  ]
