"""Budget models: images ``[N, H, W, C]`` in [0, 1] -> raw log-budget maps.

Contextual generators (``small``, ``unet``, ``coarse``, ``wide``) give each image its own map;
:class:`GlobalBudget` learns one map shared by all images. :func:`budget_model` picks the model of a
budget mode (``None`` for uniform budgets, which have no model).

A generator outputs the *shape* of the budget as raw log-budgets, ``[N, H, W, 1]``
(``per_pixel=True``: one budget per pixel, shared across channels) or
``[N, H, W, C]`` (one per element).  The scale (``eps0``), the exact volume
``mean log eps = log eps0`` and the range ``[a eps0, b eps0]`` are imposed
afterwards by :func:`cbudget.budgets.budgets`, so any additive constant in the
output is irrelevant.

The 1x1 head is initialised with small weights (``head_init_scale`` times the
LeCun-normal scale, zero bias) so that at init the raw maps are nearly
constant and the projected budgets nearly uniform, while every parameter still
receives a non-zero gradient (an all-zero head would block the gradient to the
body on the first step).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
  "SmallGenerator",
  "UNetGenerator",
  "CoarseGenerator",
  "WideGenerator",
  "GlobalBudget",
  "GENERATORS",
  "get_generator",
  "budget_model",
]


def _head_init(scale: float):
  # Variance scales with scale**2, so the weight std is `scale` x LeCun normal.
  return nn.initializers.variance_scaling(scale**2, "fan_in", "truncated_normal")


def _head(out_channels: int, scale: float) -> nn.Module:
  """The 1x1 conv head, small-initialised so that budgets start close to uniform."""
  return nn.Conv(
    out_channels,
    (1, 1),
    kernel_init=_head_init(scale),
    bias_init=nn.initializers.zeros_init(),
    name="head",
  )


def _conv_stack(
  h: jax.Array, features: Sequence[int], out_channels: int, head_init_scale: float
) -> jax.Array:
  """3x3 SAME convs with ReLU (``conv0``, ``conv1``, ...), then the small-initialised 1x1 head.

  Called inside a generator's compact ``__call__``: the layers become that generator's submodules.
  """
  for i, f in enumerate(features):
    h = nn.relu(nn.Conv(f, (3, 3), padding="SAME", name=f"conv{i}")(h))
  return _head(out_channels, head_init_scale)(h)


def _normalize(
  x: jax.Array, mean: Sequence[float] | None, std: Sequence[float] | None
) -> jax.Array:
  """``(x - mean) / std`` per channel; identity for the missing parts."""
  if mean is not None:
    x = x - jnp.asarray(mean, x.dtype)
  if std is not None:
    x = x / jnp.asarray(std, x.dtype)
  return x


class _Generator(nn.Module):
  """What every generator has: the output layout, the head's init scale, the input normalisation."""

  per_pixel: bool = True
  head_init_scale: float = 1e-2
  input_mean: tuple[float, ...] | None = None
  input_std: tuple[float, ...] | None = None

  def _prepare(self, x: jax.Array) -> tuple[jax.Array, int]:
    """The normalised images and the number of output channels (1 per pixel, else C)."""
    if x.ndim != 4:
      raise ValueError(f"generators expect images [N, H, W, C], got shape {x.shape}")
    return _normalize(x, self.input_mean, self.input_std), 1 if self.per_pixel else x.shape[-1]


class SmallGenerator(_Generator):
  """MNIST-scale generator: 3x3 SAME convs with ReLU, then a 1x1 conv head.

  Attributes:
    per_pixel: output ``[N, H, W, 1]`` if True, else ``[N, H, W, C]``.
    features: channels of the 3x3 conv layers.
    head_init_scale: head weight std relative to LeCun normal (small: near-uniform init).
    input_mean, input_std: optional per-channel normalisation of the [0, 1] input.
  """

  features: tuple[int, ...] = (16, 32, 32)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, out_ch = self._prepare(x)
    return _conv_stack(h, self.features, out_ch, self.head_init_scale)


