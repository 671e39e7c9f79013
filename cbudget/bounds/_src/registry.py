"""Bound rules: what each primitive means to IBP and to the CROWN backward pass, and the registry.

Every node of a traced function is bounded by a *rule*. A rule gives

* ``ibp(args, params, evaluate)``: interval bounds of the node's outputs, where each arg is a
  concrete array or a :class:`Box` (the bounded ones) and ``evaluate(*arrays)`` runs the node on
  concrete arrays (a list of outputs);
* ``linearize(args, params, evaluate, options)``: what the CROWN backward pass does at this node, one of

  - :class:`Affine`: the node is affine in its bounded inputs (given the concrete ones): the backward
    pass pushes linear coefficients through it with a vector-Jacobian product, exactly;
  - :class:`Relaxation`: the node is an element-wise function of one bounded input ``z`` and
    ``lower_slope * z + lower_offset <= y <= upper_slope * z + upper_offset`` on the input's bounds;
  - ``None``: no linear relation is used; the backward pass takes the node's interval bounds as they
    are (sound, loses the dependence on earlier nodes).

The three public constructors :func:`affine_rule`, :func:`activation_rule` and :func:`interval_rule`
cover the cases users meet; any object of the :class:`BoundRule` protocol works too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol
from collections.abc import Callable

import jax

from cbudget.bounds._src.box import Box


class UnsupportedPrimitiveError(Exception):
  """A traced function uses an operation on a bounded value that no registered rule covers."""


class LinearBounds(NamedTuple):
  """Element-wise linear bounds ``lower_slope*z + lower_offset <= f(z) <= upper_slope*z + upper_offset``.

  Every field broadcasts to the shape of ``z``. A relaxation must hold for every ``z`` in the box it
  was computed for; that is all soundness asks.
  """

  lower_slope: jax.Array
  lower_offset: jax.Array
  upper_slope: jax.Array
  upper_offset: jax.Array


class BoundRule(Protocol):
  """What the engine asks of a rule (the built-in rules and the ``*_rule`` constructors are such).

  ``ibp(args, params, evaluate)`` returns the interval bounds of the node's outputs (a :class:`Box`
  or a list of them); each arg is a concrete array or a :class:`Box`, and ``evaluate(*arrays)`` runs
  the node on concrete arrays. ``linearize(args, params, evaluate, options)`` returns an
  :class:`Affine`, a :class:`Relaxation` or ``None`` (see the module docstring).

  Optional attributes, read with defaults: ``kind == "affine"`` says ``linearize`` is always
  :class:`Affine`, so full CROWN need not tighten the node's inputs (default: it does);
  ``batch_rule(in_axes, in_shapes, params) -> out_axes`` says where a *primitive's* outputs hold the
  examples (see ``cbudget.bounds.elementwise_batch_rule``; built-in primitives and named functions
  need none); ``accepts(eqn, bounded_positions) -> bool`` lets a rule for a named function decline
  a call (it is then traced through); ``exact_on_boxes`` (default False) says that, with one
  bounded argument ranging over a box, ``ibp`` returns each output's exact range, so full CROWN
  need not tighten what such a map makes of the input (a first layer's pre-activations).
  """

  def ibp(self, args: list, params: dict, evaluate: Callable) -> Any: ...

  def linearize(self, args: list, params: dict, evaluate: Callable, options: dict) -> Any: ...


class Affine(NamedTuple):
  """The node is affine in its bounded inputs; ``bounded`` are their positions among the args.

  The backward pass moves coefficients through the node with JAX's VJP (vmapped over rows) unless
  ``transpose`` is given: a function from the outputs' row-stacked coefficients (a list, each
  ``[R, N, ...]``) to the bounded inputs' (a list in the order of ``bounded``). A rule gives one
  where it knows a cheaper transpose, or one whose gradient is cheaper (convolutions do).

  ``linear``: the node is 0 wherever its bounded inputs are 0 and its concrete inputs are finite
  (a convolution or a matrix product with the weights), so the backward pass adds no offset. Else
  the offset is the node evaluated at zero, which for a convolution costs a forward convolution
  and, under ``jax.grad``, a weight gradient of zeros. A non-finite concrete input of a linear
  node makes the bounds NaN, as its offset (``0 * inf``) did.
  """

  bounded: tuple[int, ...]
  transpose: Callable[[list], list] | None = None
  linear: bool = False


class Relaxation(NamedTuple):
  """The node is element-wise in its bounded input number ``index``, relaxed by ``bounds``."""

  index: int
  bounds: LinearBounds


def defined_in(eqn, path_fragment: str) -> bool:
  """Whether the named call ``eqn`` (jit, custom_jvp, ...) is of a function whose source file path
  contains ``path_fragment``: lets a rule for a name decline a user's function of the same name."""
  body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  debug = getattr(getattr(body, "jaxpr", body), "debug_info", None)
  source = getattr(debug, "func_src_info", "") or ""
  return path_fragment in source.replace("\\", "/")


