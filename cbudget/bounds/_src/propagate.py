"""Forward interval propagation and the CROWN backward pass over a traced :class:`Graph`.

Every value that depends on the input has the batch as its leading axis, ``[N, ...]``, and ``f``
treats examples independently. Linear coefficients ``lam`` for such a value have shape
``[R, N, ...]``: one row per bound being computed (a spec row, or a neuron of an intermediate layer,
with a sign), for every example at once. The backward pass returns, per row and example, a lower
bound ``[R, N]`` of ``<lam[r, n], value[n]>`` over example ``n``'s box; sums never cross the batch
axis, so examples never mix.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cbudget.bounds._src.box import Box
from cbudget.bounds._src.graph import Graph, Node
from cbudget.bounds._src.registry import Affine, Relaxation, UnsupportedPrimitiveError


def _contract(lam, value):
  """``sum(lam * value)`` per row and example: ``[R, N, ...] x [N, ...] -> [R, N]``.

  A batched matrix-vector product rather than a broadcast multiply and sum: XLA's CPU backend
  materialises the broadcast ``value`` for every row, and its gradient w.r.t. ``value`` (a sum over
  rows) is a slow reduction there; as a ``dot_general`` both are one pass over ``lam``.
  """
  r, n = lam.shape[:2]
  if jnp.ndim(value) == lam.ndim:  # one value per row (an optimised relaxation, alpha_crown.py)
    return jnp.sum((lam * value).reshape(r, n, -1), axis=-1)
  value = jnp.broadcast_to(value, lam.shape[1:]).reshape(n, -1)
  return jnp.einsum("rnk,nk->rn", lam.reshape(r, n, -1), value.astype(lam.dtype))


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
    self._linear: dict[int, Any] = {}  # node index -> linearisation, fixed once computed

  # -- forward ---------------------------------------------------------------------------------

  def forward(self, refine=None):
    """Bounds for every value in topological order; ``refine(index, node)`` may first tighten a
    node's bounded inputs (full CROWN does, with backward passes)."""
    for index, node in enumerate(self.graph.nodes):
      if node.bounded and refine is not None:
        refine(index, node)
      args = [self.env[i] for i in node.inputs]
      outs = _ibp_node(node, args) if node.bounded else node.evaluate(*args)
      self.env.update(zip(node.outputs, outs))

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
    """The node's value with its bounded args at zero (the offset) and a pullback of row-stacked
    coefficients: the rule's ``transpose`` if it has one, else JAX's VJP vmapped over rows."""
    bounded = affine.bounded

    def fn(*values):
      full = list(args)
      for i, v in zip(bounded, values):
        full[i] = v
      return evaluate(*full)

    zeros = [jnp.zeros(args[i].shape, args[i].dtype) for i in bounded]
    if affine.transpose is not None:
      return bounded, fn(*zeros), affine.transpose
    offsets, pullback = jax.vjp(fn, *zeros)
    return bounded, offsets, jax.vmap(pullback)

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
    """The node's optimisable relaxation at parameters ``alpha`` ``[P, R, N, ...]`` (not cached:
    it differs per row and per call)."""
    args = [self.env[i] for i in node.inputs]
    return node.rule.relax_with(args, node.params, node.evaluate, self.options, alpha)

  def backward(self, target: int, lam, relax: bool = True, alphas=None):
    """Lower bounds ``[R, N]`` of ``<lam[r, n], value(target)[n]>`` over the input box.

    With ``relax=False`` only affine nodes are passed through; the first non-affine node meets its
    interval bounds (this is IBP with the spec folded into the trailing affine layers).
    ``alphas`` (α-CROWN) maps node indices to relaxation parameters ``[P, R, N, ...]``, one set per
    row, for nodes whose rule has ``relax_with``; other nodes use their fixed linearisation.
    """
    if target not in self.graph.bounded:
      return _contract(lam, self.env[target])
    lams = {target: lam}
    bias = jnp.zeros(lam.shape[:2], lam.dtype)
    stop = self.producer.get(target, -1)  # -1: the target is the input itself
    for index in range(stop, -1, -1):
      node = self.graph.nodes[index]
      if not node.bounded or not any(o in lams for o in node.outputs):
        continue
      out_lams = [lams.pop(o, None) for o in node.outputs]
      if relax and alphas is not None and index in alphas:
        lin = self._relax_with(index, node, alphas[index])
      else:
        lin = self._linearize(index, node, relax)
      if lin is None:
        for o, lo in zip(node.outputs, out_lams):
          if lo is not None:
            box = self.env[o]
            bias += _contract(jnp.maximum(lo, 0), box.lower) + _contract(
              jnp.minimum(lo, 0), box.upper
            )
      elif isinstance(lin, Relaxation):
        (lo,) = out_lams
        pos, neg = jnp.maximum(lo, 0), jnp.minimum(lo, 0)
        b = lin.bounds
        bias += _contract(pos, b.lower_offset) + _contract(neg, b.upper_offset)
        self._accumulate(lams, node.inputs[lin.index], pos * b.lower_slope + neg * b.upper_slope)
      else:
        bounded, offsets, pullback = lin
        cotangents = [
          jnp.zeros((lam.shape[0],) + jnp.shape(off), lam.dtype) if lo is None else lo
          for lo, off in zip(out_lams, offsets)
        ]
        for lo, off in zip(out_lams, offsets):
          if lo is not None:
            bias += _contract(lo, off)
        in_lams = pullback(cotangents)
        for i, in_lam in zip(bounded, in_lams):
          self._accumulate(lams, node.inputs[i], in_lam)
    lam_x = lams.pop(self.input_id, None)
    if lam_x is not None:
      box = self.env[self.input_id]
      bias += _contract(jnp.maximum(lam_x, 0), box.lower) + _contract(
        jnp.minimum(lam_x, 0), box.upper
      )
    if lams:
      raise RuntimeError(f"internal error: coefficients left on values {sorted(lams)}")
    return bias

  @staticmethod
  def _accumulate(lams, key, lam):
    lams[key] = lam if key not in lams else lams[key] + lam

  # -- full CROWN intermediate bounds -------------------------------------------------------------

  def largest_value_bytes(self) -> int:
    """Bytes of the largest value that depends on x, for one example."""
    sizes = [
      math.prod(v.shape[1:]) * jnp.dtype(v.dtype).itemsize
      for v in self.env.values()
      if isinstance(v, Box)
    ]
    return max(sizes, default=1)

  def row_chunks(self, target: int, chunk_size: int | None) -> tuple[int, int]:
    """``(chunk, num_chunks)``: how :meth:`crown_bounds_of` splits ``target``'s ``2 x size`` rows."""
    shape = self.env[target].shape
    rows = 2 * math.prod(shape[1:])
    chunk = rows if chunk_size is None else max(1, min(chunk_size // shape[0], rows))
    return chunk, -(-rows // chunk)

  def crown_bounds_of(self, target: int, chunk_size: int | None, alphas=None) -> Box:
    """CROWN bounds of every element of ``target`` (rows: +e_k for lower, -e_k for upper, for all
    examples at once). One backward pass carries at most ``chunk_size`` (row, example) pairs, so
    memory is about ``chunk_size`` times the largest per-example value, whatever the batch.
    ``alphas`` (α-CROWN): node index -> ``[P, chunk x num_chunks, N, ...]`` (see :meth:`row_chunks`),
    each chunk's slice going to its backward pass."""
    shape = self.env[target].shape
    n, per_example = shape[0], shape[1:]
    size = math.prod(per_example)
    dtype = self.env[target].dtype
    rows = 2 * size
    chunk, num_chunks = self.row_chunks(target, chunk_size)

    def run(start):
      r = start + jnp.arange(chunk)
      sign = jnp.where(r < size, 1, -1).astype(dtype)
      valid = (r < rows).astype(dtype)
      lam = jax.nn.one_hot(r % size, size, dtype=dtype) * (sign * valid)[:, None]
      lam = jnp.broadcast_to(lam.reshape((chunk, 1) + per_example), (chunk,) + shape)
      sliced = None
      if alphas is not None:
        sliced = {k: lax.dynamic_slice_in_dim(a, start, chunk, axis=1) for k, a in alphas.items()}
      return self.backward(target, lam, alphas=sliced)  # [chunk, N]

    if num_chunks == 1:
      out = run(0)
    else:
      self.prepare(target)
      out = lax.map(run, jnp.arange(num_chunks) * chunk).reshape(-1, n)
    lower = out[:size].T.reshape(shape)
    upper = -out[size:rows].T.reshape(shape)
    return Box(lower, upper)