class UNetGenerator(_Generator):
  """CIFAR-scale encoder-decoder: one downsample, one upsample, one skip.

  ``enc``: two 3x3 convs at full resolution (the skip); ``mid``: a stride-2 3x3
  conv and a 3x3 conv at half resolution; ``dec``: bilinear upsampling back to
  the skip's exact size (odd sizes work), concatenation with the skip, two 3x3
  convs and the small-initialised 1x1 head.  ReLU throughout.

  Attributes:
    per_pixel: output ``[N, H, W, 1]`` if True, else ``[N, H, W, C]``.
    width: channels at full resolution (``2 * width`` at half resolution).
    head_init_scale, input_mean, input_std: as in :class:`SmallGenerator`.
  """

  width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, out_ch = self._prepare(x)
    w = self.width
    h = nn.relu(nn.Conv(w, (3, 3), padding="SAME", name="enc0")(h))
    skip = nn.relu(nn.Conv(w, (3, 3), padding="SAME", name="enc1")(h))
    h = nn.relu(nn.Conv(2 * w, (3, 3), strides=(2, 2), padding="SAME", name="down")(skip))
    h = nn.relu(nn.Conv(2 * w, (3, 3), padding="SAME", name="mid")(h))
    h = jax.image.resize(h, skip.shape[:-1] + (h.shape[-1],), method="bilinear")
    h = jnp.concatenate([h, skip], axis=-1)
    h = nn.relu(nn.Conv(w, (3, 3), padding="SAME", name="dec0")(h))
    h = nn.relu(nn.Conv(w, (3, 3), padding="SAME", name="dec1")(h))
    return _head(out_ch, self.head_init_scale)(h)


class CoarseGenerator(_Generator):
  """A cheap generator for budgets that vary on a coarser grid than the pixels.

  Average-pools the image by ``factor``, runs 3x3 SAME convs with ReLU and the small-initialised
  1x1 head at that resolution, and resizes the raw log-budget map back to the image size
  (bilinear; odd sizes work). Its cost is about ``1 / factor**2`` of :class:`SmallGenerator` with
  the same features, so certified training with it costs little more than with uniform budgets
  (see bench/README.md); the price is budgets that are smooth over ``factor`` pixels.

  Attributes:
    per_pixel: output ``[N, H, W, 1]`` if True, else ``[N, H, W, C]``.
    factor: pooling factor of the working resolution.
    features: channels of the 3x3 conv layers.
    head_init_scale, input_mean, input_std: as in :class:`SmallGenerator`.
  """

  factor: int = 2
  features: tuple[int, ...] = (16, 16)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, out_ch = self._prepare(x)
    k = (self.factor, self.factor)
    h = nn.avg_pool(h, k, strides=k, padding="SAME")
    h = _conv_stack(h, self.features, out_ch, self.head_init_scale)
    return jax.image.resize(h, x.shape[:-1] + (out_ch,), method="bilinear")


class WideGenerator(_Generator):
  """A generator whose budgets see a whole slot of a framed canvas (``mnist_canvas``).

  On a framed canvas a pixel's relevance depends on the marker around its slot, up to 14 pixels
  away, and the labelled slot's frame differs from the other slots' decoys only in which of two
  adjacent one-pixel rings is lit. :class:`CoarseGenerator` pools the pixels first, which averages
  the two rings into the same value, and its 3x3 layers see about 10 pixels: it can find neither.
  Here one 3x3 conv reads the fine patterns at full resolution, max-pooling by ``factor`` keeps
  what it found, and 3x3 convs at ``1 / factor`` resolution widen the view to about
  ``2 * (len(features) + 1) * factor`` pixels (40 with the defaults, more than a 28-pixel slot);
  the map is resized back bilinearly.

  Attributes:
    factor: pooling factor of the working resolution.
    stem_features: channels of the full-resolution 3x3 conv.
    features: channels of the 3x3 convs at the working resolution.
    per_pixel, head_init_scale, input_mean, input_std: as in :class:`SmallGenerator`.
  """

  factor: int = 4
  stem_features: int = 8
  features: tuple[int, ...] = (16, 16, 16, 16)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, out_ch = self._prepare(x)
    h = nn.relu(nn.Conv(self.stem_features, (3, 3), padding="SAME", name="stem")(h))
    k = (self.factor, self.factor)
    h = nn.max_pool(h, k, strides=k, padding="SAME")
    h = _conv_stack(h, self.features, out_ch, self.head_init_scale)
    return jax.image.resize(h, x.shape[:-1] + (out_ch,), method="bilinear")


