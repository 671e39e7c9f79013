"""Small random networks for the bound tests: every supported layer kind, seeded."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = {
  "relu": nn.relu,
  "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.1),
  "hard_tanh": jax.nn.hard_tanh,
  "abs": jnp.abs,
  "sigmoid": nn.sigmoid,
  "tanh": jnp.tanh,
  "clip": lambda x: jnp.clip(x, -0.5, 0.7),
}


class RandomNet(nn.Module):
  """An MLP, a CNN or a residual CNN with normalisation, BatchNorm and one activation kind."""

  kind: str
  activation: str
  depth: int = 2
  width: int = 4
  batch_norm: bool = False
  stride: int = 1
  padding: str = "SAME"
  outputs: int = 3

  @nn.compact
  def __call__(self, x):
    act = ACTIVATIONS[self.activation]
    x = (x - 0.4) / 0.3
    if self.kind == "mlp":
      x = x.reshape(x.shape[0], -1)
      for _ in range(self.depth):
        x = nn.Dense(self.width)(x)
        if self.batch_norm:
          x = nn.BatchNorm(use_running_average=True)(x)
        x = act(x)
    else:
      x = nn.Conv(self.width, (3, 3), strides=self.stride, padding=self.padding)(x)
      x = act(x)
      for _ in range(self.depth - 1):
        y = nn.Conv(self.width, (3, 3), padding="SAME")(x)
        if self.batch_norm:
          y = nn.BatchNorm(use_running_average=True)(y)
        y = act(y)
        x = x + y if self.kind == "residual" else y
      x = nn.avg_pool(x, (2, 2), (1, 1))
      x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.outputs)(x)


def init_net(net, x, seed, scale=1.0):
  """Random params (Gaussian, scaled) and random BatchNorm statistics, in ``x``'s dtype.

  Drawn with NumPy on the shapes of Flax's ``init`` (traced, not run): running it would compile
  every initialiser, seconds per network that a hypothesis test pays again for every example.
  (Flax keeps float32 params by default; with float64 inputs, BatchNorm's ``rsqrt`` of a float32
  variance would then be computed in float32, and two compilations of the same model can round it
  differently by ~1e-8: a float64 test must use a float64 model.)
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "var" in name:
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif "mean" in name:
      value = 0.3 * rng.standard_normal(leaf.shape)
    else:
      value = scale * rng.standard_normal(leaf.shape) / np.sqrt(max(1, leaf.shape[0]))
    return jnp.asarray(value.astype(x.dtype))

  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(net.init, jax.random.key(seed), x))


def sample_box_points(box, key, num):
  """Uniform samples inside the box, plus every corner when the input has at most 10 elements."""
  lower, upper = np.asarray(box.lower), np.asarray(box.upper)
  pts = jax.random.uniform(key, (num,) + lower.shape, dtype=lower.dtype)
  pts = lower + pts * (upper - lower)
  per_example = lower[0].size
  if per_example <= 10:
    corners = np.array(list(itertools.product([0.0, 1.0], repeat=per_example)), lower.dtype)
    corners = corners.reshape((-1, 1) + lower.shape[1:])
    pts = np.concatenate([pts, lower + corners * (upper - lower)], 0)
  return pts
