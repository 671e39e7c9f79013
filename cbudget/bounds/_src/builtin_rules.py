"""The built-in bound rules, registered in the default registry.

* Structural and additive primitives are affine with a known sign per argument, so their interval
  bounds are the primitive applied to the lower/upper ends (``sub`` flips its second argument).
* Bilinear primitives (``mul``, ``dot_general``, ``conv_general_dilated``, ``div`` by a constant) use
  centre/radius form: ``op(c, W) +- op(r, |W|)``, the exact range of an affine map over a box.
* ``max``/``min`` with a constant are one-kink piecewise-linear activations (ReLU is ``max(z, 0)``);
  with two bounded arguments they are monotone, with interval bounds only.
* ``abs``, ``logistic``, ``tanh``, ``exp``, ``log`` and the named ``leaky_relu`` and ``hard_tanh`` functions are
  activations with linear relaxations; max pooling and other max/min reductions are interval-only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as P

from cbudget.bounds._src import conv_transpose, reference, relaxations
from cbudget.bounds._src.box import Box
from cbudget.bounds._src.registry import (
  ActivationRule,
  Affine,
  LinearBounds,
  Registry,
  Relaxation,
  UnsupportedPrimitiveError,
  bounded_positions,
  defined_in,
  is_box,
)


def _require_concrete(args, allowed, name):
  for i, a in enumerate(args):
    if is_box(a) and i not in allowed:
      raise UnsupportedPrimitiveError(
        f"'{name}' argument {i} depends on the bounded input; cbudget.bounds can only bound "
        f"'{name}' when that argument is concrete (e.g. indices or a predicate computed from "
        "params). Register a rule for the enclosing function to handle it."
      )


@dataclasses.dataclass(frozen=True)
class SignedRule:
  """An operation monotone in each argument with a fixed direction (``signs[i]`` is +1 or -1).

  Interval bounds: evaluate at the lower end of increasing args and the upper end of decreasing
  ones (and vice versa), which is exact for such maps. ``affine`` says whether the map is also
  affine in its bounded args (then the CROWN backward pass goes through it with a VJP); otherwise
  (max pooling, sorting) the backward pass uses the interval bounds.
  """

  name: str
  signs: Callable[[int], int] = lambda i: 1
  allowed: Callable[[int], bool] = lambda i: True
  affine: bool = True

  @property
  def kind(self):
    return "affine" if self.affine else "interval"

  @property
  def exact_on_boxes(self):  # the ends of a box map to the ends of the exact range
    return self.affine

  def ibp(self, args, params, evaluate):
    _require_concrete(args, [i for i in range(len(args)) if self.allowed(i)], self.name)
    pick = lambda end: [
      a if not is_box(a) else (a.lower if (self.signs(i) > 0) == (end == "lower") else a.upper)
      for i, a in enumerate(args)
    ]
    lows, highs = evaluate(*pick("lower")), evaluate(*pick("upper"))
    return [Box(lo, hi) for lo, hi in zip(lows, highs)]

  def linearize(self, args, params, evaluate, options):
    return Affine(bounded_positions(args)) if self.affine else None


def _put(args, i, value):
  full = list(args)
  full[i] = value
  return full


def _centre_radius(box: Box):
  """Centre and radius of a box, with overflow kept out of them.

  Finite ends: ``l/2 + u/2`` and ``u/2 - l/2`` (neither overflows). An infinite end makes the
  radius infinite and the centre 0, so the map's range is ``+-inf`` wherever a non-zero weight
  reaches it (sound, if loose) and never ``inf - inf``; the caller turns the NaN of a zero weight
  times that infinite radius into ``inf``. A NaN end stays NaN in the centre, so its outputs are NaN.
  """
  infinite = jnp.isinf(box.lower) | jnp.isinf(box.upper)
  centre = jnp.where(infinite, 0, box.center).astype(box.dtype)
  radius = jnp.where(infinite, jnp.inf, box.radius).astype(box.dtype)
  return centre, radius


def _scaled_ends(box: Box, scale, weight):
  """``[min, max]`` of ``scale(z)``, linear in ``z``, over the box: its values at the two ends.

  ``scale`` multiplies by the concrete ``weight`` (or divides, ``weight=None``); a zero weight times
  an infinite end gives 0, not NaN (a zero weight times any real is 0).
  """
  at_lower, at_upper = scale(box.lower), scale(box.upper)
  if weight is not None:
    zero_weight = jnp.asarray(weight) == 0
    at_lower = jnp.where(zero_weight & jnp.isinf(box.lower), 0, at_lower)
    at_upper = jnp.where(zero_weight & jnp.isinf(box.upper), 0, at_upper)
  return jnp.minimum(at_lower, at_upper), jnp.maximum(at_lower, at_upper)


@dataclasses.dataclass(frozen=True)
class BilinearRule:
  """``op(a, b)`` linear in each argument: ``mul``, ``dot_general``, ``conv_general_dilated``, ``div``.

  One bounded argument: ``op(c, W) +- op(r, |W|)`` (exact range; affine, so CROWN passes through).
  Two bounded arguments (only where ``both_ok``): ``op(ca, cb) +- (op(|ca|, rb) + op(ra, |cb|) +
  op(ra, rb))``, sound for sums of products; CROWN then uses these interval bounds.
  """

  name: str
  bounded_ok: tuple[int, ...] = (0, 1)
  both_ok: bool = True
  kind: str = "affine"
  exact_on_boxes = True  # with one bounded argument (only then does the engine ask)

  def ibp(self, args, params, evaluate):
    bounded = bounded_positions(args)
    if any(i not in self.bounded_ok for i in bounded):
      raise UnsupportedPrimitiveError(
        f"'{self.name}' with a bounded argument {bounded} is not supported (only argument(s) "
        f"{self.bounded_ok} may depend on the bounded input)"
      )
    if len(bounded) == 1:
      i = bounded[0]
      if self.name in ("mul", "div"):  # element-wise: exact at the two ends, cheaper than c +- r
        scale = lambda z: evaluate(*_put(args, i, z))[0]
        return [Box(*_scaled_ends(args[i], scale, args[1 - i] if self.name == "mul" else None))]
      box = args[i]
      centre, radius = _centre_radius(box)
      centre_args = _put(args, i, centre)
      radius_args = _put([a if is_box(a) else jnp.abs(a) for a in args], i, radius)
      c, r = evaluate(*centre_args)[0], evaluate(*radius_args)[0]
      r = jnp.where(jnp.isnan(r) & ~jnp.isnan(c), jnp.inf, r)  # 0 * inf: an infinite radius
      return [Box(c - r, c + r)]
    if not self.both_ok:
      raise UnsupportedPrimitiveError(f"'{self.name}' of two bounded values is not supported")
    a, b = args
    if self.name == "mul":  # exact interval product
      corners = jnp.stack(
        [a.lower * b.lower, a.lower * b.upper, a.upper * b.lower, a.upper * b.upper]
      )
      return [Box(corners.min(0), corners.max(0))]
    ca, ra, cb, rb = a.center, a.radius, b.center, b.radius
    c = evaluate(ca, cb)[0]
    r = evaluate(jnp.abs(ca), rb)[0] + evaluate(ra, jnp.abs(cb))[0] + evaluate(ra, rb)[0]
    return [Box(c - r, c + r)]

  def linearize(self, args, params, evaluate, options):
    bounded = bounded_positions(args)
    if len(bounded) != 1:
      return None
    # With one bounded factor a product is linear in it. Only the weight products skip the offset
    # (a convolution or matrix product of zeros); for mul and div it is element-wise and cheap, and
    # stays NaN per element where the factor is not finite or the divisor is 0.
    linear = self.name in ("dot_general", "conv_general_dilated")
    if self.name == "conv_general_dilated" and bounded == (0,) and conv_transpose.supports(params):
      return Affine(bounded, conv_transpose.transpose_rows(evaluate, params, *args), linear=linear)
    return Affine(bounded, linear=linear)


@dataclasses.dataclass(frozen=True)
class ConvertRule:
  """``convert_element_type`` to a floating type: monotone (rounding to nearest is), so the ends
  map to the ends. CROWN passes through it only when the dtype does not change (weak-type casts):
  a narrowing cast rounds, and a dtype change would mix coefficient precisions, so there the
  interval bounds are used (sound; a model that casts its input loses some tightness)."""

  kind: str = "affine"
  exact_on_boxes = True  # where the dtype is kept (only then does the engine ask)

  def ibp(self, args, params, evaluate):
    if not jnp.issubdtype(params["new_dtype"], jnp.floating):
      raise UnsupportedPrimitiveError(
        f"convert_element_type of a bounded value to {params['new_dtype']} is not supported"
      )
    (box,) = args
    return [Box(evaluate(box.lower)[0], evaluate(box.upper)[0])]

  def linearize(self, args, params, evaluate, options):
    (box,) = args
    return Affine((0,)) if jnp.dtype(params["new_dtype"]) == box.dtype else None


@dataclasses.dataclass(frozen=True)
class KinkRule:
  """``max(z, c)`` / ``min(z, c)`` with ``c`` concrete: a one-kink piecewise-linear activation.

  ``max(z, c) = c + relu(z - c)`` and ``min(z, c) = c + min(z - c, 0)``. With both arguments bounded
  the result is monotone in each: interval bounds, used as they are by CROWN.
  """

  is_max: bool
  kind: str = "activation"

  def _split(self, args):
    bounded = bounded_positions(args)
    if len(bounded) != 1:
      return None
    i = bounded[0]
    return args[i], args[1 - i]

  def ibp(self, args, params, evaluate):
    op = jnp.maximum if self.is_max else jnp.minimum
    a, b = [x if is_box(x) else Box(x, x) for x in args]
    return [Box(op(a.lower, b.lower), op(a.upper, b.upper))]

  def linearize(self, args, params, evaluate, options):
    split = self._split(args)
    if split is None:
      return None
    box, c = split
    if jnp.broadcast_shapes(jnp.shape(c), box.shape) != box.shape:
      return None
    left, right = (0.0, 1.0) if self.is_max else (1.0, 0.0)
    choice = options.get("relu_lower_slope", "adaptive")
    if not isinstance(c, jax.core.Tracer) and not np.any(np.asarray(c)):
      # A concrete zero (ReLU): the kink at 0 is resolved while tracing (fewer operations).
      kink = relaxations.two_piece_relaxation(box.lower, box.upper, left, right, choice)
      return Relaxation(bounded_positions(args)[0], LinearBounds(*kink))
    c = jnp.asarray(c, box.lower.dtype)
    # An infinite constant (e.g. the -inf start of jnp.max) makes the op the identity
    # (max(z, -inf), min(z, +inf)) or the constant (max(z, +inf), min(z, -inf)); relax the finite
    # part only, with the kink at c (no z - c, which could overflow or cancel).
    finite = jnp.isfinite(c)
    c_safe = jnp.where(finite, c, 0)
    kink = relaxations.two_piece_relaxation(box.lower, box.upper, left, right, choice, c_safe)
    identity = (c < 0) if self.is_max else (c > 0)
    slope = jnp.where(identity, 1, 0).astype(box.dtype)
    offset = jnp.where(identity, 0, c).astype(box.dtype)  # max(z, inf) is inf
    infinite = LinearBounds(slope, offset, slope, offset)
    bounds = [jnp.broadcast_to(jnp.where(finite, k, i), box.shape) for k, i in zip(kink, infinite)]
    return Relaxation(bounded_positions(args)[0], LinearBounds(*bounds))

  # α-CROWN (see ActivationRule): the slope of the supporting line at the kink, as a fraction of
  # the way from the left piece's slope to the right one's.
  alpha_range = (0.0, 1.0)

  def alpha_init(self, args, params, evaluate, options):
    lin = self.linearize(args, params, evaluate, options)
    if lin is None:
      return None
    return relaxations.kink_alpha_init(lin.bounds, *self._pieces())

  def relax_with(self, args, params, evaluate, options, alpha):
    lin = self.linearize(args, params, evaluate, options)
    box, c = self._split(args)
    c = jnp.asarray(c, box.lower.dtype)
    c_safe = jnp.where(jnp.isfinite(c), c, 0)
    bounds = relaxations.with_kink_support(
      lin.bounds, box.lower, box.upper, *self._pieces(), alpha[0], c_safe, c_safe, jnp.isfinite(c)
    )
    return Relaxation(lin.index, bounds)

  def _pieces(self):
    return (0.0, 1.0) if self.is_max else (1.0, 0.0)


def _monotone_ibp(l, u, op):
  return op(l), op(u)


def _two_piece_ibp(left_right):
  def ibp(l, u, op):
    left, right = left_right(l, op)
    return relaxations.two_piece_interval(l, u, left, right)

  return ibp


def _two_piece_relax(left_right):
  def relax(l, u, op, options):
    left, right = left_right(l, op)
    if jnp.broadcast_shapes(jnp.shape(left), jnp.shape(l)) != jnp.shape(l):
      raise UnsupportedPrimitiveError(
        f"an element-wise activation whose output shape {jnp.shape(left)} differs from its "
        f"input's {jnp.shape(l)} (e.g. leaky_relu with a negative_slope array that broadcasts x "
        "to a larger shape) has no element-wise relaxation; broadcast x first, e.g. "
        "jax.nn.leaky_relu(jnp.broadcast_to(x, shape), slope)"
      )
    return relaxations.two_piece_relaxation(
      l, u, left, right, options.get("relu_lower_slope", "adaptive")
    )

  return relax


def _two_piece_alpha(left_right):
  """``(relax_with, alpha_init)`` of a two-piece activation's supporting line (α-CROWN)."""

  def relax_with(l, u, op, alpha):
    left, right = left_right(l, op)
    base = relaxations.two_piece_relaxation(l, u, left, right)
    return relaxations.with_kink_support(base, l, u, left, right, alpha[0])

  def alpha_init(l, u, op, options):
    left, right = left_right(l, op)
    return relaxations.kink_alpha_init(_two_piece_relax(left_right)(l, u, op, options), left, right)

  return relax_with, alpha_init


