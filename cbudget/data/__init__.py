"""Datasets for certified training with per-pixel budgets: loading, generation, batching, augmentation.

    ds = load("mnist", "train", data_dir="../shared/data")   # or "shapes" (no files needed)
    for batch in batches(ds, 128, seed=0, epoch=3, augment=False):
        batch["image"], batch["label"], batch.get("mask")

Datasets live in memory as numpy arrays (`Dataset`): float32 NHWC images in [0, 1], int32 labels, and
float32 [N, H, W, 1] masks marking label-relevant pixels where the dataset knows them (shapes, canvases).
Every data problem raises `DataError`.
"""

from cbudget.data._load import DATASETS, DEFAULT_DATASET, INFO, info, load
from cbudget.data._pipeline import batches, num_batches, random_crop_flip
from cbudget.data._synthetic import make_canvas_dataset, make_shapes
from cbudget.data._types import DataError, Dataset, DatasetInfo, validate

__all__ = [
  "DATASETS",
  "DEFAULT_DATASET",
  "DataError",
  "Dataset",
  "DatasetInfo",
  "INFO",
  "batches",
  "info",
  "load",
  "make_canvas_dataset",
  "make_shapes",
  "num_batches",
  "random_crop_flip",
  "validate",
]
