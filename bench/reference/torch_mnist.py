"""What both auto_LiRPA reference scripts share: MNIST from the raw IDX files, the PyTorch
twins of ``bench.common.NETS``, the margin spec and the clipped ℓ∞ box. Imported as a sibling module (the scripts run as files, in
auto_LiRPA's own environment, where cbudget is not installed)."""

import gzip

import numpy as np
import torch
from auto_LiRPA import BoundedTensor
from auto_LiRPA.perturbations import PerturbationLpNorm
from torch import nn


def _idx(path):
  with gzip.open(path) as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(data_dir):
  """``(x_train, y_train, x_test, y_test)``: images ``[N, 1, 28, 28]`` in [0, 1], int64 labels."""
  root = data_dir.rstrip("/") + "/mnist/"
  images = lambda name: torch.tensor(_idx(root + name), dtype=torch.float32)[:, None] / 255
  labels = lambda name: torch.tensor(_idx(root + name), dtype=torch.int64)
  return (
    images("train-images-idx3-ubyte.gz"),
    labels("train-labels-idx1-ubyte.gz"),
    images("t10k-images-idx3-ubyte.gz"),
    labels("t10k-labels-idx1-ubyte.gz"),
  )


def make_net(name):
  """The same layers as ``bench.common.NETS[name]`` (Flax pads (1, 1) where PyTorch says
  padding=1): ``dm_small`` or ``cnn_small``."""
  if name == "dm_small":
    convs, flat = [nn.Conv2d(1, 16, 4, stride=2), nn.Conv2d(16, 32, 4, stride=1)], 32 * 10 * 10
  else:
    convs = [nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.Conv2d(16, 32, 4, stride=2, padding=1)]
    flat = 32 * 7 * 7
  return nn.Sequential(
    convs[0], nn.ReLU(), convs[1], nn.ReLU(), nn.Flatten(), nn.Linear(flat, 100), nn.ReLU(),
    nn.Linear(100, 10),
  )  # fmt: skip


def spec(labels):
  """Margin rows ``logit_y - logit_j`` for the 9 other classes: ``[N, 9, 10]``."""
  c = torch.eye(10)[labels].unsqueeze(1) - torch.eye(10).unsqueeze(0)
  keep = labels.unsqueeze(1) != torch.arange(10).unsqueeze(0)
  return c[keep].view(labels.size(0), 9, 10)


def bounded(x, eps):
  """``x`` with the ℓ∞ box of radius ``eps`` clipped to [0, 1]."""
  ptb = PerturbationLpNorm(
    norm=np.inf, eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1)
  )
  return BoundedTensor(x, ptb)
