"""Full CROWN's convolutional rows on their receptive fields (``crown(..., patches=True)``,
``windows.py``): the same bounds and gradients as dense rows, and the window steps themselves against
JAX's own transpose."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbudget.bounds as cb
from cbudget.bounds._src import windows
from tests.nets import RandomNet, init_net, sample_box_points


class _Conv1d(nn.Module):
  """A 1-D CNN: one spatial axis, a stride, a grouped convolution (no window step: made dense)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3,), strides=2, padding=((2, 1),))(x))
    x = nn.relu(nn.Conv(4, (3,), padding="VALID")(x))
    x = nn.relu(nn.Conv(4, (2,), feature_group_count=2)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _SplitChannels(nn.Module):
  """A node with two outputs (``split``) under a convolution's rows: made dense there."""

  @nn.compact
  def __call__(self, x):
    a, b = jnp.split(nn.Conv(4, (3, 3))(x), 2, axis=-1)
    x = nn.relu(nn.Conv(3, (3, 3))(nn.relu(a) * 0.5 + nn.relu(b)))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _DilatedKernel(nn.Module):
  """A dilated kernel (no window step) between two that have one."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), padding="SAME")(x))
    x = nn.relu(nn.Conv(3, (2, 2), kernel_dilation=2, padding="SAME")(x))
    x = nn.relu(nn.Conv(3, (3, 3), strides=2)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


_NETS = {
  "cnn_stride_1": lambda: RandomNet("cnn", "relu", depth=3),
  "cnn_stride_2_batch_norm": lambda: RandomNet("cnn", "relu", depth=3, stride=2, batch_norm=True),
  "cnn_valid_hard_tanh": lambda: RandomNet("cnn", "hard_tanh", depth=3, stride=2, padding="VALID"),
  "cnn_uneven_padding": lambda: RandomNet("cnn", "leaky_relu", stride=2, padding=((2, 0), (1, 3))),
  "residual_batch_norm": lambda: RandomNet("residual", "relu", depth=3, batch_norm=True),
  "dilated_kernel": _DilatedKernel,
  "split_channels": _SplitChannels,
  "conv_1d_grouped": _Conv1d,
  "per_example_mask": None,
}


def _case(name):
  """``(f, params, x)`` in float64 (call it with x64 enabled)."""
  x = jax.random.uniform(jax.random.key(0), (2, 9, 8, 2), jnp.float64)
  if name == "conv_1d_grouped":
    x = x[:, :, 0, :]
  if name == "per_example_mask":
    # A mask per example: rows are not packed, and each example's window reads its own mask.
    net = RandomNet("cnn", "relu", depth=2)
    mask = jax.random.uniform(jax.random.key(7), x.shape, x.dtype)
    return (
      lambda p, z: net.apply(p["net"], z * p["mask"]),
      {"net": init_net(net, x, 3), "mask": mask},
      x,
    )
  net = _NETS[name]()
  return (lambda p, z: net.apply(p, z)), init_net(net, x, 1), x


def _spy_on_convolutions(monkeypatch) -> list:
  """Records, for every window met by a convolution, whether it went through on windows."""
  pulled = []
  original = windows.through_conv

  def spy(*args):
    out = original(*args)
    pulled.append(out is not None)
    return out

  monkeypatch.setattr(windows, "through_conv", spy)
  return pulled


@pytest.mark.parametrize("name", list(_NETS))
def test_patches_give_the_dense_rows_bounds(name, monkeypatch):
  pulled = _spy_on_convolutions(monkeypatch)
  with jax.enable_x64(True):
    f, params, x = _case(name)
    box = cb.Box.from_budget(x, 0.05)
    # Packed rows in one pass each, and (for two nets) unpacked rows in several skippable passes.
    options = [dict(chunk_size=None)]
    if name == "residual_batch_norm":
      options.append(dict(chunk_size=30, pack_rows=False))
    for option in options:
      pulled.clear()
      patches = jax.jit(cb.crown(f, "crown", **option))(params, box)
      assert any(pulled), "no rows went through a convolution on windows"
      dense = jax.jit(cb.crown(f, "crown", patches=False, **option))(params, box)
      np.testing.assert_allclose(patches.lower, dense.lower, rtol=1e-10, atol=1e-11)
      np.testing.assert_allclose(patches.upper, dense.upper, rtol=1e-10, atol=1e-11)
    values = jax.vmap(lambda z: f(params, z))(sample_box_points(box, jax.random.key(2), 300))
    assert bool(jnp.all(values >= patches.lower - 1e-9) & jnp.all(values <= patches.upper + 1e-9))


def test_patches_give_the_dense_rows_gradients():
  with jax.enable_x64(True):
    f, params, x = _case("cnn_stride_2_batch_norm")
    box = cb.Box.from_budget(x, 0.05)

    def spread(p, patches):
      bound = cb.crown(f, "crown", patches=patches)(p, box)
      return jnp.sum(jnp.tanh(bound.lower)) - jnp.sum(jnp.tanh(bound.upper))

    grads = [jax.jit(jax.grad(spread), static_argnums=1)(params, p) for p in (True, False)]
    for a, b in zip(*(jax.tree.leaves(g) for g in grads)):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
  "spatial,kernel,stride,padding,window",
  [
    ((9, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), (2, 3)),
    ((9, 8), (4, 3), (2, 2), ((2, 1), (0, 2)), (3, 2)),
    ((12,), (5,), (3,), ((4, 0),), (2,)),
  ],
)
def test_a_window_pulled_back_through_a_convolution_is_the_dense_transpose(
  spatial, kernel, stride, padding, window
):
  """``densify(through_conv(w)) == conv_vjp(densify(w))`` for windows anywhere, also partly past
  the output's edges (their entries there are zeros and must stay out)."""
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(3), 4)
    s = len(spatial)
    x = jax.random.normal(keys[0], (2,) + spatial + (3,), jnp.float64)
    w = jax.random.normal(keys[1], kernel + (3, 5), jnp.float64)
    names = ("NWC", "WIO", "NWC") if s == 1 else ("NHWC", "HWIO", "NHWC")
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, names)
    conv = lambda z: jax.lax.conv_general_dilated(z, w, stride, padding, dimension_numbers=dn)
    out_spatial = conv(x).shape[1:-1]
    r, n = 4, 2
    values = jax.random.normal(keys[2], (r, n) + window + (5,), jnp.float64)
    low = jnp.asarray([-w_ + 1 for w_ in window])
    high = jnp.asarray(out_spatial)
    origin = jax.random.randint(keys[3], (r, n, s), low, high).astype(jnp.int32)
    win = windows.Window(values, origin, out_spatial)
    win = win._replace(values=jnp.where(windows._indices(win)[1][..., None], values, 0))
    params = {
      "dimension_numbers": dn,
      "window_strides": stride,
      "padding": padding,
      "lhs_dilation": (1,) * s,
      "rhs_dilation": (1,) * s,
      "feature_group_count": 1,
      "batch_group_count": 1,
      "precision": None,
      "preferred_element_type": None,
    }
    assert windows.through_conv(win, w, params, spatial) is not None
    dense = jax.random.normal(keys[0], (n,) + spatial + (3,), jnp.float64)

    @jax.jit
    def both(values, origin, w, dense):
      win = windows.Window(values, origin, out_spatial)
      pulled = windows.through_conv(win, w, params, spatial)
      _, vjp = jax.vjp(conv, x)
      expected = jax.vmap(lambda g: vjp(g)[0])(windows.densify(win))
      # gather reads each slot's window back out of a dense value.
      read = windows.contract(pulled.values, windows.gather(dense, pulled))
      return windows.densify(pulled), expected, read, jnp.einsum("rn...,n...->rn", expected, dense)

    pulled, expected, read, contracted = both(win.values, win.origin, w, dense)
    np.testing.assert_allclose(pulled, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(read, contracted, rtol=1e-12, atol=1e-12)


def test_a_window_as_large_as_the_input_is_left_to_the_dense_rows():
  with jax.enable_x64(True):
    params = {
      "dimension_numbers": jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)),
      "window_strides": (1, 1),
      "padding": ((1, 1), (1, 1)),
      "lhs_dilation": (1, 1),
      "rhs_dilation": (1, 1),
      "feature_group_count": 1,
      "batch_group_count": 1,
      "preferred_element_type": None,
    }
    win = windows.start(jnp.zeros((2, 1), int), jnp.ones((2, 1)), (3, 3, 2), jnp.float64)
    assert windows.through_conv(win, jnp.ones((3, 3, 4, 2)), params, (3, 3)) is None
    assert windows.through_conv(win, jnp.ones((3, 3, 4, 2)), params, (4, 3)) is not None
