"""cbudget.bounds: sound output bounds of JAX functions over (non-uniform) boxes.

Entry points, each ``method(fn) -> bound(params, box, ...)``, jit/grad/vmap compatible:

* :func:`ibp` — interval bound propagation.
* :func:`crown` — linear relaxations propagated backward (CROWN-IBP with ``intermediate="ibp"``,
  full CROWN with ``intermediate="crown"``).
* :func:`crown_ibp` — IBP and CROWN-IBP bounds from one shared forward pass (CROWN-IBP training).
* :func:`crown_ibp_head` — the same for a nonlinear function of ``spec @ fn`` (loss fusion).
* :func:`alpha_crown` — full CROWN with relaxations optimised per bound (α-CROWN).

:func:`in_example_blocks` runs any of them on blocks of examples (the same bounds; faster on a CPU).

:func:`reference_bounds` marks an intermediate value with interval bounds the caller already knows
(e.g. from a tighter method); every method intersects with them.

Extend the rules at run time with :func:`register_affine`, :func:`register_activation` and
:func:`register_interval` (or on a private :class:`Registry`).
"""

from cbudget.bounds._src.alpha_crown import alpha_crown
from cbudget.bounds._src.api import (
  DEFAULT_REGISTRY,
  CrownIbpBounds,
  HeadBounds,
  crown,
  crown_ibp,
  crown_ibp_head,
  ibp,
  in_example_blocks,
)
from cbudget.bounds._src.box import Box
from cbudget.bounds._src.reference import reference_bounds
from cbudget.bounds._src.batching import BatchMixingError
from cbudget.bounds._src.batching import elementwise as elementwise_batch_rule
from cbudget.bounds._src.registry import (
  Affine,
  BoundRule,
  LinearBounds,
  Relaxation,
  bounded_positions,
  is_box,
  Registry,
  UnsupportedPrimitiveError,
  activation_rule,
  affine_rule,
  interval_rule,
)
from cbudget.bounds._src.relaxations import SLOPE_CHOICES


def register_affine(key, ibp, *, affine_if=None, batch_rule=None, registry=None, override=False):
  """Register an operation that is affine in its bounded arguments.

  ``key``: a ``jax.extend.core.Primitive``, or the name of a function (a ``jit`` or
  ``custom_jvp``/``custom_vjp`` function; the function object itself works too). ``ibp(*args,
  **params) -> Box`` gets concrete arrays and :class:`Box` es. CROWN passes through the operation
  exactly with its vector-Jacobian product. For a primitive that cbudget does not know,
  ``batch_rule(in_axes, in_shapes, params) -> out_axes`` says where its outputs hold the examples
  (``elementwise_batch_rule`` for element-wise operations); named functions need none (their body
  is read).
  """
  return (registry or DEFAULT_REGISTRY).register(
    key, affine_rule(ibp, affine_if, batch_rule), override=override
  )


def register_activation(
  key,
  ibp,
  relax=None,
  *,
  relax_with=None,
  alpha_init=None,
  alpha_range=(0.0, 1.0),
  registry=None,
  override=False,
):
  """Register an element-wise nonlinearity of one bounded argument.

  ``ibp(lower, upper, op) -> (lo, hi)`` and ``relax(lower, upper, op) -> LinearBounds`` must hold
  for every point of ``[lower, upper]``; ``op`` evaluates the operation on a concrete array. Without
  ``relax``, CROWN uses the interval bounds at this node.

  For :func:`alpha_crown`, a relaxation with parameters: ``relax_with(lower, upper, op, alpha) ->
  LinearBounds`` must hold for every ``alpha`` in ``alpha_range`` (element-wise; ``alpha`` has shape
  ``[P, R, *lower.shape]``, one set per bound row), and ``alpha_init(lower, upper, op) -> [P,
  *lower.shape]`` gives the parameters at which it equals ``relax`` (where α-CROWN starts).
  """
  rule = activation_rule(
    ibp, relax, relax_with=relax_with, alpha_init=alpha_init, alpha_range=alpha_range
  )
  return (registry or DEFAULT_REGISTRY).register(key, rule, override=override)


def register_interval(key, ibp, *, batch_rule=None, registry=None, override=False):
  """Register an operation with interval bounds only: ``ibp(*args, **params) -> Box``
  (``batch_rule`` as for :func:`register_affine`)."""
  return (registry or DEFAULT_REGISTRY).register(
    key, interval_rule(ibp, batch_rule), override=override
  )


__all__ = [
  "Affine",
  "BatchMixingError",
  "BoundRule",
  "Box",
  "alpha_crown",
  "CrownIbpBounds",
  "DEFAULT_REGISTRY",
  "HeadBounds",
  "LinearBounds",
  "Registry",
  "Relaxation",
  "SLOPE_CHOICES",
  "UnsupportedPrimitiveError",
  "bounded_positions",
  "crown",
  "crown_ibp",
  "crown_ibp_head",
  "elementwise_batch_rule",
  "ibp",
  "in_example_blocks",
  "is_box",
  "register_activation",
  "register_affine",
  "reference_bounds",
  "register_interval",
]
