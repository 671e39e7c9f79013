"""Where the examples are: the batch axis of every value that depends on the bounded input.

The CROWN backward pass bounds ``<lam[r, n], value[n]>`` separately for every example ``n``. That is
only right if no operation mixes examples: the Jacobian of the function must be block-diagonal over
the batch. Sizes cannot tell (``x.T`` of a square ``x``, ``jnp.flip(x, 0)`` and ``P @ x`` keep the
shape), so the batch axis is *tracked*, the way ``jax.vmap``'s batching rules track a mapped axis:
the input's leading axis holds the examples, and a rule per primitive says where that axis goes.
A primitive that reduces, contracts, reorders, slices or mixes along it raises
:class:`BatchMixingError` naming the primitive and where it is. Interval bounds would still be
right (interval arithmetic never assumes independence), but no bound of any method is built on a
wrong assumption: ``fn`` must treat examples independently.

A batch rule is ``rule(in_axes, in_shapes, params) -> out_axes``: ``in_axes[i]`` is the batch axis of
argument ``i`` (``None`` if it does not depend on the input), and it returns one axis per output,
or raises :class:`BatchMixingError` (with the reason; the caller adds where).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


class BatchMixingError(ValueError):
  """An operation reduces, reorders or mixes values of different examples."""


BatchRule = Callable[[Sequence, Sequence, dict], list]


def _only(in_axes):
  """The batch axis shared by every bounded argument (they must agree)."""
  axes = {a for a in in_axes if a is not None}
  if len(axes) != 1:
    raise BatchMixingError(
      f"its arguments hold the examples on different axes {sorted(axes)}, so it combines "
      "different examples"
    )
  return axes.pop()


def elementwise(in_axes, in_shapes, params):
  """Element-wise operations: the axis is unchanged. Arguments may broadcast (size-1 axes, and
  concrete scalars), but no bounded argument may be broadcast along its batch axis."""
  axis = _only(in_axes)
  try:
    out_shape = np.broadcast_shapes(*[tuple(s) for s in in_shapes])
  except ValueError as e:
    raise BatchMixingError(f"its arguments do not broadcast: {e}") from None
  for a, s in zip(in_axes, in_shapes):
    if a is not None and (len(s) != len(out_shape) or s[axis] != out_shape[axis]):
      raise BatchMixingError(f"it broadcasts a value of shape {tuple(s)} to {tuple(out_shape)}")
  return [axis]


def _not_along(axis, dims, what):
  if axis in tuple(dims):
    raise BatchMixingError(f"it {what} along the batch axis {axis}")


def _after_removing(axis, removed):
  return axis - sum(1 for d in removed if d < axis)


def _reduce(in_axes, in_shapes, params):
  axis = _only(in_axes)
  _not_along(axis, params["axes"], "reduces")
  return [_after_removing(axis, params["axes"])]


def _cumulative(in_axes, in_shapes, params):
  axis = _only(in_axes)
  _not_along(axis, (params["axis"],), "accumulates")
  return [axis]


def _transpose(in_axes, in_shapes, params):
  return [tuple(params["permutation"]).index(_only(in_axes))]


def _broadcast_in_dim(in_axes, in_shapes, params):
  axis = _only(in_axes[:1])
  out = params["broadcast_dimensions"][axis]
  if params["shape"][out] != in_shapes[0][axis]:
    raise BatchMixingError("it broadcasts the batch axis to another size")
  return [out]


def _squeeze(in_axes, in_shapes, params):
  axis = _only(in_axes)
  dims = [d % len(in_shapes[0]) for d in params["dimensions"]]
  _not_along(axis, dims, "squeezes away")
  return [_after_removing(axis, dims)]


def _reshape(in_axes, in_shapes, params):
  """The examples stay one block: the output has an axis of the same size whose preceding axes hold
  as many elements as the input's axes before the batch axis (row-major order is preserved)."""
  axis = _only(in_axes[:1])
  shape, new = tuple(in_shapes[0]), tuple(params["new_sizes"])
  before = math.prod(shape[:axis])
  for out_axis, size in enumerate(new):
    if size == shape[axis] and math.prod(new[:out_axis]) == before:
      return [out_axis]
  raise BatchMixingError(
    f"reshaping {shape} to {new} splits or merges the batch axis {axis} with other axes"
  )


