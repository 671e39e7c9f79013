"""Forward interval propagation and the CROWN backward pass over a traced :class:`Graph`.

Every value that depends on the input has the batch as its leading axis, ``[N, ...]``, and ``f``
treats examples independently. Linear coefficients ``lam`` for such a value have shape
``[R, N, ...]``: one row per bound being computed (a spec row, or a neuron of an intermediate layer,
with a sign), for every example at once. The backward pass returns, per row and example, a lower
bound ``[R, N]`` of ``<lam[r, n], value[n]>`` over example ``n``'s box; sums never cross the batch
axis, so examples never mix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cbudget.bounds._src import windows
from cbudget.bounds._src.box import Box
from cbudget.bounds._src.graph import Graph, Node
from cbudget.bounds._src.registry import Affine, Relaxation, UnsupportedPrimitiveError


def _contract(lam, value, axis: int = 0):
  """``sum(lam * value)`` per row and example: ``[R, ...] x [...] -> [R, N]``.

  ``axis`` is the value's batch axis (``lam`` has it one further on, after the rows). A batched
  matrix-vector product rather than a broadcast multiply and sum: XLA's CPU backend materialises
  the broadcast ``value`` for every row, and its gradient w.r.t. ``value`` (a sum over rows) is a
  slow reduction there; as a ``dot_general`` both are one pass over ``lam``.
  """
  r, n = lam.shape[0], lam.shape[axis + 1]
  if jnp.ndim(value) == lam.ndim:  # one value per row (alpha_crown.py's relaxations, packed rows)
    value = jnp.broadcast_to(value, lam.shape).astype(lam.dtype)
    lam, value = jnp.moveaxis(lam, axis + 1, 1), jnp.moveaxis(value, axis + 1, 1)
    return jnp.einsum("rnk,rnk->rn", lam.reshape(r, n, -1), value.reshape(r, n, -1))
  value = jnp.broadcast_to(value, lam.shape[1:])
  if axis:
    lam, value = jnp.moveaxis(lam, axis + 1, 1), jnp.moveaxis(value, axis, 0)
  return jnp.einsum("rnk,nk->rn", lam.reshape(r, n, -1), value.reshape(n, -1).astype(lam.dtype))


def _contract_offset(lam, offset, axis: int, sign: int):
  """:func:`_contract` of a relaxation's offset with coefficients ``lam`` of one sign (``sign``).

  Where a coefficient is 0 that side of the relaxation is unused, so an infinite offset there takes
  nothing (``0 * inf`` would make the bound NaN, e.g. ``log`` over ``[0, u]``, whose lower line is
  ``-inf``, under the upper bound's coefficients); where a non-zero coefficient meets an infinite
  offset the sum is that infinity (NaN if both signs meet). The finite offsets are contracted as
  usual; which rows reach an infinite one is a second contraction of the masks with the
  coefficients' values only (``stop_gradient``: its result is only compared), so the gradient costs
  what the plain contraction's does.
  """
  if jnp.ndim(offset) == lam.ndim:  # one offset per row (alpha_crown.py, packed rows)
    return _contract(lam, jnp.where(lam == 0, 0, offset), axis)
  offset = jnp.broadcast_to(offset, lam.shape[1:]).astype(lam.dtype)
  plus, minus = offset == jnp.inf, offset == -jnp.inf
  total = _contract(lam, jnp.where(plus | minus, 0, offset), axis)
  masks = jnp.stack([plus, minus], -1).astype(lam.dtype)
  reach = lax.stop_gradient(sign * lam)  # >= 0
  if axis:
    reach, masks = jnp.moveaxis(reach, axis + 1, 1), jnp.moveaxis(masks, axis, 0)
  r, n = reach.shape[:2]
  to_plus, to_minus = jnp.moveaxis(
    jnp.einsum("rnk,nkc->rnc", reach.reshape(r, n, -1), masks.reshape(n, -1, 2)), -1, 0
  )
  up, down = to_plus > 0, to_minus > 0  # a non-zero coefficient reached them
  total = jnp.where(up, sign * jnp.inf, jnp.where(down, -sign * jnp.inf, total))
  return jnp.where(up & down, jnp.nan, total)


def _dense(lam):
  """Coefficients as a dense array: windows (windows.py) are scattered into their value."""
  return windows.densify(lam) if isinstance(lam, windows.Window) else lam


def _dense_shape(lam) -> jax.ShapeDtypeStruct:
  if isinstance(lam, windows.Window):
    r, n = lam.origin.shape[:2]
    return jax.ShapeDtypeStruct((r, n) + lam.spatial + lam.values.shape[-1:], lam.values.dtype)
  return jax.ShapeDtypeStruct(lam.shape, lam.dtype)


def _per_slot(examples, value, axis: int, ndim: int | None = None):
  """``value`` (a :class:`Box`, or an array broadcastable to ``ndim`` dims, its own by default, with
  the examples on ``axis``) for every slot of packed rows: ``[R, ..., N, ...]`` with slot
  ``(r, n)`` holding example ``examples[r, n]``'s part. Unchanged without ``examples``, or if it is the same for every example
  (a scalar, or broadcast along the batch axis)."""
  if isinstance(value, Box):
    return Box(*(_per_slot(examples, v, axis) for v in (value.lower, value.upper)))
  if examples is None or jnp.ndim(value) == 0:
    return value
  # Leading axes it is broadcast along.
  missing = (jnp.ndim(value) if ndim is None else ndim) - jnp.ndim(value)
  if axis < missing or jnp.shape(value)[axis - missing] == 1:
    return value
  value = jnp.reshape(value, (1,) * missing + jnp.shape(value))
  return jnp.moveaxis(jnp.take(value, examples, axis=axis), axis, 0)


# Affine primitives that keep a box a box: they move, select or pad coordinates of their one bounded
# argument (output coordinate k is x_p(k) with p one-to-one, or a constant) ...
_REARRANGING = frozenset(
  {"reshape", "transpose", "squeeze", "slice", "rev", "copy", "copy_p", "pad", "concatenate"}
  | {"stack", "sharding_constraint"}
)
# ... or scale and shift each coordinate (a_k x_k + c_k), where the bounded argument has the
# output's shape (not broadcast).
_ELEMENTWISE = frozenset({"convert_element_type", "add", "sub", "neg", "mul", "div"})
# The element-wise affine maps rows on windows pass through (Propagator._window_step).
_WINDOW_ELEMENTWISE = _ELEMENTWISE | {"copy", "copy_p"}


def _track_exact(node: Node, env: dict, bounded: set, box_values: set, exact: set):
  """Update ``exact``, the values whose interval bounds are their exact range over the box (so CROWN
  cannot tighten them), with ``node``'s outputs (already in ``env``).

  The input is a box. A built-in affine map of one bounded argument that is a box gives each output
  coordinate its exact range (``c +- |W| r``); a coordinate-wise one (:data:`_REARRANGING`,
  :data:`_ELEMENTWISE`) keeps a box a box (``box_values``) and an exact range exact. A value
  reached through two mixing maps (two layers) is not exact: its coordinates' ranges over the
  correlated first-layer outputs are smaller than the interval product suggests. Rules say their
  IBP is exact on boxes with ``exact_on_boxes``.
  """
  args = [i for i in node.inputs if i in bounded]
  if len(args) != 1 or args[0] not in exact:
    return
  if not getattr(node.rule, "exact_on_boxes", False) or node.rule.kind != "affine":
    return
  (arg,) = args
  name = getattr(node.key, "name", None)
  if name == "convert_element_type" and node.params["new_dtype"] != env[arg].dtype:
    return  # rounding to another precision
  same_shape = all(env[o].shape == env[arg].shape for o in node.outputs)
  if name in _REARRANGING or (name in _ELEMENTWISE and same_shape):
    exact.update(node.outputs)
    if arg in box_values:
      box_values.update(node.outputs)
  elif arg in box_values:
    exact.update(node.outputs)


def _ibp_node(node: Node, args) -> list:
  try:
    outs = node.rule.ibp(args, node.params, node.evaluate)
  except UnsupportedPrimitiveError as e:
    raise UnsupportedPrimitiveError(f"{e} [at {node.describe()}]") from None
  outs = [outs] if isinstance(outs, Box) else list(outs)
  if len(outs) != len(node.outputs):
    raise ValueError(
      f"the bound rule for {node.describe()} returned {len(outs)} outputs, expected "
      f"{len(node.outputs)}"
    )
  return outs


def _intersect(ibp: Box, tight: Box) -> Box:
  """The intersection of two sound boxes. A NaN bound (a CROWN pass that met an infinite bound,
  0 * inf) is no information: the other bound is kept, never the NaN read as a number."""
  lower = jnp.where(jnp.isnan(tight.lower), ibp.lower, jnp.maximum(ibp.lower, tight.lower))
  upper = jnp.where(jnp.isnan(tight.upper), ibp.upper, jnp.minimum(ibp.upper, tight.upper))
  return Box(lower, upper)


class _Pullback(NamedTuple):
  """An affine node's backward step: its offsets (shapes only when the node is linear), the
  pullback of row-stacked coefficients, and for a linear node 0, or NaN if a concrete input is not
  finite."""

  bounded: tuple
  offsets: list
  pullback: Callable
  poison: Any = None


class Propagator:
  """Holds the bounds of every value of one example and runs backward passes over them."""

  def __init__(self, graph: Graph, leaves, box: Box, options: dict):
    self.graph = graph
    self.options = options
    self.env: dict[int, Any] = dict(graph.consts)
    for i, v in zip(graph.inputs[:-1], leaves):
      self.env[i] = v
    self.input_id = graph.inputs[-1]
    self.env[self.input_id] = box
    self.producer = graph.producer_index()
    self.batch_size = box.shape[0]
    self._linear: dict[int, Any] = {}  # node index -> linearisation, fixed once computed

  # -- forward ---------------------------------------------------------------------------------

  def forward(
    self,
    crown_chunk_size: int | None | bool = False,
    sparse: bool = True,
    alphas=None,
    floor=None,
    needed=None,
    pack: bool = False,
  ) -> dict:
    """Bounds for every value in topological order.

    With ``crown_chunk_size`` other than ``False`` (full CROWN), the bounded inputs of every node
    that is not affine, unless IBP gives their exact range already (:func:`_track_exact`, e.g. the
    first layer's pre-activations), are first tightened by CROWN backward passes (at most
    ``crown_chunk_size`` (row, example) pairs each, ``None`` for all rows at once), intersected with
    their IBP bounds.
    With ``sparse``, only the elements whose relaxation the current bounds leave inexact (unstable
    ReLUs) get backward passes; the relaxation of the others is exact already and stays so on any
    sub-interval, so tighter bounds would not change it.

    α-CROWN's passes (alpha_crown.py) add: ``alphas[i]``, the relaxation parameters of value ``i``'s
    rows; ``floor[i]``, bounds to intersect with too (values without parameters then keep their
    floor: recomputing them would give the same bounds); ``needed[i]``, the elements to bound, fixed
    so that row ``p`` means the same element in every pass. Returns ``{i: (Box, needed_i)}`` for the
    refined values. ``pack``: see :meth:`crown_bounds_of`.
    """
    refined = {}
    box_values, exact = {self.input_id}, {self.input_id}
    for node in self.graph.nodes:
      if (
        node.bounded
        and crown_chunk_size is not False
        and getattr(node.rule, "kind", "") != "affine"
      ):
        for i in node.inputs:
          if i in self.graph.bounded and i not in exact and i not in refined:
            if needed is not None:
              need = needed[i]
            else:
              need = self._inexact_elements(i) if sparse else None
            bounds = self.env[i]
            if floor is None or (alphas is not None and i in alphas):
              rows_alphas = None if alphas is None else alphas.get(i)
              tight = self.crown_bounds_of(i, crown_chunk_size, need, rows_alphas, pack)
              bounds = _intersect(bounds, tight)
            if floor is not None:
              bounds = _intersect(bounds, floor[i])
            self.env[i] = bounds
            refined[i] = (bounds, need)
      args = [self.env[i] for i in node.inputs]
      outs = _ibp_node(node, args) if node.bounded else node.evaluate(*args)
      self.env.update(zip(node.outputs, outs))
      if node.bounded and crown_chunk_size is not False:  # only full CROWN asks
        _track_exact(node, self.env, self.graph.bounded, box_values, exact)
    return refined

  def _inexact_elements(self, value: int):
    """Elements of ``value`` whose bounds matter to some non-affine node that reads it: those the
    node's relaxation does not represent exactly (``None``: all of them)."""
    needed = None
    for node in self.graph.nodes:
      if value not in node.inputs or getattr(node.rule, "kind", "") == "affine":
        continue
      if not all(i in self.env for i in node.inputs):
        return None  # a later node that needs more than this value: keep every element
      args = [self.env[i] for i in node.inputs]
      lin = node.rule.linearize(args, node.params, node.evaluate, self.options)
      if not isinstance(lin, Relaxation) or node.inputs[lin.index] != value:
        return None
      b = lin.bounds
      exact = (b.lower_slope == b.upper_slope) & (b.lower_offset == b.upper_offset)
      inexact = jnp.broadcast_to(~exact, self.env[value].shape)
      needed = inexact if needed is None else needed | inexact
    return needed

  # -- backward --------------------------------------------------------------------------------

  def _linearize(self, index: int, node: Node, relax: bool):
    key = (index, relax)
    if key not in self._linear:
      args = [self.env[i] for i in node.inputs]
      lin = node.rule.linearize(args, node.params, node.evaluate, self.options)
      if isinstance(lin, Relaxation) and not relax:
        lin = None
      if isinstance(lin, Affine):
        lin = self._affine_pullback(node.evaluate, args, lin)
      self._linear[key] = lin
    return self._linear[key]

  @staticmethod
  def _affine_pullback(evaluate, args, affine: Affine):
    """The node's value with its bounded args at zero (the offset; only its shape for a linear
    node, which has none) and a pullback of row-stacked coefficients: the rule's ``transpose`` if it
    has one, else JAX's VJP vmapped over rows."""
    bounded = affine.bounded

    def fn(*values):
      full = list(args)
      for i, v in zip(bounded, values):
        full[i] = v
      return evaluate(*full)

    zeros = [jnp.zeros(args[i].shape, args[i].dtype) for i in bounded]
    if affine.transpose is not None:
      offsets = jax.eval_shape(fn, *zeros) if affine.linear else fn(*zeros)
      pullback = affine.transpose
    else:
      offsets, pullback = jax.vjp(fn, *zeros)  # unused offsets of a linear node: compiled away
      pullback = jax.vmap(pullback)
    if not affine.linear:
      # An infinite offset gives NaN, never +-inf: the coefficients reaching it have already
      # combined the layers above (`(w_y - w_j) * inf`, one sign), where the value computes each
      # layer's `w * inf` and may meet `inf - inf`.
      offsets = [jnp.where(jnp.isinf(o), jnp.nan, o) for o in offsets]
      return _Pullback(bounded, offsets, pullback)
    # No offset, but an inf weight must still poison the bounds: pulled back through the finite
    # layers above first, coefficients would meet it as `(w_y - w_j) * inf`, a finite sign times
    # inf, where the value itself is `inf - inf` (NaN). The offset `0 * inf` made them NaN before.
    concrete = [jnp.all(jnp.isfinite(a)) for i, a in enumerate(args) if i not in bounded]
    poison = jnp.where(jnp.all(jnp.stack(concrete)), 0.0, jnp.nan) if concrete else None
    shapes = [jax.ShapeDtypeStruct(jnp.shape(o), jnp.result_type(o)) for o in offsets]
    return _Pullback(bounded, shapes, pullback, poison)

  def upstream_nodes(self, target: int) -> list[int]:
    """Indices of the bounded nodes the backward pass from ``target`` visits, last first."""
    needed, visited = {target}, []
    for index in range(self.producer.get(target, -1), -1, -1):
      node = self.graph.nodes[index]
      if node.bounded and any(o in needed for o in node.outputs):
        visited.append(index)
        needed.update(i for i in node.inputs if i in self.graph.bounded)
    return visited

  def prepare(self, target: int, relax: bool = True):
    """Linearise every node the backward pass from ``target`` visits, in the current trace.

    Call it before running backward passes inside ``lax.map``, so that the cached linearisations
    belong to the outer trace rather than leak out of the loop body.
    """
    for index in self.upstream_nodes(target):
      self._linearize(index, self.graph.nodes[index], relax)

  def _relax_with(self, index: int, node: Node, alpha):
    """The node's optimisable relaxation at parameters ``alpha`` ``[P, R, ...]`` (not cached: it
    differs per row and per call)."""
    args = [self.env[i] for i in node.inputs]
    return node.rule.relax_with(args, node.params, node.evaluate, self.options, alpha)

  def backward(
    self, target: int, lam, relax: bool = True, alphas=None, examples=None, keep_input=False
  ):
    """Lower bounds ``[R, N]`` of ``<lam[r, n], value(target)[n]>`` over the input box.

    With ``relax=False`` only affine nodes are passed through; the first non-affine node meets its
    interval bounds (this is IBP with the spec folded into the trailing affine layers).
    ``alphas`` (α-CROWN) maps node indices to relaxation parameters ``[P, R, ...]``, one set per
    row, for nodes whose rule has ``relax_with``; other nodes use their fixed linearisation.

    ``examples`` ``[R, N]`` (packed rows, see :meth:`crown_bounds_of`): slot ``n`` of row ``r``
    belongs to example ``examples[r, n]`` instead of ``n``; every per-example quantity (relaxations,
    offsets, interval bounds) is gathered for it. Affine maps are applied as they are, so they must
    be the same for every example (``Graph.shared_maps``; the caller checks).

    ``keep_input``: return ``(bias, lam_x)`` instead, the coefficients ``lam_x`` ``[R, *box]`` left
    on the input and the bias without their interval term: ``<lam, value> >= <lam_x, x> + bias``
    for every ``x`` in the box, a linear bound to compose with a bound of ``x`` itself.
    """
    if examples is not None and (alphas is not None or keep_input):
      raise ValueError("packed rows (examples) combine with neither alphas nor keep_input")
    if target not in self.graph.bounded:  # a constant: no coefficients reach the input
      bias = _contract(lam, self.env[target])
      return (bias, self._no_input_coefficients(lam)) if keep_input else bias
    axis = self.graph.batch_axis
    slot = functools.partial(_per_slot, examples)
    lams = {target: lam}
    dense = _dense_shape(lam)
    rows, dtype = dense.shape[0], dense.dtype
    bias = jnp.zeros((rows, self.batch_size), dtype)
    stop = self.producer.get(target, -1)  # -1: the target is the input itself
    for index in range(stop, -1, -1):
      node = self.graph.nodes[index]
      if not node.bounded or not any(o in lams for o in node.outputs):
        continue
      out_lams = [lams.pop(o, None) for o in node.outputs]
      if any(isinstance(lo, windows.Window) for lo in out_lams):
        step = None if alphas is not None else self._window_step(index, node, out_lams, examples)
        if step is not None:
          step_bias, in_lams = step
          bias += step_bias
          for i, in_lam in in_lams:
            self._accumulate(lams, i, in_lam)
          continue
        out_lams = [_dense(lo) for lo in out_lams]
      if relax and alphas is not None and index in alphas:
        lin = self._relax_with(index, node, alphas[index])
      else:
        lin = self._linearize(index, node, relax)
      if lin is None:
        for o, lo in zip(node.outputs, out_lams):
          if lo is not None:
            bias += self._interval_term(lo, slot(self.env[o], axis[o]), axis[o])
      elif isinstance(lin, Relaxation):
        (lo,) = out_lams
        pos, neg = jnp.maximum(lo, 0), jnp.minimum(lo, 0)
        b = lin.bounds
        arg = node.inputs[lin.index]
        z, nd = axis[arg], len(self.env[arg].shape)
        bias += _contract_offset(pos, slot(b.lower_offset, z, nd), z, 1)
        bias += _contract_offset(neg, slot(b.upper_offset, z, nd), z, -1)
        slopes = slot(b.lower_slope, z, nd), slot(b.upper_slope, z, nd)
        self._accumulate(lams, arg, pos * slopes[0] + neg * slopes[1])
      else:
        bounded, offsets, pullback, poison = lin
        if poison is not None:
          bias += jax.lax.stop_gradient(poison).astype(bias.dtype)
        cotangents = [
          jnp.zeros((rows,) + tuple(off.shape), dtype) if lo is None else lo
          for lo, off in zip(out_lams, offsets)
        ]
        for o, lo, off in zip(node.outputs, out_lams, offsets):
          if lo is not None and not isinstance(off, jax.ShapeDtypeStruct):  # a linear node: none
            bias += _contract(lo, slot(off, axis[o], len(self.env[o].shape)), axis[o])
        in_lams = pullback(cotangents)
        for i, in_lam in zip(bounded, in_lams):
          self._accumulate(lams, node.inputs[i], in_lam)
    lam_x = lams.pop(self.input_id, None)
    if lams:
      raise RuntimeError(f"internal error: coefficients left on values {sorted(lams)}")
    if isinstance(lam_x, windows.Window):
      if not keep_input:
        return bias + windows.interval_term(lam_x, self.env[self.input_id], examples)
      lam_x = _dense(lam_x)
    if keep_input:
      return bias, self._no_input_coefficients(lam) if lam_x is None else lam_x
    if lam_x is not None:
      bias += self._interval_term(lam_x, slot(self.env[self.input_id], 0), 0)
    return bias

  def _no_input_coefficients(self, lam):
    lam = _dense_shape(lam)
    return jnp.zeros((lam.shape[0],) + self.env[self.input_id].shape, lam.dtype)

  @staticmethod
  def _interval_term(lam, box: Box, axis: int):
    """The lower bound of ``<lam, value>`` over the value's interval bounds."""
    return _contract(jnp.maximum(lam, 0), box.lower, axis) + _contract(
      jnp.minimum(lam, 0), box.upper, axis
    )

  @staticmethod
  def _accumulate(lams, key, lam):
    lams[key] = lam if key not in lams else _dense(lams[key]) + _dense(lam)

  def _window_step(self, index: int, node: Node, out_lams, examples):
    """The backward step through ``node`` for rows kept on windows (windows.py): ``(bias, [(input
    id, coefficients), ...])``, or ``None`` where the node has no window step (the rows are then
    made dense): one output, read and written as ``[N, *spatial, C]``, and a node that is a
    channels-last convolution, an element-wise affine map (``add``, ``sub``, ``neg``, ``mul`` or
    ``div`` by a concrete value, a copy or a conversion, whose rule makes it affine only within one
    type) of values of the output's shape, an element-wise relaxation, or one met with its interval
    bounds."""
    if len(node.outputs) != 1:  # e.g. split
      return None
    (out,), (lam,) = node.outputs, out_lams
    value = self.env[out]  # a Box: every value a row reaches is bounded
    if value.shape[1:-1] != lam.spatial or self.graph.batch_axis.get(out) != 0:
      return None
    lin = self._linearize(index, node, True)
    gather = lambda a, **kw: windows.gather(a, lam, examples, **kw)
    if lin is None:  # met with its interval bounds
      return windows.interval_term(lam, value, examples), []
    args = [self.env[i] for i in node.inputs]
    same = lambda i: args[i].shape == value.shape and self.graph.batch_axis[node.inputs[i]] == 0
    if isinstance(lin, Relaxation):
      if not same(lin.index):
        return None
      b = lin.bounds
      pos, neg = jnp.maximum(lam.values, 0), jnp.minimum(lam.values, 0)
      # One offset per row and slot, as packed rows have them.
      bias = _contract_offset(pos, gather(b.lower_offset), 0, 1)
      bias += _contract_offset(neg, gather(b.upper_offset), 0, -1)
      values = pos * gather(b.lower_slope) + neg * gather(b.upper_slope)
      return bias, [(node.inputs[lin.index], lam._replace(values=values))]
    bounded, offsets, _, poison = lin
    name = getattr(node.key, "name", None)
    if name == "conv_general_dilated":
      kernel = args[1]
      if bounded != (0,) or jnp.ndim(kernel) != len(value.shape):
        return None
      pulled = windows.through_conv(lam, kernel, node.params, args[0].shape[1:-1])
      if pulled is None:
        return None
      bias = jnp.zeros(lam.origin.shape[:2], lam.values.dtype)
      if poison is not None:
        bias += jax.lax.stop_gradient(poison).astype(bias.dtype)
      return bias, [(node.inputs[0], pulled)]
    if name not in _WINDOW_ELEMENTWISE or not all(same(i) for i in bounded):
      return None
    if name in ("mul", "div") and (len(bounded) != 1 or (name == "div" and bounded != (0,))):
      return None
    pull = lambda i: lam.values  # add, a copy, a conversion
    if name == "neg":
      pull = lambda i: -lam.values
    elif name == "sub":
      pull = lambda i: lam.values if i == 0 else -lam.values
    elif name == "mul":
      pull = lambda i: lam.values * gather(args[1 - i])
    elif name == "div":
      pull = lambda i: lam.values / gather(args[1], fill=1)
    bias = windows.contract(lam.values, gather(offsets[0]))
    return bias, [(node.inputs[i], lam._replace(values=pull(i))) for i in bounded]

  # -- full CROWN intermediate bounds -------------------------------------------------------------

  # Memory of one backward pass per (row, example) pair, in units of the per-example input: the
  # chunk is fixed before the forward pass, when the input is the only bounded value. XLA:CPU's
  # plan for DM-small's and cnn_small's full CROWN (MNIST) is 21-30 units (at 0.25 GiB: 0.27 and
  # 0.22 GiB planned), and a convolution transposed into few channels (the first layer's, back to
  # the image) can take a workspace outside the plan: at 8 units, a 2 GiB limit became a >20 GB
  # allocation there (std::bad_alloc). Nets whose layers are much wider than their input plan more
  # per unit; check with ``python -m bench.crown_memory``.
  MEMORY_UNITS_PER_ROW = 32
  # Packed rows (crown_bounds_of's pack) also hold their slots' relaxations and bounds, gathered:
  # XLA planned 1.2-1.7x the unpacked pass's memory at the same chunk on the same two nets.
  MEMORY_UNITS_PER_PACKED_ROW = 56

  def chunk_for_memory(self, memory_limit: int, pack: bool = False) -> int:
    """The ``chunk_size`` (row, example pairs per backward pass) that fits ``memory_limit`` bytes.
    Call it before :meth:`forward` (the unit is then the input's size, as calibrated)."""
    units = self.MEMORY_UNITS_PER_PACKED_ROW if pack else self.MEMORY_UNITS_PER_ROW
    return max(1, memory_limit // (units * self.largest_value_bytes()))

  def largest_value_bytes(self) -> int:
    """Bytes of the largest bounded value computed so far, for one example."""
    sizes = [
      math.prod(v.shape) // self.batch_size * jnp.dtype(v.dtype).itemsize
      for v in self.env.values()
      if isinstance(v, Box)
    ]
    return max(sizes, default=1)

  def row_chunks(self, target: int, chunk_size: int | None) -> tuple[int, int]:
    """``(chunk, num_chunks)``: how :meth:`crown_bounds_of` splits ``target``'s ``2 x size`` rows."""
    shape = self.env[target].shape
    n = shape[self.graph.batch_axis.get(target, 0)]
    rows = 2 * (math.prod(shape) // n)
    chunk = rows if chunk_size is None else max(1, min(chunk_size // n, rows))
    return chunk, -(-rows // chunk)

  def crown_bounds_of(
    self, target: int, chunk_size: int | None, needed=None, alphas=None, pack: bool = False
  ) -> Box:
    """CROWN bounds of the elements of ``target`` (rows: +e_k for lower, -e_k for upper, for all
    examples at once). One backward pass carries at most ``chunk_size`` (row, example) pairs, so
    memory is about ``chunk_size`` times the largest per-example value, whatever the batch.

    ``needed`` (booleans of the target's shape): each example bounds only its own needed elements,
    the others get ``[-inf, inf]`` (no information). Row ``p`` of example ``n`` bounds the
    ``p // 2``-th needed element of example ``n``, so the rows an example needs come first, and the
    chunks past the example with the most needed elements are skipped at run time (``lax.cond``):
    the cost follows the largest per-example count of needed elements (unstable neurons), not their
    union over the batch, while every shape stays static (jit).

    ``alphas`` (α-CROWN): node index -> ``[P, chunk x num_chunks, ...]`` (see :meth:`row_chunks`),
    row ``p`` being the one described above; each chunk's slice goes to its backward pass.

    ``pack`` (with ``needed``, without ``alphas``): the rows of all examples are packed, so the cost
    follows the batch's total count instead (see :meth:`_packed_bounds_of`).
    """
    if pack and needed is not None and alphas is None:
      return self._packed_bounds_of(target, self.row_chunks(target, chunk_size)[0], needed)
    axis, n, per_example, dtype = self._layout(target)
    size = math.prod(per_example)
    chunk, num_chunks = self.row_chunks(target, chunk_size)
    rows = num_chunks * chunk
    if needed is None:  # every element, in order
      order = jnp.broadcast_to(jnp.arange(size), (n, size))
      count = jnp.full((n,), size)
    else:
      wanted = jnp.moveaxis(needed, axis, 0).reshape(n, size)
      order = jnp.argsort(~wanted, axis=1, stable=True)  # per example, its needed elements first
      count = jnp.sum(wanted, axis=1)  # [N]
    # Row p bounds element[p, n] of example n: from below for even p, from above for odd p.
    element = jnp.take(order, jnp.minimum(jnp.arange(rows) // 2, size - 1), axis=1).T  # [rows, N]
    valid = jnp.arange(rows)[:, None] < 2 * count[None, :]  # [rows, N]
    sign = jnp.where(jnp.arange(rows) % 2 == 0, 1, -1)[:, None] * valid
    windowed = alphas is None and self._starts_windows(target)

    def run(start):
      rows_of = lambda a: lax.dynamic_slice_in_dim(a, start, chunk)  # [chunk, N]
      if windowed:
        lam = windows.start(rows_of(element), rows_of(sign), per_example, dtype)
        return self.backward(target, lam)
      lam = (
        jax.nn.one_hot(rows_of(element), size, dtype=dtype) * rows_of(sign).astype(dtype)[..., None]
      )
      lam = lam.reshape((chunk, n) + per_example)
      sliced = None
      if alphas is not None:
        sliced = {k: lax.dynamic_slice_in_dim(a, start, chunk, axis=1) for k, a in alphas.items()}
      return self.backward(target, jnp.moveaxis(lam, 1, axis + 1), alphas=sliced)  # [chunk, N]

    starts = jnp.arange(num_chunks) * chunk
    out = self._passes(target, run, starts, 2 * jnp.max(count), (chunk, n), dtype).reshape(-1, n)
    column = jnp.where(valid, element, size)  # index `size` is dropped by the scatter
    example = jnp.broadcast_to(jnp.arange(n), (rows, n))
    lower = jnp.full((n, size), -jnp.inf, dtype)
    lower = lower.at[example[0::2], column[0::2]].set(out[0::2], mode="drop")
    upper = jnp.full((n, size), jnp.inf, dtype)
    upper = upper.at[example[1::2], column[1::2]].set(-out[1::2], mode="drop")
    return self._as_target(target, lower, upper)

  def _starts_windows(self, target: int) -> bool:
    """Whether ``target``'s rows start on windows (windows.py): with the ``patches`` option (on
    unless ``False``), for a ``[N, *spatial, C]`` value computed through a convolution."""
    if self.options.get("patches") is False:
      return False
    if not windows.has_windows(self.env[target].shape, self.graph.batch_axis.get(target, 0)):
      return False
    nodes = (self.graph.nodes[i] for i in self.upstream_nodes(target))
    return any(getattr(n.key, "name", None) == "conv_general_dilated" for n in nodes)

  def _passes(self, target: int, run, starts, most, shape, dtype):
    """``run(start)`` stacked over ``starts``; those at or past ``most`` are skipped at run time
    (``lax.cond``) and give zeros of ``shape``. One pass runs inline."""
    if len(starts) == 1:
      return run(starts[0])[None]
    self.prepare(target)
    skip = lambda start: jnp.zeros(shape, dtype)
    return lax.map(lambda s: lax.cond(s < most, run, skip, s), starts)

  def _layout(self, target: int):
    """``(batch axis, N, per-example shape, dtype)`` of ``target``; rows are built batch-first."""
    shape = self.env[target].shape
    axis = self.graph.batch_axis.get(target, 0)
    return axis, shape[axis], shape[:axis] + shape[axis + 1 :], self.env[target].dtype

  def _as_target(self, target: int, lower, upper) -> Box:
    """Bounds ``[N, size]`` (batch-first, flattened) as a :class:`Box` of ``target``'s shape."""
    axis, n, per_example, _ = self._layout(target)
    per_row = lambda o: jnp.moveaxis(o.reshape((n,) + per_example), 0, axis)
    return Box(per_row(lower), per_row(upper))

  def _packed_bounds_of(self, target: int, chunk: int, needed) -> Box:
    """:meth:`crown_bounds_of` with the needed (example, element) pairs of the whole batch packed
    into the passes' slots: a pass has ``chunk`` rows (a lower and an upper row per pair) of ``N``
    slots, and slot ``n`` may hold any example's pair, its relaxations gathered for it
    (``backward(..., examples=...)``). Passes past the batch's total count are skipped, so an example
    with many unstable neurons no longer makes every other example's slots run empty (on DM-small,
    the most unstable example of a batch of 100 has about twice the mean count). The slot axis is
    the batch (the affine pullbacks were built for ``N`` examples), so a pass carries at least
    ``2 N`` pairs, more than a ``chunk_size`` below that.
    """
    axis, n, per_example, dtype = self._layout(target)
    size = math.prod(per_example)
    rows = max(2, chunk - chunk % 2)  # rows 2j and 2j + 1 bound the same pairs, from both sides
    per_pass = rows // 2 * n
    wanted = jnp.moveaxis(needed, axis, 0).reshape(n * size)
    order = jnp.argsort(~wanted, stable=True)  # the needed (example, element) pairs first
    total = jnp.sum(wanted)
    starts = jnp.arange(-(-(n * size) // per_pass)) * per_pass
    windowed = self._starts_windows(target)

    def pairs(start):  # [rows / 2, N]: pair index, example, element, and whether it is needed
      q = start + jnp.arange(per_pass).reshape(rows // 2, n)
      pair = order[jnp.minimum(q, n * size - 1)]
      return pair, pair // size, pair % size, q < total

    def run(start):
      _, example, element, valid = pairs(start)
      v = valid.astype(dtype)
      sign = jnp.stack([v, -v], axis=1).reshape(rows, n)
      element = jnp.repeat(element, 2, axis=0)
      if windowed:
        lam = windows.start(element, sign, per_example, dtype)
      else:
        lam = jax.nn.one_hot(element, size, dtype=dtype) * sign[..., None]
        lam = jnp.moveaxis(lam.reshape((rows, n) + per_example), 1, axis + 1)
      return self.backward(target, lam, examples=jnp.repeat(example, 2, axis=0))  # [rows, N]

    out = self._passes(target, run, starts, total, (rows, n), dtype)  # [passes, rows, N]
    pair, _, _, valid = jax.vmap(pairs)(starts)
    index = jnp.where(valid, pair, n * size).reshape(-1)  # index n * size is dropped
    lower = (
      jnp.full((n * size,), -jnp.inf, dtype).at[index].set(out[:, 0::2].reshape(-1), mode="drop")
    )
    upper = (
      jnp.full((n * size,), jnp.inf, dtype).at[index].set(-out[:, 1::2].reshape(-1), mode="drop")
    )
    return self._as_target(target, lower, upper)
