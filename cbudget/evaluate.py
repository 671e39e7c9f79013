"""Evaluation of a trained run on its test set: clean, PGD and certified error, budget statistics.

Three steps, each a function: :func:`certify` (per-example outcomes), :func:`check_consistency`
and :func:`report` (the numbers ``eval.json`` holds); :func:`evaluate` runs all three on a workdir.
Consistency is checked, not assumed: an example certified by any method must not be broken by the
attack (else a bound is unsound, and evaluation fails loudly), so clean <= PGD <= certified error.

A **threat** says which budgets a model is certified under (:func:`threat_budgets`): ``own`` (the
budgets the model gives each image at its target ε₀), ``uniform:E`` (ε = E everywhere) or
``budgets:WORKDIR`` (the budgets another run's model gives the same images at its target ε₀), so
models can be compared on one threat set.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cbudget import budgets as budgets_lib
from cbudget import certify as certify_boxes
from cbudget import data, metrics
from cbudget.attacks import ATTACKS, pgd_error, strong_attack_error
from cbudget.model import CertifiedModel, Variables
from cbudget.objective import DEFAULT_EVAL_METHODS, EVAL_METHODS
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
  # Evaluation bounds each batch whole: its batches are large, and blocks are traced one by one
  # (compilation grows with their number); --bound_block is a training setting.
  setup = dataclasses.replace(setup, model=dataclasses.replace(setup.model, bound_block=None))
  manager = Manager(workdir)
  restored = manager.restore_latest(init_state(setup, config))
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first")
  return Run(config, setup, restored)


THREAT_FORMS = ("own", "uniform:E", "budgets:WORKDIR")
# Memory for one full-CROWN backward pass. Small passes are faster, not only leaner: the rows of a
# layer are padded to a whole number of passes (a 2 GiB pass bounded all 200 rows of DM-small's
# dense layer where an example needed 26 at most), and a pass's coefficients stay in cache. On the
# same weights and images, cnn_small certified 15-18 images/s at 2 GiB and 62-68 at 0.25 GiB, DM-small
# 10 and 14-16 (bench/README.md).
DEFAULT_CROWN_MEMORY_GIB = 0.25


@dataclasses.dataclass(frozen=True)
class Threat:
  """Budgets to certify under: ``budgets(x) -> eps`` (jitted), and the spec it came from."""

  spec: str
  budgets: Callable
  eps0: float  # the ε₀ whose volume the budgets have (E for uniform:E)


def threat_budgets(spec: str, run: Run) -> Threat:
  """The :class:`Threat` named by ``spec`` (one of :data:`THREAT_FORMS`) for certifying ``run``."""
  kind, _, arg = spec.partition(":")
  if kind == "own" and not arg:
    model, params, eps0 = run.setup.model, run.state.variables.params, run.config.eps
  elif kind == "uniform" and arg:
    try:
      eps0 = float(arg)
    except ValueError:
      raise ValueError(f"--threat={spec!r}: E in uniform:E must be a number") from None
    if not 0 < eps0 <= budgets_lib.DOMAIN_WIDTH:
      raise ValueError(f"--threat={spec!r}: E must be in (0, {budgets_lib.DOMAIN_WIDTH}]")
    return Threat(spec, jax.jit(lambda x: jnp.full_like(x, eps0)), eps0)
  elif kind == "budgets" and arg:
    other = load_run(arg)
    if data.info(other.config.dataset).shape != data.info(run.config.dataset).shape:
      raise ValueError(
        f"--threat={spec!r}: that run's dataset {other.config.dataset!r} has another input "
        f"shape than {run.config.dataset!r}"
      )
    model, params, eps0 = other.setup.model, other.state.variables.params, other.config.eps
  else:
    raise ValueError(f"--threat={spec!r} is not one of {', '.join(THREAT_FORMS)}")
  return Threat(spec, jax.jit(lambda x: model.budgets(params, x, eps0)), eps0)


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
  methods=DEFAULT_EVAL_METHODS,
  batch_size: int = 100,
  pgd_steps: int = 20,
  pgd_restarts: int = 1,
  attack: str = "strong",
  crown_chunk_size: int | None = None,
  crown_memory_gib: float | None = None,
  crown_examples: int | None = None,
  x64: bool = False,
  seed: int = 0,
  threat: Threat | None = None,
) -> Certification:
  """Budgets at ``eps0``, the clean prediction, the PGD attack and each bound method per example.

  With ``threat``, its budgets replace the model's own (``eps0`` is then unused).

  Full CROWN works in chunks: ``crown_chunk_size`` (row, example) pairs per backward pass, or, by
  default, as many as fit ``crown_memory_gib`` (:data:`DEFAULT_CROWN_MEMORY_GIB` if None); it runs on the first ``crown_examples`` examples
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
  if crown_memory_gib is None:
    crown_memory_gib = DEFAULT_CROWN_MEMORY_GIB
  chunking = dict(
    crown_chunk_size=crown_chunk_size,
    crown_memory_limit=None if crown_chunk_size else int(crown_memory_gib * 2**30),
  )

  def lower_bounds(v, x, eps, y, method):
    return model.margin_bounds(v, model.box(x, eps), y, method, **chunking)

  if threat is None:
    budgets_of = jax.jit(lambda params, x: model.budgets(params, x, eps0))
  else:
    budgets_of = lambda params, x: threat.budgets(x)
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
      if m in ("crown", "alpha-crown") and crown_examples is not None:
        k = min(k, crown_examples - done)  # the per-neuron methods on the first examples only
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