def _whole_along(axis, starts, limits, strides, shape, what):
  if starts[axis] != 0 or limits[axis] != shape[axis] or (strides and strides[axis] != 1):
    raise BatchMixingError(f"it {what} along the batch axis {axis} (selects or reorders examples)")


def _slice(in_axes, in_shapes, params):
  axis = _only(in_axes)
  shape = in_shapes[0]
  _whole_along(
    axis, params["start_indices"], params["limit_indices"], params["strides"], shape, "slices"
  )
  return [axis]


def _dynamic_slice(in_axes, in_shapes, params):
  if any(a is not None for a in in_axes[1:]):
    raise BatchMixingError("its start indices depend on the input")
  axis = in_axes[0]
  if params["slice_sizes"][axis] != in_shapes[0][axis]:
    raise BatchMixingError(f"it slices along the batch axis {axis}")
  return [axis]


def _pad(in_axes, in_shapes, params):
  axis = _only(in_axes[:1])
  if in_axes[1] is not None:
    raise BatchMixingError("its padding value depends on the input")
  if tuple(params["padding_config"][axis]) != (0, 0, 0):
    raise BatchMixingError(f"it pads along the batch axis {axis}")
  return [axis]


def _concatenate(in_axes, in_shapes, params):
  axis = _only(in_axes)
  _not_along(axis, (params["dimension"],), "concatenates")
  return [axis]


def _stack(in_axes, in_shapes, params):
  axis = _only(in_axes)  # the new axis goes before input axis params["axis"]
  return [axis + 1 if axis >= params["axis"] else axis]


def _split(in_axes, in_shapes, params):
  axis = _only(in_axes)
  _not_along(axis, (params["axis"],), "splits")
  return [axis] * len(params["sizes"])


def _rev(in_axes, in_shapes, params):
  axis = _only(in_axes)
  _not_along(axis, params["dimensions"], "reverses the order")
  return [axis]


def _reduce_window(in_axes, in_shapes, params):
  axis = _only(in_axes)
  window_ok = params["window_dimensions"][axis] == 1 and params["window_strides"][axis] == 1
  padding_ok = tuple(params["padding"][axis]) == (0, 0)
  dilation_ok = all(
    params.get(k) is None or params[k][axis] == 1 for k in ("base_dilation", "window_dilation")
  )
  if not (window_ok and padding_ok and dilation_ok):
    raise BatchMixingError(f"its window spans or strides along the batch axis {axis}")
  return [axis]


def _dot_general(in_axes, in_shapes, params):
  """Free axes and dot-batch axes keep the examples apart; contracting axes mix them."""
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  lhs_rank, rhs_rank = len(in_shapes[0]), len(in_shapes[1])
  lhs_free = [d for d in range(lhs_rank) if d not in lc and d not in lb]
  rhs_free = [d for d in range(rhs_rank) if d not in rc and d not in rb]
  la, ra = in_axes
  if la is not None and ra is not None:
    if la in lb and ra in rb and lb.index(la) == rb.index(ra):
      return [lb.index(la)]
    raise BatchMixingError("it multiplies two values that hold the examples on unpaired axes")
  if la is not None:
    _not_along(la, lc, "contracts")
    return [lb.index(la) if la in lb else len(lb) + lhs_free.index(la)]
  _not_along(ra, rc, "contracts")
  return [rb.index(ra) if ra in rb else len(lb) + len(lhs_free) + rhs_free.index(ra)]


def _conv(in_axes, in_shapes, params):
  if in_axes[1] is not None:
    raise BatchMixingError("its kernel depends on the input")
  dn = params["dimension_numbers"]
  if in_axes[0] != dn.lhs_spec[0] or params["batch_group_count"] != 1:
    raise BatchMixingError(
      f"the batch axis {in_axes[0]} is not the convolution's batch dimension {dn.lhs_spec[0]}"
    )
  return [dn.out_spec[0]]


