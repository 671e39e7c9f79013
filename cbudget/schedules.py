"""Training schedules as pure ``step -> value`` functions (jit-friendly)."""

from __future__ import annotations

import jax.numpy as jnp

SHAPES = ("linear", "smooth")


def ramp(start: int, length: int, shape: str = "linear"):
  """0 before ``start``, rising to 1 over ``length`` steps, then 1.

  ``"smooth"`` is the smoothstep ``3t^2 - 2t^3``: it starts and ends with zero slope, so ε grows
  slowly while the network first meets perturbations (the role of Shi et al.'s exponential warm-up).
  """
  if shape not in SHAPES:
    raise ValueError(f"schedule shape must be one of {SHAPES}, got {shape!r}")

  def schedule(step):
    t = jnp.clip((jnp.asarray(step, jnp.float32) - start) / max(length, 1), 0.0, 1.0)
    return t if shape == "linear" else t * t * (3 - 2 * t)

  return schedule


def interpolate(schedule, begin: float, end: float):
  """``begin + (end - begin) * schedule(step)``."""
  return lambda step: begin + (end - begin) * schedule(step)