def is_box(value) -> bool:
  return isinstance(value, Box)


def bounded_positions(args) -> tuple[int, ...]:
  return tuple(i for i, a in enumerate(args) if is_box(a))


@dataclasses.dataclass(frozen=True)
class AffineRule:
  """A primitive that is affine in its bounded args, given the concrete ones.

  ``ibp(*args, **params)`` returns a :class:`Box` (or a list of them for multi-output primitives).
  ``affine_if(bounded_positions, params)`` says whether a given pattern of bounded args is affine
  (``mul`` is affine only when one factor is concrete); when it is not, the backward pass uses the
  node's interval bounds.
  """

  ibp_fn: Callable[..., Any]
  affine_if: Callable[[tuple[int, ...], dict], bool] = lambda bounded, params: True
  batch_rule: Callable | None = None
  kind = "affine"

  def ibp(self, args, params, evaluate):
    return self.ibp_fn(*args, **params)

  def linearize(self, args, params, evaluate, options):
    bounded = bounded_positions(args)
    return Affine(bounded) if self.affine_if(bounded, params) else None


@dataclasses.dataclass(frozen=True)
class ActivationRule:
  """An element-wise function of exactly one bounded arg (the other args are concrete).

  ``ibp(lower, upper, op) -> (lo, hi)`` and ``relax(lower, upper, op) -> LinearBounds``, where ``op``
  evaluates the function on a concrete array (with the node's concrete args and params bound), so a
  rule can read a slope or threshold by evaluating it: e.g. leaky ReLU's slope is ``-op(-1)``.
  Built-in rules may also accept the backward pass ``options`` (``relax(l, u, op, options)``) when
  ``takes_options`` is set.

  An *optimisable* relaxation (α-CROWN) adds ``relax_with(l, u, op, alpha) -> LinearBounds``, sound
  for every ``alpha`` in ``alpha_range`` element-wise, where ``alpha`` has shape ``[P, R, *l.shape]``
  (``P`` parameters per element, one set per bound row ``R``), and ``alpha_init(l, u, op) -> [P,
  *l.shape]`` (with ``options`` too when ``takes_options``), the parameters at which
  ``relax_with`` gives ``relax``'s bounds, so that α-CROWN starts from CROWN.
  """

  ibp_fn: Callable[..., Any]
  relax_fn: Callable[..., LinearBounds] | None = None
  takes_options: bool = False
  relax_with_fn: Callable[..., LinearBounds] | None = None
  alpha_init_fn: Callable[..., Any] | None = None
  alpha_range: tuple[float, float] = (0.0, 1.0)
  kind = "activation"

  def _single(self, args, params, evaluate):
    bounded = bounded_positions(args)
    if len(bounded) != 1:
      raise UnsupportedPrimitiveError(
        f"an activation rule needs exactly one bounded input, got {len(bounded)}"
      )
    index = bounded[0]

    def op(z):
      full = list(args)
      full[index] = z
      return evaluate(*full)[0]

    return index, args[index], op

  def ibp(self, args, params, evaluate):
    _, box, op = self._single(args, params, evaluate)
    lo, hi = self.ibp_fn(box.lower, box.upper, op)
    return Box(lo, hi)

  def linearize(self, args, params, evaluate, options):
    if self.relax_fn is None:
      return None
    index, box, op = self._single(args, params, evaluate)
    extra = (options,) if self.takes_options else ()
    return Relaxation(index, LinearBounds(*self.relax_fn(box.lower, box.upper, op, *extra)))

  # The optional α-CROWN protocol (any rule may implement it): ``alpha_init`` returns the starting
  # parameters ``[P, N, ...]``, or None where there is nothing to optimise; ``relax_with`` the
  # relaxation at ``alpha [P, R, N, ...]``; ``alpha_range`` the box they are projected onto.
  def alpha_init(self, args, params, evaluate, options):
    if self.relax_fn is None or self.relax_with_fn is None or self.alpha_init_fn is None:
      return None
    _, box, op = self._single(args, params, evaluate)
    extra = (options,) if self.takes_options else ()
    return self.alpha_init_fn(box.lower, box.upper, op, *extra)

  def relax_with(self, args, params, evaluate, options, alpha):
    index, box, op = self._single(args, params, evaluate)
    return Relaxation(index, LinearBounds(*self.relax_with_fn(box.lower, box.upper, op, alpha)))