def _gather(in_axes, in_shapes, params):
  """Concrete indices that take the whole batch axis as an offset (slice) dimension."""
  if any(a is not None for a in in_axes[1:]):
    raise BatchMixingError("its indices depend on the input")
  axis = in_axes[0]
  dn = params["dimension_numbers"]
  collapsed = tuple(dn.collapsed_slice_dims) + tuple(getattr(dn, "operand_batching_dims", ()))
  if axis in dn.start_index_map or axis in collapsed:
    raise BatchMixingError(f"it indexes along the batch axis {axis}")
  if params["slice_sizes"][axis] != in_shapes[0][axis]:
    raise BatchMixingError(f"it slices along the batch axis {axis}")
  kept = [d for d in range(len(in_shapes[0])) if d not in collapsed]
  return [dn.offset_dims[kept.index(axis)]]


_ELEMENTWISE = (
  "abs acos acosh add add_any asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type copy "
  "copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite le "
  "lgamma digamma log log1p logistic lt max min mul ne neg nextafter not and or xor pow real "
  "reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh "
  "sharding_constraint optimization_barrier stop_gradient"
).split()

_STRUCTURAL: dict[str, BatchRule] = {
  "reduce_sum": _reduce,
  "reduce_max": _reduce,
  "reduce_min": _reduce,
  "reduce_prod": _reduce,
  "reduce_and": _reduce,
  "reduce_or": _reduce,
  "argmax": _reduce,
  "argmin": _reduce,
  "cumsum": _cumulative,
  "cummax": _cumulative,
  "cummin": _cumulative,
  "cumprod": _cumulative,
  "cumlogsumexp": _cumulative,
  "transpose": _transpose,
  "broadcast_in_dim": _broadcast_in_dim,
  "squeeze": _squeeze,
  "reshape": _reshape,
  "slice": _slice,
  "dynamic_slice": _dynamic_slice,
  "pad": _pad,
  "concatenate": _concatenate,
  "split": _split,
  "stack": _stack,
  "rev": _rev,
  "reduce_window_sum": _reduce_window,
  "reduce_window_max": _reduce_window,
  "reduce_window_min": _reduce_window,
  "dot_general": _dot_general,
  "conv_general_dilated": _conv,
  "gather": _gather,
}


def same_map_for_every_example(primitive, params, in_shapes, in_axes, out_axis: int) -> bool:
  """Whether an affine primitive applies the same linear map to every example: none of its
  arguments that do not depend on the input (``in_axes[k] is None``) varies along the examples'
  axis. Full CROWN's packed rows apply affine maps to slots of any example, so they need it. False
  when unsure (a per-example mask ``x * m`` with ``m`` ``[N, ...]``, a matrix per example, a rule
  this module does not know): the rows are then not packed."""
  fixed = [k for k, a in enumerate(in_axes) if a is None and math.prod(in_shapes[k]) > 1]
  if not fixed:
    return True
  name = getattr(primitive, "name", None)
  if name in _ELEMENTWISE:  # broadcast against the output: extent 1 (or absent) on its batch axis
    out_ndim = max(len(s) for s in in_shapes)
    positions = [(k, out_axis - (out_ndim - len(in_shapes[k]))) for k in fixed]
    return all(pos < 0 or in_shapes[k][pos] == 1 for k, pos in positions)
  if name == "dot_general":  # a matrix per example iff the examples' axis is a dot-batch axis
    (_, _), (lb, rb) = params["dimension_numbers"]
    return in_axes[0] not in lb if in_axes[0] is not None else in_axes[1] not in rb
  # A kernel, or concrete indices: never along the examples (the batch rules above forbid it).
  return name in ("conv_general_dilated", "gather")


def builtin_batch_rule(primitive) -> BatchRule | None:
  """The batch rule of a JAX primitive, or None if cbudget does not know how it treats the batch."""
  name = getattr(primitive, "name", None)
  if name in _STRUCTURAL:
    return _STRUCTURAL[name]
  if name in _ELEMENTWISE and not getattr(primitive, "multiple_results", False):
    return elementwise
  return None
