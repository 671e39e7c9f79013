"""Generated datasets whose label-relevant pixels are known exactly: `shapes` and the canvas datasets.

`shapes`: each image is the sum of a label-relevant shape and label-irrelevant clutter with disjoint
supports, and the mask marks the shape's region.

The canvases: several image slots that look alike (the labelled image and distractors of the same kind,
the same noise floor), the labelled slot marked by a frame that no perturbation of half-width < 1/2 can
forge or erase; the mask is the labelled slot. Relevance there is contextual: no function of a pixel's
own intensity predicts it (see `make_canvas_dataset` for the argument).

Everything is a deterministic function of the `seed` argument (anything `np.random.default_rng` accepts:
an int or a sequence of ints; `load` passes `(seed, split_index)` so train and test get different streams).
Rendering is vectorised with broadcast box tests and fancy indexing instead of per-example Python loops.
"""

from __future__ import annotations

from collections.abc import Sequence

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
MNIST_CANVAS_GRID = 2  # the mnist canvas is a grid x grid array of image-sized slots
CIFAR_CANVAS_SLOTS = (1, 2)  # the cifar canvas: two images side by side
# The frame detector's threshold: its decision is robust to any box of half-width < this.
MARKER_THRESHOLD = 0.5
MIN_SLOT_SIZE = 5  # the 2-pixel marker band needs an interior, and the decoy at least one dash
_MARKER_DASH = 4  # length of the decoy's dashes along each side
_CANVAS_NOISE_MAX = {"mnist_canvas": 0.1, "cifar_canvas": 0.0}
_CHUNK = 2048  # examples rendered at a time: peak memory stays near the output size


def marker_patterns(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The slot markers: boolean (band, frame, decoy) [height, width] masks of one slot.

  band: the two outermost rings of the slot, where the markers are drawn (pixels exactly 0 or 1).
  frame: the outer ring; drawn at 1 (the inner ring at 0) it marks the labelled slot.
  decoy: a crenellated frame for the other slots: the frame with alternate dashes of `_MARKER_DASH`
    pixels moved one pixel inwards, onto the inner ring. Each move takes a 1 off the outer ring and puts
    it on the inner ring, so frame and decoy have the same number of ones and zeros in the band, and
    the band's intensity histogram is the same in every slot; but the decoy leaves outer-ring pixels at
    0, which is what the frame detector reads (see `make_canvas_dataset`).
  """
  if min(height, width) < MIN_SLOT_SIZE:
    raise DataError(
      f"canvas slots of {height}x{width} pixels are too small for the 2-pixel marker band; use base "
      f"images of at least {MIN_SLOT_SIZE}x{MIN_SLOT_SIZE}"
    )
  y = np.arange(height)[:, None]
  x = np.arange(width)[None, :]
  ring = np.minimum(np.minimum(y, height - 1 - y), np.minimum(x, width - 1 - x))  # distance to edge
  frame, band = ring == 0, ring <= 1
  horizontal = (y == 0) | (y == height - 1)  # top and bottom sides; the corners count as these
  along = np.where(horizontal, x, y)  # position along the side

  def moved(t: np.ndarray, side: int) -> np.ndarray:
    # Only positions 2 .. side-3 move: their inward neighbours are never an inner-ring corner, which
    # two sides share (two moves onto one pixel would unbalance the counts).
    return (t >= 2) & (t <= side - 3) & (((t - 2) // _MARKER_DASH) % 2 == 0)

  outer_moved = frame & np.where(horizontal, moved(along, width), moved(along, height))
  # Their inward neighbours on the inner ring: shift the moved set one pixel towards the centre.
  inner_moved = np.zeros_like(frame)
  inner_moved[1, :] |= outer_moved[0, :]
  inner_moved[-2, :] |= outer_moved[-1, :]
  inner_moved[:, 1] |= outer_moved[:, 0]
  inner_moved[:, -2] |= outer_moved[:, -1]
  decoy = (frame & ~outer_moved) | inner_moved
  return band, frame, decoy


def make_canvas_dataset(
  base: Dataset,
  kind: str,
  seed: int | Sequence[int] = 0,
  *,
  num_examples: int | None = None,
  grid: int = MNIST_CANVAS_GRID,
) -> Dataset:
  """Places every image of `base` in a slot of a larger canvas whose other slots hold distractors.

  The canvas is an array of HxW slots: `grid` x `grid` for kind="mnist_canvas", 1 x 2 (side by side) for
  kind="cifar_canvas" (`grid` applies to mnist_canvas only). Each image of `base` goes to a uniformly random slot; every other slot holds
  another random example of `base` (index != i) at full intensity, so the slots look alike. What tells
  the labelled slot apart is only a marker drawn in a 2-pixel band around every slot (`marker_patterns`):
  a closed frame (outer ring 1, inner ring 0) around the labelled slot, and a crenellated decoy with the
  same number of ones and zeros around every other slot. The band overwrites the slot's border pixels
  (almost always empty on MNIST). mnist_canvas has a noise floor: every pixel outside the bands, in every slot alike,
  becomes max(pixel, u) with u ~ U[0, 0.1); this removes the exact zeros of MNIST backgrounds, which
  would otherwise be a per-pixel cue. cifar_canvas has none (natural images have no constant
  background). The mask is the labelled slot (if `base` has masks, the base mask moved there).

  Relevance is contextual: the labelled and the distractor slots hold the same kinds of content with
  the same intensity statistics (the same distribution of images, the same noise floor, the same band
  histogram), so no function of a pixel's own intensity predicts the mask (`metrics.intensity_rule_auroc`
  is 0.5 in expectation); every pixel is relevant in exactly 1/(number of slots) of the layouts, so no
  fixed map (``global`` mode) does either. Only a map that sees a slot's marker can.

  The frame can be neither forged nor erased by any perturbation of per-pixel half-width < 1/2 (budgets
  b * eps0 < 0.5), clipped to [0, 1] or not. Read a slot as marked iff every pixel of its outer ring is
  > 1/2 (`MARKER_THRESHOLD`). The band holds no noise, so its pixels are exactly 0 or 1. On the labelled
  slot every outer-ring pixel is 1 and stays >= 1 - delta > 1/2: the frame survives (not erased). On any
  other slot the decoy leaves some outer-ring pixel at 0, which stays <= delta < 1/2: no frame appears
  (not forged). So in every image of the threat set exactly one slot is marked, the same as in the clean
  image, and "the class of the image in the marked slot" is a label function of the labelled slot's
  pixels alone: changing the distractor slots, however much, cannot change it. (With noise v > 0 in the
  band this would fail for delta >= 1/2 - v: that is why the band is noise-free.) A classifier can read
  the marker with exactly this robustness (thresholds at 1/2 give stably-off ReLUs on the box).

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
  if kind == "mnist_canvas" and grid < 2:
    raise DataError(f"mnist_canvas: grid={grid}, but a canvas needs at least 2x2 slots (grid >= 2)")
  slot_rows, slot_cols = (grid, grid) if kind == "mnist_canvas" else CIFAR_CANVAS_SLOTS
  base_masks = (
    base.masks if base.masks is not None else np.ones(base.images.shape[:3] + (1,), np.float32)
  )
  images, masks = _framed_canvas(
    base.images,
    base_masks,
    np.random.default_rng(seed),
    m,
    slot_rows,
    slot_cols,
    _CANVAS_NOISE_MAX[kind],
  )
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