@dataclasses.dataclass(frozen=True)
class IntervalRule:
  """IBP only: the backward pass uses the node's interval bounds (sound, not tight)."""

  ibp_fn: Callable[..., Any]
  batch_rule: Callable | None = None
  kind = "interval"

  def ibp(self, args, params, evaluate):
    return self.ibp_fn(*args, **params)

  def linearize(self, args, params, evaluate, options):
    return None


def affine_rule(ibp, affine_if=None, batch_rule=None) -> AffineRule:
  """A rule for an operation affine in its bounded inputs (see :class:`AffineRule`)."""
  if affine_if is None:
    return AffineRule(ibp, batch_rule=batch_rule)
  return AffineRule(ibp, affine_if, batch_rule)


def activation_rule(
  ibp, relax=None, *, relax_with=None, alpha_init=None, alpha_range=(0.0, 1.0)
) -> ActivationRule:
  """A rule for an element-wise nonlinearity (see :class:`ActivationRule`).

  Without ``relax`` the CROWN backward pass falls back to the interval bounds at this node.
  ``relax_with``/``alpha_init``/``alpha_range`` make the relaxation optimisable by α-CROWN.
  """
  if (relax_with is None) != (alpha_init is None):
    raise ValueError("an optimisable relaxation needs both relax_with and alpha_init")
  if relax_with is not None and relax is None:
    raise ValueError("relax_with needs relax (the relaxation CROWN uses, at alpha_init)")
  return ActivationRule(
    ibp, relax, relax_with_fn=relax_with, alpha_init_fn=alpha_init, alpha_range=alpha_range
  )


def interval_rule(ibp, batch_rule=None) -> IntervalRule:
  """A rule that only gives interval bounds (see :class:`IntervalRule`)."""
  return IntervalRule(ibp, batch_rule)


def rule_key(key):
  """Registry key of a primitive, a name, or a function (its ``__name__``).

  Primitives are matched by identity. Names match named sub-computations in the trace: ``jit``
  calls by their ``name`` (``jax.nn.leaky_relu`` traces to ``jit[name=leaky_relu]``) and
  ``jax.custom_jvp`` / ``jax.custom_vjp`` functions by the name of the decorated function.
  """
  if isinstance(key, str):
    return key
  if isinstance(key, jax.extend.core.Primitive):
    return key
  name = getattr(key, "__name__", None)
  if name is None:
    raise TypeError(f"a rule key must be a jax Primitive, a name or a named function, got {key!r}")
  return name


class Registry:
  """A table of bound rules keyed by primitive or by function name.

  ``cbudget.bounds.DEFAULT_REGISTRY`` holds the built-in rules and is what ``ibp``/``crown`` use
  unless given ``registry=``. Use :meth:`copy` for a private table that leaves the default alone.
  """

  def __init__(self, rules: dict | None = None):
    self._rules = dict(rules or {})

  def register(self, key, rule, *, override: bool = False):
    k = rule_key(key)
    if k in self._rules and not override:
      raise ValueError(
        f"a bound rule for {_key_name(k)} is already registered; pass override=True to replace it"
      )
    self._rules[k] = rule
    return rule

  def get(self, key):
    return self._rules.get(rule_key(key))

  def __contains__(self, key):
    return rule_key(key) in self._rules

  def copy(self) -> Registry:
    return Registry(self._rules)


def _key_name(key) -> str:
  return key if isinstance(key, str) else f"primitive '{key}'"
