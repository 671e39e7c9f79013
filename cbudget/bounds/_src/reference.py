"""Reference bounds: interval bounds of an intermediate value that the caller already knows.

``reference_bounds(value, lower, upper)`` is the identity on ``value``. When a bound method meets
it, the value's interval bounds become their intersection with ``[lower, upper]``, and the CROWN
backward pass goes through it exactly (it is the identity). auto_LiRPA calls such bounds
``reference_bounds``; a typical source is a tighter bound of the same quantity computed another way,
e.g. IBP of the logit margins with the margin spec folded into the last layer, which is tighter than
the difference of the logits' intervals (loss fusion, ``cbudget.objective``).

Soundness is the caller's promise: ``lower <= value <= upper`` must hold at every point of the box
being bounded. The engine cannot check it; bounds that exclude a reachable value make every bound
downstream unsound.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cbudget.bounds._src.box import Box
from cbudget.bounds._src.registry import Affine, defined_in


@jax.jit
def reference_bounds(value, lower, upper):
  """``value``, unchanged; bound methods intersect its interval with ``[lower, upper]``.

  ``lower`` and ``upper`` broadcast to ``value``'s shape and must not depend on the bounded input
  (compute them outside the bounded function and pass them in with the parameters). The caller
  guarantees ``lower <= value <= upper`` over the whole box (see the module docstring).
  """
  del lower, upper
  return value


@dataclasses.dataclass(frozen=True)
class ReferenceBoundsRule:
  """The rule for :func:`reference_bounds`: IBP intersects, CROWN passes through (identity)."""

  kind = "affine"

  def accepts(self, eqn, bounded):
    # Only cbudget's own function (a user's function of the same name is traced through), and only
    # with the reference bounds concrete.
    return defined_in(eqn, "cbudget/bounds/_src/reference.py") and tuple(bounded) == (0,)

  def ibp(self, args, params, evaluate):
    box, lower, upper = args
    lower = jnp.broadcast_to(lower, box.shape).astype(box.dtype)
    upper = jnp.broadcast_to(upper, box.shape).astype(box.dtype)
    return Box(jnp.maximum(box.lower, lower), jnp.minimum(box.upper, upper))

  def linearize(self, args, params, evaluate, options):
    return Affine((0,), transpose=lambda cotangents: list(cotangents))


REFERENCE_BOUNDS_NAME = reference_bounds.__name__
