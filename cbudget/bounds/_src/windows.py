"""Full CROWN's rows for neurons of convolutional layers, kept on their receptive field (patches).

Full CROWN bounds every unstable neuron of a layer with its own backward row. As dense coefficients
a row spans every value below it, yet a convolutional neuron depends only on a small window of
them: 4x4x16 + 10x10 values for a second-layer neuron of DM-small, against 13x13x16 + 28x28. A
:class:`Window` keeps each row's coefficients on that window, with the window's position in the
value (auto_LiRPA's "patches" mode). The backward pass moves windows through convolutions (the
transposed convolution of the window alone), element-wise affine maps and element-wise relaxations
(their parameters' windows are gathered), and makes them dense at the first node that has no window
step (a dense layer, a reshape, two rows' coefficients meeting at a residual sum...). The bounds are
the dense rows' up to rounding.

Values are channels-last with the batch first, ``[N, *spatial, C]`` (what Flax's ``nn.Conv`` reads
and writes); coefficients ``[R, N, *window, C]``, one row per (bound, example) slot as in
``propagate.py``. Window positions past the value's edges (a convolution's padding) hold zeros.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cbudget.bounds._src import conv_transpose


class Window(NamedTuple):
  """Row-stacked coefficients on a window of a ``[N, *spatial, C]`` value."""

  values: jax.Array  # [R, N, *window, C]
  origin: jax.Array  # [R, N, len(spatial)] int32: the value position of the window's first one
  spatial: tuple[int, ...]  # the value's spatial shape

  @property
  def size(self) -> tuple[int, ...]:
    return tuple(self.values.shape[2:-1])


def has_windows(shape: tuple[int, ...], batch_axis: int) -> bool:
  """Whether a value of this shape is laid out as windows expect: batch first, one or more
  spatial axes, channels last."""
  return batch_axis == 0 and len(shape) >= 3


def start(element, sign, per_example: tuple[int, ...], dtype) -> Window:
  """Rows ``sign * e_element`` as 1x1 windows: ``element`` ``[R, N]`` indexes the flattened
  per-example value ``(*spatial, C)``."""
  spatial, channels = tuple(per_example[:-1]), per_example[-1]
  position = jnp.unravel_index(element, per_example)
  origin = jnp.stack(position[:-1], axis=-1).astype(jnp.int32)
  values = jax.nn.one_hot(position[-1], channels, dtype=dtype) * sign[..., None].astype(dtype)
  values = values.reshape(element.shape + (1,) * len(spatial) + (channels,))
  return Window(values, origin, spatial)


def _indices(window: Window):
  """Per spatial axis, the value positions of the window's entries, ``[R, N, 1.., w_d, ..1]``, and
  ``[R, N, *window]``: whether an entry lies inside the value (the rest are padding)."""
  r, n, s = window.origin.shape
  positions, inside = [], True
  for d, (w, extent) in enumerate(zip(window.size, window.spatial)):
    shape = (r, n) + tuple(w if e == d else 1 for e in range(s))
    p = (window.origin[..., d : d + 1] + jnp.arange(w)).reshape(shape)
    positions.append(p)
    inside = inside & (p >= 0) & (p < extent)
  return positions, inside


def gather(array, window: Window, examples=None, fill=0):
  """Each slot's window of ``array`` (broadcastable to ``[N, *spatial, C]``): ``[R, N, *window, C]``,
  slot ``(r, n)`` reading example ``examples[r, n]`` (``n`` without packed rows); ``fill`` outside
  the value."""
  r, n, s = window.origin.shape
  channels = window.values.shape[-1]
  array = jnp.broadcast_to(array, (n,) + window.spatial + (channels,))
  positions, inside = _indices(window)
  if examples is None:
    examples = jnp.broadcast_to(jnp.arange(n), (r, n))
  index = [examples.reshape((r, n) + (1,) * s)]
  index += [jnp.clip(p, 0, extent - 1) for p, extent in zip(positions, window.spatial)]
  values = array[tuple(index)]
  return jnp.where(inside[..., None], values, jnp.asarray(fill, values.dtype))


def contract(values, other):
  """``sum(values * other)`` over each slot's window: ``[R, N]``."""
  return jnp.sum(values * other, axis=tuple(range(2, values.ndim)))


