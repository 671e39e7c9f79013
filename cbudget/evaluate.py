"""Evaluation of a trained run on its test set: clean, PGD and certified error, budget statistics.

Consistency is checked, not assumed: an example certified by any method must not be broken by the
attack (else a bound is unsound, and evaluation fails loudly), so clean <= PGD <= certified error.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from cbudget import budgets as budgets_lib
from cbudget import checkpoints, data, metrics
from cbudget.attacks import pgd_error
from cbudget.bounds import Box
from cbudget.objective import EVAL_METHODS, margin_lower_bounds, margin_spec
from cbudget.train import config_from_dict, init_state, make_setup

log = logging.getLogger("cbudget.evaluate")


class ConsistencyError(AssertionError):
  """An example certified by a bound was broken by the attack: a bound is unsound."""


def load_run(workdir: str):
  """``(config, setup, state)`` of the latest checkpoint in ``workdir``."""
  config = config_from_dict(checkpoints.read_config(workdir))
  test_set = data.load(config.dataset, "test", config.data_dir, seed=config.seed, num_examples=1)
  setup = make_setup(config, test_set.num_classes, steps_per_epoch=1)
  state = init_state(setup, config, jnp.asarray(test_set.images[:1]))
  manager = checkpoints.Manager(workdir)
  restored = manager.restore_latest(state)
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first")
  return config, setup, restored


def _to(dtype, tree):
  return jax.tree.map(
    lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
  )


def evaluate(
  workdir: str,
  *,
  num_examples: int | None = None,
  methods=EVAL_METHODS,
  batch_size: int = 100,
  pgd_steps: int = 20,
  pgd_restarts: int = 1,
  crown_chunk_size: int | None = None,
  crown_memory_gib: float = 2.0,
  crown_examples: int | None = None,
  x64: bool = False,
  seed: int = 0,
) -> dict:
  """Evaluate the latest checkpoint in ``workdir`` at its target ε₀ (the budgets the model gives
  each test image). Returns the results dict (what ``eval.json`` holds) and, under ``"samples"``,
  the first batch's images, budgets and masks for pictures.

  Full CROWN works in chunks: ``crown_chunk_size`` (row, example) pairs per backward pass, or, by
  default, as many as fit ``crown_memory_gib``. Full CROWN (per-neuron work) runs on the first ``crown_examples`` examples only, when given;
  ``certified_examples`` says how many examples each certified error is over.

  With ``x64``, certification is repeated in float64, and examples certified in float32 but not
  in float64 are counted (``float32_only_certified``): float32 rounding can make a bound slightly
  optimistic, float64 makes it far less likely.
  """
  for m in methods:
    if m not in EVAL_METHODS:
      raise ValueError(f"unknown method {m!r}; choose from {EVAL_METHODS}")
  memory_limit = int(crown_memory_gib * 2**30)
  config, setup, state = load_run(workdir)
  test_set = data.load(
    config.dataset, "test", config.data_dir, seed=config.seed, num_examples=num_examples
  )
  classifier, budget_model = setup.classifier, setup.budget_model
  variables = {"params": state.params["classifier"]}
  if state.batch_stats is not None:
    variables["batch_stats"] = state.batch_stats
  logits_fn = lambda v, z: classifier.apply(v, z, train=False)

  @jax.jit
  def budgets_of(params, x):
    raw = None if budget_model is None else budget_model.apply({"params": params["budget"]}, x)
    return budgets_lib.budgets(setup.budget_config, config.eps, raw, x.shape)

  def lower_bounds(v, x, eps, y, method):
    return margin_lower_bounds(
      logits_fn,
      v,
      Box.from_budget(x, eps),
      margin_spec(y, setup.num_classes, x.dtype),
      method,
      crown_chunk_size=crown_chunk_size,
      crown_memory_limit=None if crown_chunk_size else memory_limit,
    )

  bound_fns = {m: jax.jit(lambda v, x, eps, y, m=m: lower_bounds(v, x, eps, y, m)) for m in methods}
  attack = jax.jit(
    lambda v, x, y, eps, key: pgd_error(
      lambda z: logits_fn(v, z), x, y, eps, steps=pgd_steps, restarts=pgd_restarts, key=key
    )
  )
  clean_wrong, pgd_wrong, eps_all, masks_all = [], [], [], []
  certified = {m: [] for m in methods}
  certified64 = {m: [] for m in methods}
  timings = {m: 0.0 for m in methods}
  done = 0
  key = jax.random.key(seed)
  samples = None
  for i, batch in enumerate(
    data.batches(test_set, batch_size, seed=0, shuffle=False, drop_remainder=False)
  ):
    x, y = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
    eps = budgets_of(state.params, x)
    logits = logits_fn(variables, x)
    clean_wrong.append(np.asarray(jnp.argmax(logits, -1) != y))
    key, sub = jax.random.split(key)
    pgd_wrong.append(np.asarray(attack(variables, x, y, eps, sub)))
    for m in methods:
      k = len(y)
      if m == "crown" and crown_examples is not None:
        k = min(k, crown_examples - done)  # full CROWN on the first crown_examples only
        if k <= 0:
          continue
      xk, epsk, yk = x[:k], eps[:k], y[:k]
      t = time.time()
      lower = bound_fns[m](variables, xk, epsk, yk)
      certified[m].append(np.asarray(jnp.all(lower > 0, axis=1)))
      timings[m] += time.time() - t
      if x64:
        with jax.enable_x64(True):
          lower64 = lower_bounds(
            _to(jnp.float64, variables), xk.astype(jnp.float64), epsk.astype(jnp.float64), yk, m
          )
          certified64[m].append(np.asarray(jnp.all(lower64 > 0, axis=1)))
    done += len(y)
    eps_all.append(np.asarray(eps))
    if "mask" in batch:
      masks_all.append(batch["mask"])
    if samples is None:
      samples = {
        "images": batch["image"],
        "eps": np.asarray(eps),
        "labels": batch["label"],
        "preds": np.asarray(jnp.argmax(logits, -1)),
        "masks": batch.get("mask"),
      }
  clean_wrong, pgd_wrong = np.concatenate(clean_wrong), np.concatenate(pgd_wrong)
  certified = {m: np.concatenate(v) for m, v in certified.items()}
  broken = np.unique(
    np.concatenate(
      [np.flatnonzero(c & pgd_wrong[: len(c)]) for c in certified.values()] or [np.zeros(0, int)]
    )
  )
  if broken.size:
    raise ConsistencyError(
      f"{broken.size} example(s) certified but broken by PGD (indices "
      f"{broken[:10].tolist()}): a bound is unsound; please report this"
    )
  eps_all = np.concatenate(eps_all)
  n = len(clean_wrong)
  stats = budgets_lib.budget_stats(
    jnp.asarray(eps_all), jnp.asarray(np.asarray(test_set.images[:n]))
  )
  results = {
    "workdir": workdir,
    "dataset": config.dataset,
    "model": config.model,
    "budget_mode": config.budget,
    "eps": config.eps,
    "num_examples": int(n),
    "clean_error": float(clean_wrong.mean()),
    "pgd_error": float(pgd_wrong.mean()),
    "certified_error": {m: float(1 - c.mean()) for m, c in certified.items()},
    "certified_examples": {m: int(len(c)) for m, c in certified.items()},
    "certify_seconds": timings,
    "budget": {
      "equivalent_eps": float(stats["equivalent_eps"]),
      "min": float(eps_all.min()),
      "max": float(eps_all.max()),
      "effective_equivalent_eps": float(stats["effective_equivalent_eps"]),
    },
    "pgd": {"steps": pgd_steps, "restarts": pgd_restarts},
  }
  if x64:
    c64 = {m: np.concatenate(v) for m, v in certified64.items()}
    results["certified_error_float64"] = {m: float(1 - c.mean()) for m, c in c64.items()}
    results["float32_only_certified"] = {m: int(np.sum(certified[m] & ~c64[m])) for m in methods}
    results["float64_only_certified"] = {m: int(np.sum(c64[m] & ~certified[m])) for m in methods}
  if masks_all:
    masks = np.concatenate(masks_all)
    results["relevance_auroc"] = metrics.mean_relevance_auroc(eps_all, masks)
    results["budget_ratio_out_in"] = metrics.budget_ratio_out_in(eps_all, masks)[1]
  results["samples"] = samples
  return results
