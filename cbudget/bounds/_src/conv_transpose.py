"""The transpose of a convolution for the CROWN backward pass, with a cheap gradient w.r.t. the kernel.

CROWN pushes coefficients ``g`` (one per output of a convolution, for every row and example) back to
its input with the transposed convolution ``T(g, w)``. Certified training then differentiates the
bound w.r.t. the kernel ``w``, i.e. it needs ``d<ct, T(g, w)>/dw``. JAX derives that from the
transposed convolution, which XLA's CPU backend runs as a slow generic convolution (4-6x the cost of
the whole rest of a CROWN-IBP step on small CNNs; see bench/README.md). It is one matrix product:

  <ct, T(g, w)> = <conv(ct, w), g>   so   d/dw = patches(ct)^T @ g,   d/dg = conv(ct, w),

where ``patches(ct)`` gathers, for every output position, the input window the kernel sees (im2col).
This module defines ``T`` with that gradient as a ``jax.custom_vjp``. The value is the
convolution JAX derives for the transpose, written so that XLA runs it fast everywhere (see
:func:`_transposed_conv`); values and gradients equal JAX's up to rounding (tested).
Reverse-mode only: forward-mode differentiation of a CROWN bound through a convolution is not
supported (``jax.jacfwd``); ``jax.grad`` and ``jax.vjp`` are.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax


def supports(params) -> bool:
  """Whether :func:`transpose_rows` handles a ``conv_general_dilated`` with these params: no input
  dilation, no feature or batch groups, batch as the leading axis, no mixed-precision output (what
  Flax's ``nn.Conv`` emits for ungrouped layers). Other convolutions use JAX's own VJP."""
  dn = params["dimension_numbers"]
  return (
    all(d == 1 for d in params["lhs_dilation"])
    and params["feature_group_count"] == 1
    and params["batch_group_count"] == 1
    and dn.lhs_spec[0] == 0
    and dn.out_spec[0] == 0
    and params.get("preferred_element_type") is None
  )


def _to_channels_last(x, spec):
  """``x`` in the layout ``spec`` (batch/out-feature dim, feature dim, spatial dims) ->
  ``[batch, spatial..., feature]``."""
  return jnp.transpose(x, (spec[0],) + tuple(spec[2:]) + (spec[1],))


def _kernel_gradient(ct, g, kernel_shape, params):
  """``d<ct, T(g, w)>/dw`` as one matrix product of ``ct``'s patches with ``g`` (see module doc)."""
  dn = params["dimension_numbers"]
  ct = _to_channels_last(ct, dn.lhs_spec)  # [B, S..., Ci]
  g = _to_channels_last(g, dn.out_spec)  # [B, O..., Co]
  spatial_out = g.shape[1:-1]
  window = tuple(kernel_shape[d] for d in dn.rhs_spec[2:])
  strides, dilation = params["window_strides"], params["rhs_dilation"]
  zero = jnp.zeros((), ct.dtype)
  ct = lax.pad(
    ct, zero, ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in params["padding"]) + ((0, 0, 0),)
  )
  patches = []
  for offset in itertools.product(*(range(k) for k in window)):
    start = tuple(o * d for o, d in zip(offset, dilation))
    limit = tuple(s + st * (n - 1) + 1 for s, st, n in zip(start, strides, spatial_out))
    patches.append(
      lax.slice(
        ct,
        (0,) + start + (0,),
        (ct.shape[0],) + limit + (ct.shape[-1],),
        (1,) + tuple(strides) + (1,),
      )
    )
  patches = jnp.concatenate(patches, axis=-1)  # [B, O..., K*Ci], (k..., ci) order
  grad = jnp.dot(
    patches.reshape(-1, patches.shape[-1]).T,
    g.reshape(-1, g.shape[-1]),
    precision=params["precision"],
  )
  grad = grad.reshape(window + (ct.shape[-1], g.shape[-1]))  # [K..., Ci, Co]
  # Back to the kernel's own layout: canonical axis j holds kernel dim rhs_spec[2:] + (in, out).
  canonical = tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0])
  return jnp.transpose(grad, tuple(canonical.index(d) for d in range(len(canonical))))


def _transposed_conv(g, w, params, lhs_spatial):
  """``T(g, w)``, the transpose of ``x -> conv(x, w)``, as one forward convolution of ``g`` (input
  dilated by the strides) with the kernel flipped and its feature dims swapped in memory.

  JAX derives the same convolution but leaves the feature swap to the dimension numbers; inside a
  ``lax.map`` (full CROWN's chunks) XLA:CPU then runs it ~13x slower than this form.
  """
  dn = params["dimension_numbers"]
  out_feature, in_feature, spatial = dn.rhs_spec[0], dn.rhs_spec[1], dn.rhs_spec[2:]
  kernel = jnp.flip(w, spatial)
  axes = list(range(w.ndim))
  axes[out_feature], axes[in_feature] = in_feature, out_feature
  kernel = jnp.transpose(kernel, axes)
  padding = []
  for size, k, s, d, (lo, hi) in zip(
    lhs_spatial,
    (w.shape[i] for i in spatial),
    params["window_strides"],
    params["rhs_dilation"],
    params["padding"],
  ):
    k_eff = (k - 1) * d + 1
    uncovered = (size + lo + hi - k_eff) % s  # input rows the strided windows never reach
    padding.append((k_eff - 1 - lo, k_eff - 1 - hi + uncovered))
  return lax.conv_general_dilated(
    g,
    kernel,
    window_strides=(1,) * len(spatial),
    padding=padding,
    lhs_dilation=params["window_strides"],
    rhs_dilation=params["rhs_dilation"],
    dimension_numbers=lax.ConvDimensionNumbers(dn.out_spec, dn.rhs_spec, dn.lhs_spec),
    precision=params["precision"],
  )


def transpose_rows(evaluate, params, lhs, rhs):
  """The pullback of ``x -> conv(x, rhs)`` for row-stacked cotangents ``[R, N, ...out]``.

  ``evaluate(x, w)`` runs the node's convolution; ``lhs`` is the bounded input (for its per-example
  shape). Returns a function ``[cotangents] -> [cotangent of lhs]``, each ``[R, N, ...]``.
  """
  lhs_spatial = [lhs.shape[i] for i in params["dimension_numbers"].lhs_spec[2:]]

  def conv(x, w):
    return evaluate(x, w)[0]

  @jax.custom_vjp
  def transpose(g, w):
    return _transposed_conv(g, w, params, lhs_spatial)

  def transpose_fwd(g, w):
    return transpose(g, w), (g, w)

  def transpose_bwd(res, ct):
    g, w = res
    return conv(ct, w).astype(g.dtype), _kernel_gradient(ct, g, w.shape, params).astype(w.dtype)

  transpose.defvjp(transpose_fwd, transpose_bwd)

  def pullback(cotangents):
    (g,) = cotangents
    rows = g.shape[:2]
    out = transpose(g.reshape((math.prod(rows),) + g.shape[2:]), rhs)
    return [out.reshape(rows + out.shape[1:])]

  return pullback