def interval_term(window: Window, box, examples=None):
  """The lower bound ``[R, N]`` of each row's ``<coefficients, value>`` over the value's interval
  bounds ``box`` (a ``Box`` of ``[N, *spatial, C]``)."""
  pos, neg = jnp.maximum(window.values, 0), jnp.minimum(window.values, 0)
  lower, upper = (gather(b, window, examples) for b in (box.lower, box.upper))
  return contract(pos, lower) + contract(neg, upper)


def densify(window: Window):
  """The rows as dense coefficients ``[R, N, *spatial, C]``."""
  r, n, s = window.origin.shape
  channels = window.values.shape[-1]
  positions, mask = _indices(window)
  mask = jnp.broadcast_to(mask, (r, n) + window.size)
  # Entries outside the value hold zeros; send them past the end, where the scatter drops them.
  index = [jnp.broadcast_to(jnp.arange(r).reshape((r, 1) + (1,) * s), mask.shape)]
  index += [jnp.broadcast_to(jnp.arange(n).reshape((1, n) + (1,) * s), mask.shape)]
  index += [jnp.where(mask, p, extent) for p, extent in zip(positions, window.spatial)]
  dense = jnp.zeros((r, n) + window.spatial + (channels,), window.values.dtype)
  return dense.at[tuple(index)].set(window.values, mode="drop")


def _channels_last_conv(params, ndim: int) -> bool:
  dn = params["dimension_numbers"]
  spatial = tuple(range(1, ndim - 1))
  return (
    conv_transpose.supports(params)
    and tuple(dn.lhs_spec) == (0, ndim - 1) + spatial
    and tuple(dn.out_spec) == (0, ndim - 1) + spatial
    and all(d == 1 for d in params["rhs_dilation"])
  )


def through_conv(window: Window, kernel, params, in_spatial: tuple[int, ...]) -> Window | None:
  """The rows pulled back through ``conv_general_dilated(x, kernel)`` onto ``x``'s windows, or
  ``None`` where this convolution has no window step (grouped, dilated, not channels-last) or the
  window would cover the whole input (dense rows are then no larger)."""
  s = len(in_spatial)
  if not _channels_last_conv(params, s + 2):
    return None
  dn = params["dimension_numbers"]
  kernel = jnp.transpose(kernel, tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0]))
  taps, strides = kernel.shape[:s], tuple(params["window_strides"])
  size = tuple((w - 1) * st + k for w, st, k in zip(window.size, strides, taps))
  if math.prod(size) >= math.prod(in_spatial):
    return None
  r, n = window.origin.shape[:2]
  # Input position i * stride + k of the padded input gets out[i] * kernel[k]: a convolution of the
  # stride-dilated window with the flipped kernel, its in and out channels swapped, padded by k - 1.
  flipped = jnp.swapaxes(jnp.flip(kernel, axis=tuple(range(s))), -1, -2)  # [*taps, Co, Ci]
  spatial = tuple(range(1, s + 1))
  numbers = lax.ConvDimensionNumbers(
    (0, s + 1) + spatial, (s + 1, s) + tuple(range(s)), (0, s + 1) + spatial
  )
  values = lax.conv_general_dilated(
    window.values.reshape((r * n,) + window.size + (window.values.shape[-1],)),
    flipped.astype(window.values.dtype),
    window_strides=(1,) * s,
    padding=[(k - 1, k - 1) for k in taps],
    lhs_dilation=strides,
    dimension_numbers=numbers,
    precision=params.get("precision"),
  )
  values = values.reshape((r, n) + size + (values.shape[-1],))
  low = jnp.asarray([lo for lo, _ in params["padding"]], jnp.int32)
  pulled = Window(values, window.origin * jnp.asarray(strides, jnp.int32) - low, in_spatial)
  inside = _indices(pulled)[1][..., None]
  return pulled._replace(values=jnp.where(inside, pulled.values, 0))