def _framed_canvas(
  images: np.ndarray,
  masks: np.ndarray,
  rng: np.random.Generator,
  m: int,
  slot_rows: int,
  slot_cols: int,
  noise_max: float,
) -> tuple[np.ndarray, np.ndarray]:
  n, h, w, c = images.shape
  band, frame, decoy = marker_patterns(h, w)
  num_slots = slot_rows * slot_cols
  # Draw everything for all n examples first (see make_canvas_dataset), then use the first m.
  labelled_slot = rng.integers(0, num_slots, size=n)[:m]
  distractors = _other_indices(rng, n, (num_slots - 1, n))[:, :m]
  # sources[i, s]: the base example shown in slot s of canvas i; distractors fill the other slots in order.
  sources = np.empty((m, num_slots), np.int64)
  is_labelled = labelled_slot[:, None] == np.arange(num_slots)
  sources[is_labelled] = np.arange(m)
  sources[~is_labelled] = distractors.T.reshape(-1)
  # Uniform draws consume the stream one value at a time in C order, so drawing the noise chunk by chunk
  # from a fresh generator gives the first m canvases the same noise whatever m is.
  noise_rng = np.random.default_rng(rng.integers(0, 2**63))

  band_values = np.stack([frame, decoy])[:, band].astype(np.float32)  # [2, band pixels]
  # [m, rows, H, cols, W, C] is the canvas [m, rows*H, cols*W, C] with the slot axes split out.
  canvas = np.empty((m, slot_rows, h, slot_cols, w, c), np.float32)
  canvas_masks = np.empty((m, slot_rows, h, slot_cols, w, 1), np.float32)
  for start in range(0, m, _CHUNK):
    chunk = slice(start, min(start + _CHUNK, m))
    # Views: writing to them writes the canvas.
    part, part_masks = canvas[chunk], canvas_masks[chunk]
    for s in range(num_slots):
      row, col = divmod(s, slot_cols)
      part[:, row, :, col] = images[sources[chunk, s]]
      labelled_here = is_labelled[chunk, s, None, None, None]
      part_masks[:, row, :, col] = masks[chunk] * labelled_here
    if noise_max > 0:
      noise = noise_rng.random(part.shape, dtype=np.float32)
      noise *= np.float32(noise_max)
      np.maximum(part, noise, out=part)
    for s in range(num_slots):
      slot = part[:, s // slot_cols, :, s % slot_cols]
      marker = band_values[np.where(is_labelled[chunk, s], 0, 1)]  # [chunk, band pixels]
      slot[:, band] = marker[..., None]

  shape = (m, slot_rows * h, slot_cols * w)
  return canvas.reshape(shape + (c,)), canvas_masks.reshape(shape + (1,))


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


def _paste(canvas: np.ndarray, patches: np.ndarray, top: np.ndarray, left: np.ndarray) -> None:
  """In place: canvas[i, top[i]:top[i]+h, left[i]:left[i]+w] = patches[i] for every i (boxes must fit).

  Only the pasted regions are scattered, never whole canvases.
  """
  n, h, w = patches.shape[:3]
  index = (
    np.arange(n)[:, None, None],
    top[:, None, None] + np.arange(h)[None, :, None],
    left[:, None, None] + np.arange(w),
  )
  canvas[index] = patches
