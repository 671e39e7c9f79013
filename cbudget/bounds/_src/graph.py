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

from cbudget.bounds._src.registry import Registry, UnsupportedPrimitiveError

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
    self._next = 0

  def check_batch_axis(self, var, eqn, where):
    shape = getattr(var.aval, "shape", ())
    if not shape or shape[0] != self.batch:
      raise ValueError(
        f"cbudget.bounds needs every value that depends on x to keep the batch as its leading "
        f"axis (examples are bounded independently), but {eqn.primitive}"
        f"{' inside ' + where if where else ''} makes one of shape {shape} from a batch of "
        f"{self.batch}; reduce or reshape within each example instead"
      )

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
          for var in eqn.outvars:
            self.check_batch_axis(var, eqn, where)
      for var, i in zip(eqn.outvars, outs):
        env[var] = i
    return [self.read(env, a) for a in jaxpr.outvars]


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
  outs = builder.inline(closed.jaxpr, closed.consts, in_ids, "")
  if len(outs) != 1:
    raise ValueError(
      f"fn must return one array (the logits); it returns {len(outs)} outputs. Wrap "
      "it, e.g. lambda p, x: model.apply(p, x)"
    )
  graph = Graph(builder.nodes, in_ids, outs, builder.consts, builder.bounded)
  return graph, leaves
