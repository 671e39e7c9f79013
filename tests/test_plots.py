"""Tests for cbudget.plots: files are valid, readable, non-trivial PNGs."""

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from cbudget import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, min_hw=(100, 100)):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  img = mpimg.imread(path)
  assert img.ndim == 3 and img.shape[0] >= min_hw[0] and img.shape[1] >= min_hw[1]
  # Not a blank canvas.
  assert float(img[..., :3].std()) > 0.01


def _example(n, h, w, c, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(n, h, w, c))
  yy, xx = np.mgrid[:h, :w]
  mask = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 4) ** 2).astype(np.float32)
  masks = np.broadcast_to(mask[None, ..., None], (n, h, w, 1)).copy()
  eps = np.where(masks > 0, 0.02, 0.2) + 0.01 * rng.uniform(size=(n, h, w, 1))
  return images, eps, masks


@pytest.mark.parametrize("with_masks", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
def test_plot_budget_grid(tmp_path, channels, with_masks):
  h = 28 if channels == 1 else 32
  images, eps, masks = _example(5, h, h, channels)
  path = tmp_path / "sub" / "grid.png"
  out = plots.plot_budget_grid(
    images,
    eps,
    str(path),
    masks=masks if with_masks else None,
    labels=[0, 1, 2, 3, 4],
    preds=[0, 1, 2, 3, 5],
    max_examples=4,
    title="budgets",
  )
  assert out == str(path)
  _assert_png(path, min_hw=(300, 300))


def test_plot_budget_grid_per_channel_eps_and_3d_inputs(tmp_path):
  images, eps, masks = _example(3, 32, 32, 3)
  eps_rgb = np.repeat(eps, 3, axis=-1) * np.array([1.0, 0.5, 2.0])
  path = tmp_path / "grid_rgb_eps.png"
  plots.plot_budget_grid(images, eps_rgb, str(path), masks=masks[..., 0])
  _assert_png(path)
  gray, eps_g, _ = _example(2, 28, 28, 1)
  path2 = tmp_path / "grid_3d.png"
  plots.plot_budget_grid(gray[..., 0], eps_g[..., 0], str(path2))
  _assert_png(path2)


def test_plot_budget_grid_constant_budget(tmp_path):
  images, _, _ = _example(2, 28, 28, 1)
  path = tmp_path / "const.png"
  plots.plot_budget_grid(images, np.full((2, 28, 28, 1), 0.1), str(path))
  _assert_png(path)


def test_plot_budget_grid_shape_mismatch(tmp_path):
  images, _, _ = _example(2, 28, 28, 1)
  with pytest.raises(ValueError):
    plots.plot_budget_grid(images, np.ones((2, 14, 14, 1)), str(tmp_path / "x.png"))


def test_plot_training_curves(tmp_path):
  jsonl = tmp_path / "metrics.jsonl"
  with open(jsonl, "w") as f:
    for step in range(0, 200, 10):
      rec = {
        "step": step,
        "clean_error": 0.9 * np.exp(-step / 50) + 0.05,
        "certified_error": 0.95 * np.exp(-step / 80) + 0.2,
        "eps0": min(0.3, step / 400),
        "loss": 2.3 * np.exp(-step / 60),
      }
      f.write(json.dumps(rec) + "\n")
    f.write("\n")
    f.write('{"note": "no step field"}\n')
    f.write('{"step": 200, "clean_err')  # Partially written last line.
  path = tmp_path / "curves.png"
  assert plots.plot_training_curves(str(jsonl), str(path)) == str(path)
  _assert_png(path, min_hw=(300, 600))


def test_plot_training_curves_partial_fields(tmp_path):
  jsonl = tmp_path / "metrics.jsonl"
  jsonl.write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in range(5)))
  path = tmp_path / "curves_loss_only.png"
  plots.plot_training_curves(str(jsonl), str(path))
  _assert_png(path)
