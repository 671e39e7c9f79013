"""Evaluation of a trained run on its test set: clean, PGD and certified error, budget statistics.

Three steps, each a function: :func:`certify` (per-example outcomes), :func:`check_consistency`
and :func:`report` (the numbers ``eval.json`` holds); :func:`evaluate` runs all three on a workdir.
Consistency is checked, not assumed: an example certified by any method must not be broken by the
attack (else a bound is unsound, and evaluation fails loudly), so clean <= PGD <= certified error.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cbudget import budgets as budgets_lib
from cbudget import data, metrics
from cbudget.attacks import ATTACKS, pgd_error, strong_attack_error
from cbudget.model import CertifiedModel, Variables
from cbudget.objective import EVAL_METHODS
from cbudget.train import Setup, TrainConfig, TrainState, config_from_dict, init_state, make_setup
from cbudget.workdir import Manager, read_config

log = logging.getLogger("cbudget.evaluate")


class ConsistencyError(AssertionError):
  """An example certified by a bound was broken by the attack: a bound is unsound."""


class Run(NamedTuple):
  config: TrainConfig
  setup: Setup
  state: TrainState


def load_run(workdir: str) -> Run:
  """The config, setup and latest checkpointed state of the run in ``workdir``."""
  config = config_from_dict(read_config(workdir))
  setup = make_setup(config, steps_per_epoch=1)
  manager = Manager(workdir)
  restored = manager.restore_latest(init_state(setup, config))
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first")
  return Run(config, setup, restored)


def load_test_set(config: TrainConfig, num_examples: int | None = None) -> data.Dataset:
  """The first ``num_examples`` test examples of the run's dataset (all: None)."""
  return data.load(
    config.dataset, "test", config.data_dir, seed=config.seed, num_examples=num_examples
  )


@dataclasses.dataclass
class Certification:
  """Per-example outcomes over a test set (arrays of length N unless said otherwise)."""

  preds: np.ndarray  # argmax of the clean logits
  pgd_wrong: np.ndarray  # clean or PGD-attacked input misclassified
  eps: np.ndarray  # the budgets, the images' shape
  certified: dict[
    str, np.ndarray
  ]  # method -> certified (full CROWN: maybe the first examples only)
  certified64: dict[str, np.ndarray]  # the same in float64 (empty without x64)
  seconds: dict[str, float]  # method -> time spent bounding


def _to(dtype, tree):
  return jax.tree.map(
    lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
  )


def certify(
  model: CertifiedModel,
  variables: Variables,
  test_set: data.Dataset,
  eps0: float,
  *,
  methods=EVAL_METHODS,
  batch_size: int = 100,
  pgd_steps: int = 20,
  pgd_restarts: int = 1,
  attack: str = "strong",
  crown_chunk_size: int | None = None,
  crown_memory_gib: float = 2.0,
  crown_examples: int | None = None,
  x64: bool = False,
  seed: int = 0,
) -> Certification:
  """Budgets at ``eps0``, the clean prediction, the PGD attack and each bound method per example.

  Full CROWN works in chunks: ``crown_chunk_size`` (row, example) pairs per backward pass, or, by
  default, as many as fit ``crown_memory_gib``; it runs on the first ``crown_examples`` examples
  only, when given. With ``x64``, certification is repeated in float64. Progress (examples done,
  rate, time left) is logged after every batch. ``attack``: ``"pgd"`` (signed PGD, margin loss) or
  ``"strong"`` (the worst case of PGD and APGD with the margin and the cross-entropy loss, each
  with ``pgd_restarts`` starts; it finds every error PGD finds with the same seed).
  """
  if attack not in ATTACKS:
    raise ValueError(f"unknown attack {attack!r}; choose one of {ATTACKS}")
  attack_error = strong_attack_error if attack == "strong" else pgd_error
  for m in methods:
    if m not in EVAL_METHODS:
      raise ValueError(f"unknown method {m!r}; choose from {EVAL_METHODS}")
  chunking = dict(
    crown_chunk_size=crown_chunk_size,
    crown_memory_limit=None if crown_chunk_size else int(crown_memory_gib * 2**30),
  )

  def lower_bounds(v, x, eps, y, method):
    return model.margin_bounds(v, model.box(x, eps), y, method, **chunking)

  budgets_of = jax.jit(lambda params, x: model.budgets(params, x, eps0))
  logits_of = jax.jit(model.logits)
  bound_fns = {m: jax.jit(lambda v, x, eps, y, m=m: lower_bounds(v, x, eps, y, m)) for m in methods}
  attack = jax.jit(
    lambda v, x, y, eps, key: attack_error(
      lambda z: model.logits(v, z), x, y, eps, steps=pgd_steps, restarts=pgd_restarts, key=key
    )
  )
  preds, pgd_wrong, eps_all = [], [], []
  certified = {m: [] for m in methods}
  certified64 = {m: [] for m in methods} if x64 else {}
  seconds = {m: 0.0 for m in methods}
  total, done, start = len(test_set.labels), 0, time.time()
  key = jax.random.key(seed)
  for batch in data.batches(test_set, batch_size, seed=0, shuffle=False, drop_remainder=False):
    x, y = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
    eps = budgets_of(variables.params, x)
    preds.append(np.asarray(jnp.argmax(logits_of(variables, x), -1)))
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
      seconds[m] += time.time() - t
      if x64:
        with jax.enable_x64(True):  # the same jitted function, traced again for float64
          lower64 = bound_fns[m](
            _to(jnp.float64, variables), xk.astype(jnp.float64), epsk.astype(jnp.float64), yk
          )
          certified64[m].append(np.asarray(jnp.all(lower64 > 0, axis=1)))
    done += len(y)
    eps_all.append(np.asarray(eps))
    elapsed = time.time() - start
    log.info(
      "evaluated %d/%d examples, %.1f examples/s, about %.0f s left",
      done,
      total,
      done / elapsed,
      elapsed / done * (total - done),
    )
  return Certification(
    np.concatenate(preds),
    np.concatenate(pgd_wrong),
    np.concatenate(eps_all),
    {m: np.concatenate(v) for m, v in certified.items()},
    {m: np.concatenate(v) for m, v in certified64.items()},
    seconds,
  )