GENERATORS = {
  "small": SmallGenerator,
  "unet": UNetGenerator,
  "coarse": CoarseGenerator,
  "wide": WideGenerator,
}


def get_generator(name: str, per_pixel: bool = True, **kwargs) -> nn.Module:
  """Generator by name ('small', 'unet', 'coarse' or 'wide'); ``kwargs`` go to the module.

  Raises:
    ValueError: unknown name (the message lists the valid names).
  """
  try:
    cls = GENERATORS[name]
  except (KeyError, TypeError):
    raise ValueError(
      f"unknown generator {name!r}; valid names: {', '.join(sorted(GENERATORS))}"
    ) from None
  return cls(per_pixel=per_pixel, **kwargs)


class GlobalBudget(nn.Module):
  """One learned raw log-budget map shared by all inputs (non-contextual ablation).

  The parameter ``raw_log_budgets`` has the input's shape without the batch
  axis (last axis 1 when ``per_pixel``), is initialised to zeros (uniform
  budgets after projection) and is broadcast over the batch.
  """

  per_pixel: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(x.shape[1:-1]) + (1,) if self.per_pixel else tuple(x.shape[1:])
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    raw = self.param("raw_log_budgets", nn.initializers.zeros_init(), shape, dtype)
    return jnp.broadcast_to(raw, (x.shape[0],) + shape)


class OracleBudget(nn.Module):
  """Budgets from the true relevance mask of a framed canvas (``mnist_canvas``, ``cifar_canvas``):
  a reference, not a learner (no parameters).

  The labelled slot is the one whose frame is present: every pixel of its outer ring above
  ``MARKER_THRESHOLD`` in every channel (the detector under which the canvases are built, exact on
  clean images). Raw log-budgets are 0 inside that slot and ``contrast`` outside, so the volume
  projection gives two levels: small inside the mask, large outside, at the same volume as every
  other mode.
  """

  slot_shape: tuple[int, int]
  per_pixel: bool = True
  contrast: float = 20.0  # wider than any budget range: at most one of the two levels is free

  @nn.compact
  def __call__(self, x):
    from cbudget.data._synthetic import MARKER_THRESHOLD, marker_patterns

    n, height, width, c = x.shape
    h, w = self.slot_shape
    if height % h or width % w:
      raise ValueError(
        f"oracle budgets: images of {height}x{width} are not a grid of {h}x{w} slots; the oracle "
        "needs a framed canvas dataset (mnist_canvas, cifar_canvas)"
      )
    frame = jnp.asarray(marker_patterns(h, w)[1])[:, :, None]
    slots = x.reshape(n, height // h, h, width // w, w, c).transpose(0, 1, 3, 2, 4, 5)
    marked = jnp.all(jnp.where(frame, slots > MARKER_THRESHOLD, True), axis=(3, 4, 5))
    mask = jnp.repeat(jnp.repeat(marked, h, axis=1), w, axis=2)  # [n, height, width]
    raw = jnp.where(mask, 0.0, self.contrast).astype(x.dtype)[..., None]
    return jax.lax.stop_gradient(raw if self.per_pixel else jnp.broadcast_to(raw, x.shape))


def budget_model(
  mode: str,
  generator: str = "coarse",
  per_pixel: bool = True,
  slot_shape: tuple[int, int] | None = None,
) -> nn.Module | None:
  """The model of budget ``mode``: ``None`` (uniform), :class:`GlobalBudget` (global), the
  generator called ``generator`` (contextual) or :class:`OracleBudget` (oracle: needs the
  ``slot_shape`` of a framed canvas)."""
  if mode == "uniform":
    return None
  if mode == "global":
    return GlobalBudget(per_pixel=per_pixel)
  if mode == "oracle":
    if slot_shape is None:
      raise ValueError("--budget=oracle needs a framed canvas dataset (mnist_canvas, cifar_canvas)")
    return OracleBudget(tuple(slot_shape), per_pixel=per_pixel)
  return get_generator(generator, per_pixel=per_pixel)
