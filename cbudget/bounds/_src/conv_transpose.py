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


# Phases pay when the transpose makes many channels: 1.6-3.7x faster than the dilated form into
# 8-16 channels (2,600 rows on XLA:CPU), while into an image's 1-4 channels interleaving the phases
# costs about what skipping the zeros saves (0.35-1.6x; python -m bench.conv_transpose).
PHASES_MIN_CHANNELS = 8


def _transposed_conv(g, w, params, lhs_spatial):
  """``T(g, w)``, the transpose of ``x -> conv(x, w)``: by phases when the convolution is strided,
  its kernel not dilated and its input has at least :data:`PHASES_MIN_CHANNELS` channels, else as
  one dilated convolution."""
  dn = params["dimension_numbers"]
  strided = any(s > 1 for s in params["window_strides"])
  channels = w.shape[dn.rhs_spec[1]]  # the convolution's input channels: what the transpose makes
  if strided and all(d == 1 for d in params["rhs_dilation"]) and channels >= PHASES_MIN_CHANNELS:
    return _transposed_conv_by_phases(g, w, params, lhs_spatial)
  return _transposed_conv_dilated(g, w, params, lhs_spatial)


def _transposed_conv_dilated(g, w, params, lhs_spatial):
  """``T(g, w)`` as one forward convolution of ``g`` (input dilated by the strides) with the kernel
  flipped and its feature dims swapped in memory.

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


def _phase(size, out_size, k, s, lo, r):
  """For the input positions ``i = q*s + r`` of one spatial dim: the first kernel tap that reaches
  them, the number of taps, and the padding of ``g`` that makes them a stride-1 correlation.

  The convolution reads ``x[o*s + t - lo]`` with tap ``t`` at output ``o``, so input ``q*s + r``
  receives ``w[t] g[o]`` from the taps ``t = t0 + j*s`` with ``t0 = (lo + r) mod s``, at
  ``o = q - m0 - j``, ``m0 = (t0 - lo - r) / s``. With the taps flipped, that is a correlation of
  ``g`` padded by ``m0 + J - 1`` in front (negative: cropped, those entries are never read).
  """
  t0 = (lo + r) % s
  taps = len(range(t0, k, s))
  count = len(range(r, size, s))  # positions of this phase
  m0 = (t0 - lo - r) // s
  pad_lo = m0 + taps - 1
  pad_hi = count + taps - 1 - out_size - pad_lo
  return t0, taps, count, (pad_lo, pad_hi, 0)


def _transposed_conv_by_phases(g, w, params, lhs_spatial):
  """``T(g, w)`` for a strided convolution as ``prod(strides)`` stride-1 convolutions, one per phase
  of the input positions modulo the strides, each with the kernel taps that reach that phase.

  The dilated form multiplies the kernel with the zeros it inserts between ``g``'s entries: with
  strides 2x2 three quarters of its products are with zeros, and XLA:CPU runs it 3-5x slower than
  the phases together (``python -m bench.conv_transpose``).
  """
  dn = params["dimension_numbers"]
  n = len(lhs_spatial)
  gc = _to_channels_last(g, dn.out_spec)  # [B, O..., Co]
  kernel = jnp.transpose(
    w, tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[0], dn.rhs_spec[1])
  )  # [K..., Co, Ci]
  window, strides = kernel.shape[:n], params["window_strides"]
  batch, channels = gc.shape[0], kernel.shape[-1]
  blocks = [-(-size // s) for size, s in zip(lhs_spatial, strides)]  # positions per phase, at most
  canonical = lax.ConvDimensionNumbers(
    (0, n + 1) + tuple(range(1, n + 1)),
    (n + 1, n) + tuple(range(n)),
    (0, n + 1) + tuple(range(1, n + 1)),
  )
  zero = jnp.zeros((), gc.dtype)
  outs = []
  for phase in itertools.product(*(range(s) for s in strides)):
    dims = [
      _phase(size, o, k, s, lo, r)
      for size, o, k, s, (lo, _), r in zip(
        lhs_spatial, gc.shape[1:-1], window, strides, params["padding"], phase
      )
    ]
    counts = tuple(d[2] for d in dims)
    if any(d[1] == 0 for d in dims):  # no tap reaches these positions
      out = jnp.zeros((batch,) + counts + (channels,), gc.dtype)
    else:
      taps = tuple(slice(d[0], None, s) for d, s in zip(dims, strides))
      sub = jnp.flip(kernel[taps], tuple(range(n)))
      padded = lax.pad(gc, zero, ((0, 0, 0),) + tuple(d[3] for d in dims) + ((0, 0, 0),))
      out = lax.conv_general_dilated(
        padded, sub, (1,) * n, "VALID", dimension_numbers=canonical, precision=params["precision"]
      )
    pad = ((0, 0, 0),) + tuple((0, b - c, 0) for b, c in zip(blocks, counts)) + ((0, 0, 0),)
    outs.append(lax.pad(out, zero, pad))  # [B, blocks..., Ci]
  # Interleave: position q*s + r of each dim comes from phase r's entry q.
  stacked = jnp.stack(outs, axis=-1).reshape((batch, *blocks, channels, *strides))
  order = [0] + [a for i in range(n) for a in (1 + i, n + 2 + i)] + [n + 1]
  full = jnp.transpose(stacked, order).reshape(
    (batch,) + tuple(b * s for b, s in zip(blocks, strides)) + (channels,)
  )
  full = full[(slice(None),) + tuple(slice(0, size) for size in lhs_spatial)]
  perm = [0] * (n + 2)  # canonical [B, S..., C] -> the input's layout
  perm[dn.lhs_spec[0]], perm[dn.lhs_spec[1]] = 0, n + 1
  for i in range(n):
    perm[dn.lhs_spec[2 + i]] = 1 + i
  return jnp.transpose(full, perm)


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