def check_consistency(result: Certification):
  """Raise :class:`ConsistencyError` if an example certified by any method was broken by PGD."""
  broken = np.unique(
    np.concatenate(
      [np.flatnonzero(c & result.pgd_wrong[: len(c)]) for c in result.certified.values()]
      or [np.zeros(0, int)]
    )
  )
  if broken.size:
    raise ConsistencyError(
      f"{broken.size} example(s) certified but broken by PGD (indices "
      f"{broken[:10].tolist()}): a bound is unsound; please report this"
    )


def report(
  config: TrainConfig, result: Certification, test_set: data.Dataset, workdir: str | None = None
) -> dict:
  """The numbers of an evaluation (what ``eval.json`` holds): errors, budgets, relevance."""
  n = len(result.preds)
  stats = budgets_lib.budget_stats(jnp.asarray(result.eps), jnp.asarray(test_set.images[:n]))
  certified = result.certified
  results = {
    "workdir": workdir,
    "dataset": config.dataset,
    "model": config.model,
    "budget_mode": config.budget,
    "eps": config.eps,
    "num_examples": int(n),
    "clean_error": float(np.mean(result.preds != test_set.labels[:n])),
    "pgd_error": float(result.pgd_wrong.mean()),
    "certified_error": {m: float(1 - c.mean()) for m, c in certified.items()},
    "certified_examples": {m: int(len(c)) for m, c in certified.items()},
    "certify_seconds": result.seconds,
    "budget": {
      "equivalent_eps": float(stats["equivalent_eps"]),
      "min": float(result.eps.min()),
      "max": float(result.eps.max()),
      "effective_equivalent_eps": float(stats["effective_equivalent_eps"]),
    },
  }
  if result.certified64:
    c64 = result.certified64
    results["certified_error_float64"] = {m: float(1 - c.mean()) for m, c in c64.items()}
    results["float32_only_certified"] = {m: int(np.sum(certified[m] & ~c64[m])) for m in c64}
    results["float64_only_certified"] = {m: int(np.sum(c64[m] & ~certified[m])) for m in c64}
  if test_set.masks is not None:
    masks = test_set.masks[:n]
    results["relevance_auroc"] = metrics.mean_relevance_auroc(result.eps, masks)
    results["budget_ratio_out_in"] = metrics.budget_ratio_out_in(result.eps, masks)[1]
  return results


def evaluate(
  workdir: str,
  *,
  num_examples: int | None = None,
  plot: str | None = None,
  pgd_steps: int = 20,
  pgd_restarts: int = 1,
  attack: str = "strong",
  **certify_options,
) -> dict:
  """Evaluate the latest checkpoint in ``workdir`` at its target ε₀ (the budgets the model gives
  each test image) on the first ``num_examples`` test examples; return :func:`report`'s numbers.

  ``certify_options`` go to :func:`certify` (methods, batch size, full CROWN's memory, x64).
  ``plot``: a PNG path for the first test images next to their budgets.
  """
  run = load_run(workdir)
  test_set = load_test_set(run.config, num_examples)
  model, variables = run.setup.model, run.state.variables
  result = certify(
    model,
    variables,
    test_set,
    run.config.eps,
    pgd_steps=pgd_steps,
    pgd_restarts=pgd_restarts,
    attack=attack,
    **certify_options,
  )
  check_consistency(result)
  results = report(run.config, result, test_set, workdir)
  results["pgd"] = {"steps": pgd_steps, "restarts": pgd_restarts, "attack": attack}
  if plot is not None:
    from cbudget import plots

    shown = 8
    plots.plot_budget_grid(
      test_set.images[:shown],
      result.eps[:shown],
      plot,
      masks=None if test_set.masks is None else test_set.masks[:shown],
      labels=test_set.labels[:shown],
      preds=result.preds[:shown],
      title=f"{run.config.budget} budgets, ε₀ = {run.config.eps:.3g}",
    )
  return results
