"""Oracle budgets: the true mask of a framed canvas, at the same volume as every other mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbudget import data
from cbudget.budgets import clipped_half_width
from cbudget.model import CertifiedModel
from cbudget.models.generators import budget_model


def _canvas(kind, n=12):
  rng = np.random.default_rng(0)
  if kind == "mnist_canvas":
    images = np.where(rng.random((n, 28, 28, 1)) < 0.2, 1.0, 0.0).astype(np.float32)
  else:
    images = rng.uniform(0, 1, (n, 32, 32, 3)).astype(np.float32)
  base = data.Dataset(images, rng.integers(0, 10, n).astype(np.int32), None, 10, "base")
  return data.make_canvas_dataset(base, kind, seed=1)


@pytest.mark.parametrize("kind", ["mnist_canvas", "cifar_canvas"])
def test_oracle_budgets_follow_the_mask_at_the_same_effective_volume(kind):
  ds = _canvas(kind)
  model = CertifiedModel.create(
    dataset=kind, classifier="mlp", budget="oracle", budget_range=(0.1, 4.9), volume="effective"
  )
  x = jnp.asarray(ds.images)
  variables = model.init(jax.random.key(0), x[:1])
  assert variables.params["budget"] == {}
  eps = np.asarray(model.budgets(variables.params, x, 0.1))
  mask = np.broadcast_to(ds.masks.astype(bool), eps.shape)
  # two levels: every pixel of the mask below every pixel outside it
  for i in range(len(eps)):
    assert eps[i][mask[i]].max() < eps[i][~mask[i]].min()
  # the same effective volume as a uniform 0.1 on each image
  log_h = lambda e: np.log(np.asarray(clipped_half_width(jnp.asarray(e), x))).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(log_h(eps), log_h(np.full(eps.shape, 0.1, np.float32)), atol=1e-5)


def test_oracle_needs_a_framed_canvas():
  with pytest.raises(ValueError, match="framed canvas"):
    budget_model("oracle")