def _s_shaped_alpha(relax_with):
  return relax_with, lambda l, u, op: relaxations.s_shaped_alpha_init(l, u)


def _leaky_slopes(l, op):
  # The named function is jax.nn.leaky_relu: its negative-side slope is -f(-1), read off the trace so
  # that any negative_slope (a literal or an argument) is honoured.
  return -op(-jnp.ones_like(l)), jnp.ones_like(l)


def _abs_slopes(l, op):
  return -1.0, 1.0


def _activation(ibp, relax, takes_options=False, alpha=(None, None)):
  return ActivationRule(ibp, relax, takes_options, *alpha)


@dataclasses.dataclass(frozen=True)
class JaxNNRule(ActivationRule):
  """A rule for a named ``jax.nn`` function: it applies only to the function defined in JAX
  itself, with only its first argument bounded. A user's function of the same name is traced
  through instead (its semantics may differ)."""

  def accepts(self, eqn, bounded):
    return defined_in(eqn, "jax/_src/nn/") and tuple(bounded) == (0,)


def _hard_tanh_ibp(l, u, op):
  return jnp.clip(l, -1, 1), jnp.clip(u, -1, 1)


def _stack_primitive():
  """``stack`` (``jnp.stack`` since JAX 0.10; earlier JAX traced it as reshapes and a
  ``concatenate``), taken from a trace like ``split``: ``None`` where there is none."""
  trace = jax.make_jaxpr(lambda x: jnp.stack([x, x], axis=1))(jnp.zeros(2))
  (eqn,) = trace.jaxpr.eqns[-1:]
  return eqn.primitive if eqn.primitive.name == "stack" else None