def common_errors(result: Certification, labels: np.ndarray) -> dict:
  """Every error on the same examples: the first ones that every method certified.

  Full CROWN may run on fewer examples than the other methods (``crown_examples``); comparing
  columns over different subsets can make a certified error fall below the clean error. Here clean,
  PGD and each method's certified error, and ``best`` (an example counts as certified if any
  method certified it: the per-example best over methods), share one example set.
  """
  m = min([len(result.preds)] + [len(c) for c in result.certified.values()])
  certified = {k: c[:m] for k, c in result.certified.items()}
  any_certified = np.any(np.stack(list(certified.values())), axis=0) if certified else None
  return {
    "num_examples": int(m),
    "clean_error": float(np.mean(result.preds[:m] != labels[:m])),
    "pgd_error": float(result.pgd_wrong[:m].mean()),
    "certified_error": {k: float(1 - c.mean()) for k, c in certified.items()},
    "certified_error_best": None if any_certified is None else float(1 - any_certified.mean()),
  }


def report(
  config: TrainConfig,
  result: Certification,
  test_set: data.Dataset,
  workdir: str | None = None,
  threat: Threat | None = None,
) -> dict:
  """The numbers of an evaluation (what ``eval.json`` holds): errors, budgets, relevance.

  ``common`` holds every error on one example set (:func:`common_errors`): tables use it.
  """
  n = len(result.preds)
  images = jnp.asarray(test_set.images[:n])
  stats = budgets_lib.budget_stats(jnp.asarray(result.eps), images)
  eps0 = config.eps if threat is None else threat.eps0
  uniform_stats = budgets_lib.budget_stats(jnp.full(images.shape, eps0, images.dtype), images)
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
    "common": common_errors(result, test_set.labels),
    "certify_seconds": result.seconds,
    "threat": "own" if threat is None else threat.spec,
    "volume": config.volume,
    "squash": config.squash,
    "budget": {
      "equivalent_eps": float(stats["equivalent_eps"]),
      "min": float(result.eps.min()),
      "max": float(result.eps.max()),
      "effective_equivalent_eps": float(stats["effective_equivalent_eps"]),
      # a uniform eps0 on the same images, for comparison (it is clipped too)
      "uniform_effective_equivalent_eps": float(uniform_stats["effective_equivalent_eps"]),
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
    results["context_auroc"] = metrics.mean_context_auroc(result.eps, masks, test_set.images[:n])
    results["budget_ratio_out_in"] = metrics.budget_ratio_out_in(result.eps, masks)[1]
    rule = metrics.best_intensity_rule(test_set.images[:n], masks)
    results["intensity_rule_auroc"] = rule.auroc  # the dataset's leak test: ~0.5 is no leak
    results["intensity_rule"] = rule.description
  return results


def evaluate(
  workdir: str,
  *,
  num_examples: int | None = None,
  plot: str | None = None,
  pgd_steps: int = 20,
  pgd_restarts: int = 1,
  attack: str = "strong",
  threat: str = "own",
  certified_box_examples: int = 0,
  **certify_options,
) -> dict:
  """Evaluate the latest checkpoint in ``workdir`` under ``threat`` (default ``own``: the budgets
  the model gives each test image at its target ε₀; see :func:`threat_budgets`) on the first
  ``num_examples`` test examples; return :func:`report`'s numbers.

  ``certify_options`` go to :func:`certify` (methods, batch size, full CROWN's memory, x64).
  ``plot``: a PNG path for the first test images next to their budgets.
  ``certified_box_examples``: on that many first test examples, also the largest box full CROWN
  certifies (:func:`cbudget.certify.largest_certified_box`); ``certified_box`` holds the medians,
  e.g. ``median_ratio`` of its equivalent ε to the certified uniform ε.
  """
  run = load_run(workdir)
  test_set = load_test_set(run.config, num_examples)
  model, variables = run.setup.model, run.state.variables
  threat_ = None if threat == "own" else threat_budgets(threat, run)
  result = certify(
    model,
    variables,
    test_set,
    run.config.eps,
    pgd_steps=pgd_steps,
    pgd_restarts=pgd_restarts,
    attack=attack,
    threat=threat_,
    **certify_options,
  )
  check_consistency(result)
  results = report(run.config, result, test_set, workdir, threat_)
  results["pgd"] = {"steps": pgd_steps, "restarts": pgd_restarts, "attack": attack}
  if certified_box_examples:
    k = certified_box_examples
    x, y = jnp.asarray(test_set.images[:k]), jnp.asarray(test_set.labels[:k])
    memory_gib = certify_options.get("crown_memory_gib") or DEFAULT_CROWN_MEMORY_GIB
    memory = int(memory_gib * 2**30)
    boxes = certify_boxes.largest_certified_box(
      lambda v, z: model.logits(v, z), variables, x, y, method_options={"memory_limit": memory}
    )
    summary = certify_boxes.summary(boxes, result.eps[:k])
    summary.pop("per_example")
    results["certified_box"] = {"method": "crown", **summary}
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
      title=f"{run.config.budget} budgets, ε₀ = {run.config.eps:.3g}"
      + ("" if threat == "own" else f", threat {threat}"),
    )
  return results
