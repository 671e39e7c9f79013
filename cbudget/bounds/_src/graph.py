"""Tracing a function to a flat graph of primitive nodes, the one traversal every method shares.

``f(params, x)`` is traced with ``jax.make_jaxpr``. Call primitives (``jit``, ``custom_jvp_call``,
``custom_vjp_call``, ``closed_call``, ``remat``) are inlined, except where the registry holds a rule for
the called function's name (e.g. ``leaky_relu``), which then becomes a single node. A value is
*bounded* when it depends on ``x``; the rest depends on ``params`` alone and is computed concretely,
with ordinary JAX, so BatchNorm statistics, normalisation constants and weights never get bounds.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from collections.abc import Callable

import jax
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

from cbudget.bounds._src import batching
from cbudget.bounds._src.registry import ActivationRule, Registry, UnsupportedPrimitiveError

# Call primitives and the param holding their body.
_CALLS = {
  prims.jit_p: "jaxpr",
  prims.closed_call_p: "call_jaxpr",
  prims.custom_jvp_call_p: "call_jaxpr",
  prims.custom_vjp_call_p: "call_jaxpr",
  prims.remat_p: "jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Node:
  """One primitive application (or one named call with a registered rule)."""

  key: Any  # the primitive, or the call's name for a named rule
  rule: Any  # the registered rule (None for concrete nodes)
  inputs: tuple[int, ...]  # value ids
  outputs: tuple[int, ...]
  bounded: bool  # does any input depend on x?
  params: dict
  evaluate: Callable[..., list]  # concrete evaluation: arrays -> list of output arrays
  where: str  # the enclosing named calls, for error messages

  def describe(self) -> str:
    name = self.key if isinstance(self.key, str) else str(self.key)
    return f"'{name}'" + (f" (inside {self.where})" if self.where else "")


@dataclasses.dataclass
class Graph:
  nodes: list[Node]
  inputs: list[int]  # ids of the flattened (params..., x) leaves
  outputs: list[int]
  consts: dict[int, Any]  # ids of literals and closed-over constants, with their values
  bounded: set[int]  # ids that depend on the bounded input
  batch_axis: dict[int, int]  # for each of those, the axis that holds the examples
  # Every affine node applies the same linear map to every example (batching.same_map_for_every_
  # example): full CROWN may then pack rows of different examples into one pass.
  shared_maps: bool = True

  def producer_index(self) -> dict[int, int]:
    return {out: i for i, node in enumerate(self.nodes) for out in node.outputs}


def _bind(primitive, params):
  bind_params = primitive.get_bind_params(params)

  def evaluate(*args):
    out = primitive.bind(*args, **bind_params)
    return list(out) if primitive.multiple_results else [out]

  return evaluate


def call_name(eqn) -> str | None:
  """The name of the function a call primitive applies, or None for ordinary primitives."""
  if eqn.primitive not in _CALLS:
    return None
  if "name" in eqn.params:
    return eqn.params["name"]
  body = eqn.params[_CALLS[eqn.primitive]]
  debug = getattr(getattr(body, "jaxpr", body), "debug_info", None)
  return getattr(debug, "func_name", None)


def _body(eqn):
  body = eqn.params[_CALLS[eqn.primitive]]
  if isinstance(body, jcore.ClosedJaxpr):
    return body.jaxpr, body.consts
  return body, ()


class _Builder:
  def __init__(self, registry: Registry, batch: int):
    self.registry = registry
    self.batch = batch
    self.nodes: list[Node] = []
    self.consts: dict[int, Any] = {}
    self.bounded: set[int] = set()
    self.axes: dict[int, int] = {}  # bounded value id -> its batch axis
    self.shared_maps = True  # see Graph.shared_maps
    self._next = 0

  def out_axes(self, eqn, rule, named: bool, in_axes, where) -> list[int]:
    """The batch axis of each output of ``eqn`` (see :mod:`batching`), or a clear error."""
    in_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    label = f"'{call_name(eqn) if named else eqn.primitive}'" + (
      f" inside {where}" if where else ""
    )
    try:
      if isinstance(rule, ActivationRule):  # element-wise by contract
        axes = batching.elementwise(in_axes, in_shapes, eqn.params)
      elif named:  # a named call bounded as a whole: read its body
        body, _ = _body(eqn)
        axes = infer_axes(body, in_axes, where)
      else:
        batch_rule = batching.builtin_batch_rule(eqn.primitive) or getattr(rule, "batch_rule", None)
        if batch_rule is None:
          raise batching.BatchMixingError(
            "cbudget.bounds does not know how it treats the batch axis; give the rule a "
            "batch_rule (register_affine/register_interval(..., batch_rule=...), e.g. "
            "cbudget.bounds.elementwise_batch_rule)"
          )
        axes = batch_rule(in_axes, in_shapes, eqn.params)
    except batching.BatchMixingError as e:
      raise batching.BatchMixingError(_mixing_message(label, e)) from None
    if len(axes) != len(eqn.outvars) or any(a is None for a in axes):
      raise ValueError(
        f"the batch rule of {label} gave {len(axes)} axes for {len(eqn.outvars)} outputs"
      )
    return list(axes)

  def new_id(self) -> int:
    self._next += 1
    return self._next

  def const(self, value) -> int:
    i = self.new_id()
    self.consts[i] = value
    return i

  def read(self, env, atom) -> int:
    if isinstance(atom, jcore.Literal):
      return self.const(atom.val)
    return env[atom]

  def inline(self, jaxpr, consts, in_ids, where: str) -> list[int]:
    env = {}
    for var, value in zip(jaxpr.constvars, consts):
      env[var] = self.const(value)
    for var, i in zip(jaxpr.invars, in_ids):
      env[var] = i
    for eqn in jaxpr.eqns:
      ins = [self.read(env, a) for a in eqn.invars]
      in_axes = [self.axes.get(i) for i in ins]
      is_bounded = any(i in self.bounded for i in ins)
      name = call_name(eqn)
      bounded_args = [k for k, i in enumerate(ins) if i in self.bounded]
      named_rule = self.registry.get(name) if name is not None and is_bounded else None
      if named_rule is not None and not getattr(named_rule, "accepts", lambda e, b: True)(
        eqn, bounded_args
      ):
        named_rule = None
      if name is not None and is_bounded and named_rule is None:
        body, body_consts = _body(eqn)
        label = f"{eqn.primitive}[name={name}]"
        outs = self.inline(body, body_consts, ins, f"{where} > {label}" if where else label)
      else:
        outs = [self.new_id() for _ in eqn.outvars]
        key = name if named_rule is not None else eqn.primitive
        rule = (
          named_rule if named_rule is not None else (self.registry.get(key) if is_bounded else None)
        )
        if is_bounded and rule is None:
          raise UnsupportedPrimitiveError(_unsupported_message(key, where, eqn))
        self.nodes.append(
          Node(
            key,
            rule,
            tuple(ins),
            tuple(outs),
            is_bounded,
            dict(eqn.params),
            _bind(eqn.primitive, eqn.params),
            where,
          )
        )
        if is_bounded:
          self.bounded.update(outs)
          axes = self.out_axes(eqn, rule, named_rule is not None, in_axes, where)
          self.axes.update(zip(outs, axes))
          if getattr(rule, "kind", "") == "affine" and self.shared_maps:
            in_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
            self.shared_maps = batching.same_map_for_every_example(
              eqn.primitive, eqn.params, in_shapes, in_axes, axes[0]
            )
      for var, i in zip(eqn.outvars, outs):
        env[var] = i
    return [self.read(env, a) for a in jaxpr.outvars]


def _mixing_message(label, reason) -> str:
  return (
    f"cbudget.bounds needs fn(params, x) to treat the examples of the batch independently (every "
    f"value that depends on x holds them on one axis, the leading one at the input), but {label} "
    f"does not: {reason}. Compute within each example instead (e.g. reduce, slice or contract "
    "other axes), or bound one example at a time."
  )


def infer_axes(jaxpr, in_axes, where: str) -> list:
  """Batch axes of a jaxpr's outputs given its inputs' (``None``: not bounded), by the built-in
  batch rules, recursing into calls. Used for named calls that a rule bounds as a whole."""
  env = dict(zip(jaxpr.invars, in_axes))
  read = lambda atom: None if isinstance(atom, jcore.Literal) else env.get(atom)
  for eqn in jaxpr.eqns:
    axes_in = [read(a) for a in eqn.invars]
    if all(a is None for a in axes_in):
      continue
    if eqn.primitive in _CALLS:
      body, _ = _body(eqn)
      outs = infer_axes(body, axes_in, where)
    else:
      rule = batching.builtin_batch_rule(eqn.primitive)
      if rule is None:
        raise batching.BatchMixingError(
          f"cbudget.bounds does not know how '{eqn.primitive}' (inside {where or 'a named call'}) "
          "treats the batch axis"
        )
      outs = rule(axes_in, [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars], eqn.params)
    env.update(zip(eqn.outvars, outs))
  return [read(a) for a in jaxpr.outvars]


def _unsupported_message(key, where, eqn) -> str:
  name = key if isinstance(key, str) else f"primitive '{key}'"
  location = f" inside {where}" if where else ""
  return (
    f"cbudget.bounds has no bound rule for {name}{location}, applied to a value that depends "
    f"on the bounded input (equation: {str(eqn).strip()[:200]}). Register one with "
    "cbudget.bounds.register_affine / register_activation / register_interval (keyed by the "
    "primitive, or by the name of an enclosing jit/custom_jvp function to bound it as a "
    "whole); see the README section 'Custom relaxations'."
  )


def build_graph(fn, params, x_like, registry: Registry) -> tuple[Graph, Any]:
  """Trace ``fn(params, x)`` and flatten it; ``x_like`` gives the bounded input's shape and dtype.

  Returns the graph and the flattened params leaves (the concrete values of its first inputs).
  """
  spec = jax.ShapeDtypeStruct(x_like.shape, x_like.dtype)
  params_spec = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(jax.numpy.shape(a), jax.numpy.result_type(a)), params
  )
  try:
    closed = jax.make_jaxpr(fn)(params_spec, spec)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"fn(params, x) fails on an input of the box's shape {tuple(x_like.shape)} "
      f"and dtype {x_like.dtype}: does the box match the model's input? ({e})"
    ) from e
  leaves = jax.tree.leaves(params)
  builder = _Builder(registry, x_like.shape[0])
  in_ids = [builder.new_id() for _ in closed.jaxpr.invars]
  if len(in_ids) != len(leaves) + 1:
    raise ValueError(
      f"expected fn(params, x) with one array x; the trace has {len(in_ids)} inputs "
      f"for {len(leaves)} params leaves"
    )
  builder.bounded.add(in_ids[-1])
  builder.axes[in_ids[-1]] = 0
  outs = builder.inline(closed.jaxpr, closed.consts, in_ids, "")
  if len(outs) != 1:
    raise ValueError(
      f"fn must return one array (the logits); it returns {len(outs)} outputs. Wrap "
      "it, e.g. lambda p, x: model.apply(p, x)"
    )
  if builder.axes.get(outs[0], 0) != 0:
    raise batching.BatchMixingError(
      f"fn's output holds the examples on axis {builder.axes[outs[0]]}; return them on the "
      "leading axis, [N, ...]"
    )
  graph = Graph(
    builder.nodes, in_ids, outs, builder.consts, builder.bounded, builder.axes, builder.shared_maps
  )
  return graph, leaves
