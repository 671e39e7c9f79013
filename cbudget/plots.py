"""Pictures of learned budgets and training curves (PNG files).

The functions use the non-interactive Agg backend and matplotlib's object-oriented ``Figure`` API, so
they work headless and leave no global pyplot state behind.
"""

from __future__ import annotations

import math
import os
from typing import Any
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cbudget.workdir import read_jsonl  # noqa: E402

Array = Any

_ERROR_KEYS = ("clean_error", "pgd_error", "certified_error")


def _to_nhwc(a: Array, name: str) -> np.ndarray:
  """Converts ``[N, H, W]`` or ``[N, H, W, C]`` to float ``[N, H, W, C]``."""
  a = np.asarray(a, dtype=np.float64)
  if a.ndim == 3:
    a = a[..., None]
  if a.ndim != 4:
    raise ValueError(f"{name} must be [N,H,W] or [N,H,W,C], got {a.shape}")
  return a


def _display_image(img: np.ndarray) -> tuple[np.ndarray, dict]:
  """``[H, W, C]`` -> (array for imshow, imshow kwargs); grayscale or RGB."""
  img = np.clip(img, 0.0, 1.0)
  if img.shape[-1] == 1:
    return img[..., 0], {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
  if img.shape[-1] == 3:
    return img, {}
  # Other channel counts: show the channel mean as grayscale.
  return img.mean(axis=-1), {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}


def _ensure_dir(path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)


def plot_budget_grid(
  images: Array,
  eps: Array,
  path: str,
  *,
  masks: Array | None = None,
  labels: Sequence[int] | Array | None = None,
  preds: Sequence[int] | Array | None = None,
  max_examples: int = 8,
  title: str | None = None,
) -> str:
  """Writes a PNG grid of inputs and their per-pixel budgets.

  Rows are examples (at most ``max_examples``); columns are

  1. the input image (grayscale or RGB),
  2. the budget heat map (channel-mean of ``eps``), all rows on ONE shared
     colour scale ``[min eps, max eps]`` over the shown examples, with a
     colour bar labelled "ε",
  3. an overlay: the image with the heat map drawn semi-transparently.

  If ``masks`` is given, its 0.5 contour is drawn on the heat map and the
  overlay.  ``labels``/``preds`` (if given) annotate each row.

  Args:
    images: ``[N, H, W, C]`` or ``[N, H, W]`` in ``[0, 1]``.
    eps: budgets broadcastable to ``[N, H, W, C_eps]`` (e.g. ``[N, H, W, 1]``
      or the same shape as ``images``).
    path: output PNG path (parent directories are created).
    masks: optional ``[N, H, W]`` / ``[N, H, W, 1]`` relevance masks.
    labels, preds: optional per-example integers.
    max_examples: maximum number of rows.
    title: optional figure title.

  Returns:
    ``path``.
  """
  imgs = _to_nhwc(images, "images")
  budgets = _to_nhwc(eps, "eps")
  n = min(imgs.shape[0], max_examples)
  if n == 0:
    raise ValueError("plot_budget_grid needs at least one example")
  imgs = imgs[:n]
  if budgets.shape[0] == 1:  # One budget map shared by all examples.
    budgets = np.repeat(budgets, n, axis=0)
  budgets = budgets[:n]
  if budgets.shape[1:3] != imgs.shape[1:3]:
    raise ValueError(f"eps {budgets.shape} does not match images {imgs.shape}")
  heat = budgets.mean(axis=-1)  # [n, H, W]
  vmin, vmax = float(np.min(heat)), float(np.max(heat))
  if not vmax > vmin:
    vmax = vmin + 1e-8  # Constant maps: avoid a degenerate colour scale.
  mask_arr = None if masks is None else _to_nhwc(masks, "masks")[:n].max(axis=-1)

  ncols = 3
  fig = Figure(figsize=(2.2 * ncols + 0.8, 2.2 * n + (0.5 if title else 0.0)))
  axes = fig.subplots(n, ncols, squeeze=False)
  col_titles = ("input", "budget ε", "overlay")
  heat_im = None
  for i in range(n):
    img, img_kw = _display_image(imgs[i])
    ax_in, ax_heat, ax_ov = axes[i]
    ax_in.imshow(img, **img_kw)
    heat_im = ax_heat.imshow(heat[i], cmap="magma", vmin=vmin, vmax=vmax)
    ax_ov.imshow(img, **img_kw)
    ax_ov.imshow(heat[i], cmap="magma", vmin=vmin, vmax=vmax, alpha=0.55)
    if mask_arr is not None and np.any(mask_arr[i] > 0.5) and np.any(mask_arr[i] <= 0.5):
      for ax in (ax_heat, ax_ov):
        ax.contour(mask_arr[i], levels=[0.5], colors="cyan", linewidths=1.0)
    row_text = []
    if labels is not None:
      row_text.append(f"y={int(np.asarray(labels)[i])}")
    if preds is not None:
      row_text.append(f"ŷ={int(np.asarray(preds)[i])}")
    if row_text:
      ax_in.set_ylabel(" ".join(row_text), fontsize=9)
    for j, ax in enumerate(axes[i]):
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(col_titles[j], fontsize=10)
  cbar = fig.colorbar(heat_im, ax=axes.ravel().tolist(), shrink=0.9)
  cbar.set_label("ε")
  if title:
    fig.suptitle(title)
  _ensure_dir(path)
  fig.savefig(path, format="png", dpi=100)
  return path


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) for records where ``key`` is a finite number."""
  steps, values = [], []
  for rec in records:
    v = rec.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      steps.append(rec["step"])
      values.append(float(v))
  return np.asarray(steps), np.asarray(values)


def plot_training_curves(metrics_jsonl_path: str, path: str) -> str:
  """Plots errors and ε₀ against step from a metrics JSON-lines file.

  Left panel: every ``*_error`` field present (``clean_error``,
  ``pgd_error``, ``certified_error``, ...).  Right panel: ``eps0`` (left
  axis) and, if present, ``loss`` on a secondary axis (dashed).  Fields that
  never occur are skipped; panels with no data say so.

  Returns:
    ``path``.
  """
  records = sorted(
    (r for r in read_jsonl(metrics_jsonl_path) if "step" in r), key=lambda r: r["step"]
  )
  present = {k for rec in records for k in rec}
  error_keys = [k for k in _ERROR_KEYS if k in present] + sorted(
    k for k in present if k.endswith("_error") and k not in _ERROR_KEYS
  )

  fig = Figure(figsize=(11, 4))
  ax_err, ax_eps = fig.subplots(1, 2)

  for key in error_keys:
    steps, values = _series(records, key)
    if steps.size:
      ax_err.plot(steps, values, label=key, marker="." if steps.size < 30 else None)
  ax_err.set_xlabel("step")
  ax_err.set_ylabel("error")
  ax_err.set_title("errors")
  if ax_err.lines:
    ax_err.legend(fontsize=8)
  else:
    ax_err.text(0.5, 0.5, "no error metrics", ha="center", va="center", transform=ax_err.transAxes)

  handles = []
  steps, values = _series(records, "eps0")
  if steps.size:
    handles += ax_eps.plot(steps, values, color="C0", label="ε₀")
  ax_eps.set_xlabel("step")
  ax_eps.set_ylabel("ε₀")
  ax_eps.set_title("ε₀ and loss")
  steps, values = _series(records, "loss")
  if steps.size:
    ax_loss = ax_eps.twinx()
    handles += ax_loss.plot(steps, values, color="C1", linestyle="--", label="loss")
    ax_loss.set_ylabel("loss")
  if handles:
    ax_eps.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8)
  else:
    ax_eps.text(0.5, 0.5, "no ε₀ / loss", ha="center", va="center", transform=ax_eps.transAxes)

  fig.tight_layout()
  _ensure_dir(path)
  fig.savefig(path, format="png", dpi=100)
  return path
