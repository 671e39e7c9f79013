"""The public entry points: ``ibp(f)`` and ``crown(f)``, one traversal of one traced graph each."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from cbudget.bounds._src import builtin_rules
from cbudget.bounds._src.box import Box, as_box
from cbudget.bounds._src.graph import build_graph
from cbudget.bounds._src.propagate import Propagator
from cbudget.bounds._src.registry import Registry
from cbudget.bounds._src.relaxations import SLOPE_CHOICES

DEFAULT_REGISTRY = builtin_rules.register_builtins(Registry())
"""The rules ``ibp``/``crown`` use unless given ``registry=``; ``register_*`` add to it."""

INTERMEDIATE_METHODS = ("ibp", "crown")


def _check_inputs(box, spec):
  box = as_box(box)
  if not isinstance(box.lower, jax.core.Tracer) and not isinstance(box.upper, jax.core.Tracer):
    if not (bool(jnp.all(jnp.isfinite(box.lower))) and bool(jnp.all(jnp.isfinite(box.upper)))):
      raise ValueError("the box has non-finite bounds; bounds over infinite boxes are not supported")
    if bool(jnp.any(box.lower > box.upper)):
      raise ValueError("the box is empty somewhere (lower > upper)")
  if box.lower.ndim < 1:
    raise ValueError("the box must have a leading batch axis: shape [N, ...]")
  n = box.lower.shape[0]
  if spec is not None:
    spec = jnp.asarray(spec)
    if spec.ndim != 3 or spec.shape[0] != n:
      raise ValueError(f"spec must have shape [N, S, K] with N = {n} (the batch), got {spec.shape}")
    spec = spec.astype(box.dtype)
  return box, spec


def _per_example(fn, params, box, spec, registry, body):
  """Trace ``fn`` on one example and vmap ``body(propagator, output_id, spec_row)`` over the batch."""
  dtype = box.dtype
  example = jax.ShapeDtypeStruct((1,) + box.lower.shape[1:], dtype)

  def one(lower, upper, spec_row):
    graph, leaves = build_graph(fn, params, example, registry)
    out_id = graph.outputs[0]
    prop = Propagator(graph, leaves, Box(lower[None], upper[None]), {})
    return body(prop, graph, out_id, spec_row)

  spec_axes = 0 if spec is not None else None
  return jax.vmap(one, in_axes=(0, 0, spec_axes))(box.lower, box.upper, spec)


def _output_box(prop, out_id) -> Box:
  value = prop.env[out_id]
  return value if isinstance(value, Box) else Box(value, value)


def _spec_rows(spec_row, out_shape, dtype):
  """Coefficient rows ``[S, *out_shape]`` for a spec ``[S, K]`` over an output ``[1, K]``."""
  if spec_row.shape[-1] != out_shape[-1] or len(out_shape) != 2:
    raise ValueError(f"spec [N, S, K] needs an output of shape [N, K]; the output per example is "
                     f"{out_shape} and K = {spec_row.shape[-1]}")
  return spec_row.reshape((spec_row.shape[0],) + out_shape).astype(dtype)


def _identity_rows(out_shape, dtype):
  size = 1
  for d in out_shape:
    size *= d
  return jnp.eye(size, dtype=dtype).reshape((size,) + tuple(out_shape))


def _bounds_from_rows(prop, out_id, rows, relax, need_upper):
  if need_upper:
    both = prop.backward(out_id, jnp.concatenate([rows, -rows]), relax=relax)
    s = rows.shape[0]
    return both[:s], -both[s:]
  lower = prop.backward(out_id, rows, relax=relax)
  return lower, jnp.full_like(lower, jnp.inf)


def ibp(fn: Callable, *, registry: Registry | None = None):
  """Interval bound propagation: ``ibp(fn)(params, box, spec=None) -> Box``.

  ``fn(params, x)`` maps a batch ``x`` of shape ``[N, ...]`` to outputs ``[N, K]`` and treats
  examples independently. ``box`` is a :class:`Box` of ``x``'s shape (any per-element widths).
  Without ``spec`` the result bounds ``fn(params, x)`` for every ``x`` in the box; with ``spec`` of
  shape ``[N, S, K]`` it bounds ``spec @ fn(params, x)`` (shape ``[N, S]``), the spec being folded
  into the trailing affine layers before their interval bounds are taken (never looser than
  applying interval arithmetic to ``spec`` afterwards, often tighter).
  """
  registry = DEFAULT_REGISTRY if registry is None else registry

  @functools.wraps(fn)
  def bound(params, box, spec=None) -> Box:
    box, spec = _check_inputs(box, spec)

    def body(prop, graph, out_id, spec_row):
      prop.forward()
      if spec_row is None:
        out = _output_box(prop, out_id)
        return Box(out.lower[0], out.upper[0])
      out = _output_box(prop, out_id)
      rows = _spec_rows(spec_row, out.shape, out.dtype)
      return Box(*_bounds_from_rows(prop, out_id, rows, relax=False, need_upper=True))

    return _per_example(fn, params, box, spec, registry, body)

  return bound


def crown(fn: Callable, intermediate: str = "ibp", *, relu_lower_slope: str = "adaptive",
          chunk_size: int | None = None, need_upper: bool = True,
          registry: Registry | None = None):
  """Linear relaxation propagated backward from the output (CROWN).

  Returns ``bound(params, box, spec=None) -> Box``.

  * ``intermediate="ibp"``: pre-activation bounds come from IBP (CROWN-IBP, Zhang et al. 2020).
  * ``intermediate="crown"``: they are computed by CROWN itself, layer by layer (full CROWN, Zhang et
    al. 2018); each is intersected with its IBP bound (both are sound, so the intersection is).
    ``chunk_size`` caps how many neuron rows one backward pass carries (memory ~ ``chunk_size`` times
    the largest layer); ``None`` runs all rows of a layer at once.
  * ``relu_lower_slope``: the lower line of an unstable ReLU (and of every one-kink activation):
    ``"adaptive"`` (slope 1 if ``u > -l`` else 0; CROWN's default), ``"zero"``, ``"one"`` or
    ``"parallel"`` (the upper line's slope). Every choice is sound.
  * ``spec`` ``[N, S, K]``: bound ``spec @ fn(params, x)`` (shape ``[N, S]``) with the spec as the
    first backward coefficients (e.g. margins ``logit_y - logit_j``). Without it, every output.
  * ``need_upper=False`` skips the upper bounds (returned as +inf), halving the work: certified
    training only needs lower bounds of margins.

  Final bounds are pure CROWN bounds, not intersected with IBP (intersect them yourself if wanted).
  """
  if intermediate not in INTERMEDIATE_METHODS:
    raise ValueError(f"intermediate must be one of {INTERMEDIATE_METHODS}, got {intermediate!r}")
  if relu_lower_slope not in SLOPE_CHOICES:
    raise ValueError(f"relu_lower_slope must be one of {SLOPE_CHOICES}, got {relu_lower_slope!r}")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
  registry = DEFAULT_REGISTRY if registry is None else registry
  options = {"relu_lower_slope": relu_lower_slope}

  @functools.wraps(fn)
  def bound(params, box, spec=None) -> Box:
    box, spec = _check_inputs(box, spec)

    def body(prop, graph, out_id, spec_row):
      prop.options = options
      if intermediate == "crown":
        refined = set()

        def refine(index, node):
          if node.rule.kind == "affine":
            return
          for i in node.inputs:
            if i in graph.bounded and i != prop.input_id and i not in refined:
              refined.add(i)
              tight = prop.crown_bounds_of(i, chunk_size)
              old = prop.env[i]
              prop.env[i] = Box(jnp.maximum(old.lower, tight.lower),
                                jnp.minimum(old.upper, tight.upper))

        prop.forward(refine)
      else:
        prop.forward()
      out = _output_box(prop, out_id)
      out_shape = out.shape
      if spec_row is None:
        rows = _identity_rows(out_shape, out.dtype)
        lower, upper = _bounds_from_rows(prop, out_id, rows, True, need_upper)
        return Box(lower.reshape(out_shape)[0], upper.reshape(out_shape)[0])
      rows = _spec_rows(spec_row, out_shape, out.dtype)
      return Box(*_bounds_from_rows(prop, out_id, rows, True, need_upper))

    return _per_example(fn, params, box, spec, registry, body)

  return bound
