"""Shared launcher plumbing: logging, clear one-line errors, device set-up."""

import logging
import sys

import numpy as np
from absl import app


def parse_range(value: str) -> tuple[float, float]:
  parts = value.split(",")
  if len(parts) != 2:
    raise ValueError(f"expected 'a,b', got {value!r}")
  return float(parts[0]), float(parts[1])


def mean_std(values, scale=100.0, digits=1) -> str:
  """A table cell: ``mean ± std`` over seeds (sample std; just the value for one seed), '–' if
  there is no value."""
  values = [v for v in values if v is not None and not np.isnan(v)]
  if not values:
    return "–"
  mean = scale * float(np.mean(values))
  if len(values) == 1:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {scale * float(np.std(values, ddof=1)):.{digits}f}"


def setup_devices(coordinator_address=None, num_processes=None, process_id=None):
  """Join a multi-host job when asked (TPU pods and multi-GPU nodes); a no-op on one host."""
  if coordinator_address or num_processes:
    import jax

    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def run_main(main):
  """``app.run(main)``, turning the errors users cause into one line and a non-zero exit."""
  from cbudget.budgets import BudgetRangeError
  from cbudget.data import DataError

  def wrapped(argv):
    logging.getLogger("cbudget").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
    if not logging.getLogger().handlers:
      logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
      return main(argv)
    except (ValueError, DataError, BudgetRangeError, FileNotFoundError, FloatingPointError) as e:
      sys.exit(f"error: {e}")

  app.run(wrapped)
