"""Boxes: element-wise intervals ``[lower, upper]``, the sets bounds are computed over."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Box(NamedTuple):
  """An element-wise interval ``lower <= x <= upper`` (a pytree, so it passes through jit/vmap/grad).

  The width may differ per element: a non-uniform box. The uniform l-inf ball of radius eps around x
  is the special case ``Box.from_budget(x, eps)`` with a scalar ``eps``.
  """

  lower: jax.Array
  upper: jax.Array

  @property
  def shape(self):
    return jnp.shape(self.lower)

  @property
  def dtype(self):
    return jnp.result_type(self.lower)

  @property
  def center(self) -> jax.Array:
    return self.lower / 2 + self.upper / 2  # (l + u) / 2 could overflow

  @property
  def radius(self) -> jax.Array:
    return self.upper / 2 - self.lower / 2  # (u - l) / 2 could overflow

  @classmethod
  def from_budget(cls, x, eps, domain=(0.0, 1.0)) -> Box:
    """The box ``[x - eps, x + eps]``, intersected with the data ``domain`` (``None`` for none).

    ``eps`` is a scalar or any array broadcastable to ``x`` (e.g. one budget per pixel, shared
    across channels). Raises ``ValueError`` if ``eps`` does not broadcast to ``x`` or, when it is
    concrete, if any entry is negative.
    """
    x = jnp.asarray(x)
    eps = jnp.asarray(eps, dtype=x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
    try:
      fits = jnp.broadcast_shapes(jnp.shape(eps), x.shape) == x.shape
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(
        f"eps of shape {jnp.shape(eps)} does not broadcast to x of shape {x.shape}; pass a "
        "scalar, an array of x's shape, or one that broadcasts to it without adding dimensions "
        "(e.g. [N, H, W, 1] for per-pixel budgets shared across channels)"
      )
    if not isinstance(eps, jax.core.Tracer) and bool(np.any(np.asarray(eps) < 0)):
      raise ValueError(f"eps must be non-negative, got min(eps) = {float(np.min(np.asarray(eps)))}")
    lower, upper = x - eps, x + eps
    if domain is not None:
      lo, hi = domain
      lower = jnp.clip(lower, lo, hi)
      upper = jnp.clip(upper, lo, hi)
    return cls(lower, upper)


def as_box(value) -> Box:
  """A ``Box`` from a ``Box`` or a ``(lower, upper)`` pair, checking the two shapes agree."""
  lower, upper = value
  if jnp.shape(lower) != jnp.shape(upper):
    raise ValueError(f"box lower {jnp.shape(lower)} and upper {jnp.shape(upper)} shapes differ")
  return Box(lower, upper)
