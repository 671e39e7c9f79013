"""Flax classifiers for certified training, selectable by name.

All models take images ``[N, H, W, C]`` with pixel values in ``[0, 1]`` and
return logits ``[N, num_classes]``.  Input normalisation ``(x - mean) / std``
happens *inside* the model: perturbation boxes ``[x - eps, x + eps] ∩ [0, 1]``
are defined in pixel space, so a bound-propagation engine must see the
normalisation as the first (affine) operation of the network.

The models are written with plain ``nn.Dense``, ``nn.Conv``, ``nn.relu``,
``nn.BatchNorm``, reshapes and adds so that they trace to simple jaxprs
(no dropout, no max-pooling, no layer norm).

Every model has the signature ``__call__(self, x, train: bool = False)``;
BN-free models ignore ``train``.  BatchNorm models use
``nn.BatchNorm(use_running_average=not train, momentum=bn_momentum)`` (0.9 by default; certified
training applies a clone with ``bn_momentum=0`` to read the current batch's statistics), so in inference
mode each example's output is independent of the rest of the batch, and in
training mode they must be applied with ``mutable=['batch_stats']``.

Padding choices: the DeepMind models of Gowal et al. (2018) use ``VALID``
padding (as in the paper's MNIST/CIFAR architecture tables); CNN-7 (Shi et
al., 2021) and the residual net use ``SAME`` padding (padding 1 for 3x3).

Parameter counts (10 classes; MNIST 28x28x1 / CIFAR-10 32x32x3), counting
trainable params only (BN running statistics excluded):

====================  ===========  ============
model                 MNIST        CIFAR-10
====================  ===========  ============
mlp (256, 256)          269,322       855,050
dm_small                329,606       470,918
dm_medium               893,418     1,188,906
dm_large              3,623,498     5,721,802
cnn7                 13,259,338    17,192,650
resnet                  647,830       840,118
====================  ===========  ============

(``tests/test_classifiers.py::test_parameter_counts`` recomputes and checks
these numbers.)
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

Array = Any


def _normalize(x: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
  """``(x - mean) / std`` with per-channel constants broadcast on the last axis."""
  mean_arr = jnp.asarray(mean, dtype=x.dtype)
  std_arr = jnp.asarray(std, dtype=x.dtype)
  return (x - mean_arr) / std_arr


def _flatten(x: Array) -> Array:
  """Flattens all but the batch axis."""
  return x.reshape((x.shape[0], -1))


class MLP(nn.Module):
  """Fully connected ReLU network: flatten, Dense(h) + ReLU per hidden width, Dense(classes)."""

  num_classes: int
  hidden: Sequence[int] = (256, 256)
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train  # No train-dependent layers.
    h = _flatten(_normalize(x, self.mean, self.std))
    for width in self.hidden:
      h = nn.relu(nn.Dense(width)(h))
    return nn.Dense(self.num_classes)(h)


# Conv spec: (features, kernel, stride).
_ConvSpec = tuple[int, int, int]


class PlainCNN(nn.Module):
  """Conv stack followed by dense layers, ReLU after every hidden layer, no BN.

  Used for the DM-small/medium/large networks of Gowal et al. (2018).
  """

  num_classes: int
  convs: Sequence[_ConvSpec]
  dense: Sequence[int]
  padding: str = "VALID"
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train  # No train-dependent layers.
    h = _normalize(x, self.mean, self.std)
    for features, kernel, stride in self.convs:
      h = nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=self.padding,
      )(h)
      h = nn.relu(h)
    h = _flatten(h)
    for width in self.dense:
      h = nn.relu(nn.Dense(width)(h))
    return nn.Dense(self.num_classes)(h)


class CNN7(nn.Module):
  """CNN-7 of Shi et al. (2021): 5 conv-BN-ReLU blocks, Dense-BN-ReLU, Dense.

  Convs are 3x3 with padding 1 (``SAME``); the third conv has stride 2.
  """

  num_classes: int
  widths: Sequence[_ConvSpec] = (
    (64, 3, 1),
    (64, 3, 1),
    (128, 3, 2),
    (128, 3, 1),
    (128, 3, 1),
  )
  dense_width: int = 512
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)
    h = _normalize(x, self.mean, self.std)
    for features, kernel, stride in self.widths:
      h = nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
      )(h)
      h = nn.relu(bn()(h))
    h = _flatten(h)
    h = nn.relu(bn()(nn.Dense(self.dense_width)(h)))
    return nn.Dense(self.num_classes)(h)


class ResidualBlock(nn.Module):
  """Basic residual block: conv-BN-ReLU-conv-BN + shortcut, then ReLU.

  The shortcut is the identity when shape is preserved, otherwise a strided
  1x1 conv followed by BN (projection shortcut).
  """

  features: int
  stride: int = 1
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)
    s = (self.stride, self.stride)
    h = nn.Conv(self.features, (3, 3), strides=s, padding="SAME")(x)
    h = nn.relu(bn()(h))
    h = nn.Conv(self.features, (3, 3), padding="SAME")(h)
    h = bn()(h)
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = bn()(nn.Conv(self.features, (1, 1), strides=s)(x))
    else:
      shortcut = x
    return nn.relu(h + shortcut)


class ResNet(nn.Module):
  """Small residual net: conv stem, residual blocks, dense head.

  Default: stem Conv16 3x3 s1 -> BN -> ReLU, block(16, s1, identity),
  block(32, s2, 1x1 projection), flatten, Dense(head) -> ReLU, Dense(classes).
  No pooling, so bound propagation only sees convs, BN, adds and ReLUs.
  """

  num_classes: int
  stem_features: int = 16
  blocks: Sequence[tuple[int, int]] = ((16, 1), (32, 2))  # (features, stride)
  head_width: int = 100
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    h = _normalize(x, self.mean, self.std)
    h = nn.Conv(self.stem_features, (3, 3), padding="SAME")(h)
    h = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(h)
    h = nn.relu(h)
    for features, stride in self.blocks:
      h = ResidualBlock(features, stride, self.bn_momentum)(h, train=train)
    h = _flatten(h)
    h = nn.relu(nn.Dense(self.head_width)(h))
    return nn.Dense(self.num_classes)(h)


def _dm_small(num_classes: int, **kw: Any) -> nn.Module:
  return PlainCNN(num_classes, convs=((16, 4, 2), (32, 4, 1)), dense=(100,), **kw)


def _dm_medium(num_classes: int, **kw: Any) -> nn.Module:
  return PlainCNN(
    num_classes,
    convs=((32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)),
    dense=(512, 512),
    **kw,
  )


def _dm_large(num_classes: int, **kw: Any) -> nn.Module:
  return PlainCNN(
    num_classes,
    convs=((64, 3, 1), (64, 3, 1), (128, 3, 2), (128, 3, 1), (128, 3, 1)),
    dense=(512,),
    **kw,
  )


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
  "mlp": lambda num_classes, **kw: MLP(num_classes, **kw),
  "dm_small": _dm_small,
  "dm_medium": _dm_medium,
  "dm_large": _dm_large,
  "cnn7": lambda num_classes, **kw: CNN7(num_classes, **kw),
  "resnet": lambda num_classes, **kw: ResNet(num_classes, **kw),
}

CLASSIFIERS: tuple[str, ...] = tuple(_FACTORIES)

# Models containing BatchNorm (need ``mutable=['batch_stats']`` when training).
BN_CLASSIFIERS: tuple[str, ...] = ("cnn7", "resnet")


def get_classifier(
  name: str,
  num_classes: int,
  *,
  mean: Sequence[float] = (0.0,),
  std: Sequence[float] = (1.0,),
  **kwargs: Any,
) -> nn.Module:
  """Builds the classifier called ``name``.

  Args:
    name: one of :data:`CLASSIFIERS`.
    num_classes: number of output logits.
    mean, std: per-channel normalisation constants applied inside the model
      (e.g. ``cbudget.data.info(name).mean``); length 1 broadcasts.
    **kwargs: extra module attributes, e.g. ``hidden=(512,)`` for ``mlp`` or
      ``padding="SAME"`` for the ``dm_*`` models.

  Raises:
    ValueError: for an unknown name (the message lists valid names).
  """
  if name not in _FACTORIES:
    raise ValueError(f"Unknown classifier {name!r}; valid names: {', '.join(CLASSIFIERS)}")
  return _FACTORIES[name](num_classes, mean=tuple(mean), std=tuple(std), **kwargs)