def _split_primitive():
  """``split`` (``jnp.split``) is not in ``jax.extend``: take it from a trace."""
  trace = jax.make_jaxpr(lambda x: jax.lax.split(x, (1, 1)))(jnp.zeros(2))
  return trace.jaxpr.eqns[0].primitive


def register_builtins(registry: Registry) -> Registry:
  for prim in (
    P.reshape_p,
    P.broadcast_in_dim_p,
    P.transpose_p,
    P.squeeze_p,
    P.slice_p,
    P.concatenate_p,
    P.pad_p,
    P.reduce_sum_p,
    P.reduce_window_sum_p,
    P.copy_p,
    P.rev_p,
    P.add_p,
    P.add_jaxvals_p,
    P.cumsum_p,
    P.sharding_constraint_p,
    _split_primitive(),
    *filter(None, [_stack_primitive()]),
  ):
    registry.register(prim, SignedRule(prim.name))
  # Rounding is monotone but not affine: interval bounds only.
  registry.register(P.reduce_precision_p, SignedRule("reduce_precision", affine=False))
  registry.register(P.sub_p, SignedRule("sub", signs=lambda i: 1 if i == 0 else -1))
  registry.register(P.neg_p, SignedRule("neg", signs=lambda i: -1))
  # The predicate of select_n and the indices of slicing/gathering must be concrete.
  registry.register(P.select_n_p, SignedRule("select_n", allowed=lambda i: i > 0))
  registry.register(P.dynamic_slice_p, SignedRule("dynamic_slice", allowed=lambda i: i == 0))
  registry.register(P.gather_p, SignedRule("gather", allowed=lambda i: i == 0))
  registry.register(P.convert_element_type_p, ConvertRule())
  for prim in (
    P.reduce_max_p,
    P.reduce_min_p,
    P.reduce_window_max_p,
    P.reduce_window_min_p,
    P.cummax_p,
    P.cummin_p,
  ):
    registry.register(prim, SignedRule(prim.name, affine=False))
  registry.register(P.mul_p, BilinearRule("mul"))
  registry.register(P.dot_general_p, BilinearRule("dot_general"))
  registry.register(P.conv_general_dilated_p, BilinearRule("conv_general_dilated"))
  registry.register(P.div_p, BilinearRule("div", bounded_ok=(0,), both_ok=False))
  registry.register(P.max_p, KinkRule(is_max=True))
  registry.register(P.min_p, KinkRule(is_max=False))
  registry.register(
    P.abs_p,
    _activation(
      _two_piece_ibp(_abs_slopes),
      _two_piece_relax(_abs_slopes),
      True,
      _two_piece_alpha(_abs_slopes),
    ),
  )
  registry.register(
    "leaky_relu",
    JaxNNRule(
      _two_piece_ibp(_leaky_slopes),
      _two_piece_relax(_leaky_slopes),
      True,
      *_two_piece_alpha(_leaky_slopes),
    ),
  )
  registry.register(
    "hard_tanh", JaxNNRule(_hard_tanh_ibp, lambda l, u, op: relaxations.hard_tanh_relaxation(l, u))
  )
  registry.register(
    P.logistic_p,
    _activation(
      _monotone_ibp,
      lambda l, u, op: relaxations.sigmoid_relaxation(l, u),
      alpha=_s_shaped_alpha(lambda l, u, op, a: relaxations.sigmoid_relaxation_with(l, u, a)),
    ),
  )
  registry.register(
    P.tanh_p,
    _activation(
      _monotone_ibp,
      lambda l, u, op: relaxations.tanh_relaxation(l, u),
      alpha=_s_shaped_alpha(lambda l, u, op, a: relaxations.tanh_relaxation_with(l, u, a)),
    ),
  )
  registry.register(
    P.exp_p, _activation(_monotone_ibp, lambda l, u, op: relaxations.exp_relaxation(l, u))
  )
  registry.register(
    P.log_p, _activation(_monotone_ibp, lambda l, u, op: relaxations.log_relaxation(l, u))
  )
  registry.register(reference.REFERENCE_BOUNDS_NAME, reference.ReferenceBoundsRule())
  return registry
