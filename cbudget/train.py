"""Certified training with learned budgets: one jit-compiled step, and the loop around it.

``train(config)`` is what ``python -m launch.train`` calls. It resumes from the last complete
checkpoint in ``config.workdir`` when there is one, so running the same command again continues.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbudget import budgets as budgets_lib
from cbudget import data, methods, schedules, workdir
from cbudget.model import CertifiedModel, Variables
from cbudget.models import classifiers
from cbudget.objective import Losses, clean_cross_entropy

log = logging.getLogger("cbudget.train")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a run. Saved as ``config.json`` in the workdir."""

  workdir: str
  dataset: str = data.DEFAULT_DATASET
  data_dir: str | None = None
  model: str = "dm_small"
  generator: str = "coarse"
  budget: str = "contextual"
  per_pixel: bool = True
  eps: float = 0.2
  budget_range: tuple[float, float] = (0.25, 4.0)
  volume: str = "nominal"  # or "effective": the clipped boxes' log-volume (cbudget.budgets)
  squash: str = "clip"  # or "sigmoid": saturated budgets keep a gradient (cbudget.budgets)
  method: str = "ibp"
  epochs: int = 20
  steps: int | None = None  # overrides epochs when set
  batch_size: int = 64
  seed: int = 0
  lr: float = 1e-3
  generator_lr: float = 1e-3
  grad_clip: float = 10.0
  warmup_fraction: float = 0.1  # clean training (ε₀ = 0) for this share of the steps
  ramp_fraction: float = 0.5  # then ε₀ grows to the target over this share
  eps_schedule: str = "smooth"
  kappa_end: float = 0.0  # loss = κ·clean + (1−κ)·robust, κ goes 1 → kappa_end
  augment: bool | None = None  # default: on for CIFAR-like data
  num_train_examples: int | None = None
  log_every: int = 50
  checkpoint_every: int = 200
  skip_nonfinite: bool = False
  # Methods (cbudget/methods.py) and their settings.
  sabr_lambda: float = 0.4
  mtl_alpha: float = 0.5
  train_attack_steps: int = 8
  init: str = "default"  # "fast": Shi et al.'s IBP initialisation; "torch": PyTorch's default
  fast_reg: float = 0.0  # weight of Shi et al.'s warm-up regularisers
  # Schedule details.
  lr_decay: str = "0.75,0.9"  # fractions of training where the LR drops, "" or "none": none
  lr_decay_factor: float = 0.1
  train_eps_factor: float = 1.0  # train at ε₀·factor, evaluate at ε₀
  precise_bn: bool = False  # recompute BatchNorm's statistics on clean data after each epoch
  precise_bn_batches: int = 20
  beta_schedule: str = "linear"  # CROWN-IBP's β: "linear" 1 → 0 over the ramp, or "eps" 1 − ε/ε_max
  # CROWN-IBP: bound the robust cross-entropy directly, one backward row per example (Xu et al.
  # 2020) instead of one per margin; see cbudget.objective.fused_robust_cross_entropy.
  loss_fusion: bool = False
  # CROWN-IBP bounds on blocks of this many examples (the same bounds; faster on a CPU, whose
  # memory bandwidth limits the backward pass): 0 the whole batch, -1 (auto) see bound_block().
  bound_block: int = -1

  # Fields that must match to resume from a workdir.
  IDENTITY = (
    "dataset",
    "model",
    "generator",
    "budget",
    "per_pixel",
    "eps",
    "budget_range",
    "volume",
    "squash",
    "method",
    "batch_size",
    "seed",
  )


def config_from_dict(values: dict) -> TrainConfig:
  """A :class:`TrainConfig` from ``config.json`` (lists back to tuples, unknown keys rejected)."""
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  unknown = set(values) - fields
  if unknown:
    raise ValueError(f"config.json has unknown fields {sorted(unknown)}")
  values = dict(values)
  if values.get("budget_range") is not None:
    values["budget_range"] = tuple(values["budget_range"])
  return TrainConfig(**values)


def config_defaults() -> dict:
  """Every :class:`TrainConfig` field's default: what a ``config.json`` written before the field
  existed means by its absence."""
  return {
    f.name: f.default
    for f in dataclasses.fields(TrainConfig)
    if f.default is not dataclasses.MISSING
  }


def validate(config: TrainConfig):
  if config.dataset not in data.DATASETS:
    raise ValueError(f"--dataset={config.dataset!r} is unknown; choose one of {data.DATASETS}")
  if config.model not in classifiers.CLASSIFIERS:
    raise ValueError(
      f"--model={config.model!r} is unknown; choose one of {classifiers.CLASSIFIERS}"
    )
  methods.get(config.method)
  method_options(config)
  lr_milestones(config.lr_decay)
  if config.init not in INITS:
    raise ValueError(f"--init={config.init!r} is unknown; choose one of {INITS}")
  if config.beta_schedule not in BETA_SCHEDULES:
    raise ValueError(
      f"--beta_schedule={config.beta_schedule!r} is unknown; choose one of {BETA_SCHEDULES}"
    )
  if not config.train_eps_factor >= 1:
    raise ValueError(f"--train_eps_factor must be >= 1, got {config.train_eps_factor}")
  if not config.eps > 0:
    raise ValueError(f"--eps must be > 0 (the target ε₀), got {config.eps}")
  if config.eps > budgets_lib.DOMAIN_WIDTH:
    raise ValueError(
      f"--eps must be <= {budgets_lib.DOMAIN_WIDTH} (pixels lie in [0, 1]), got {config.eps}"
    )
  budgets_lib.make_budget_config(
    config.budget, config.budget_range, config.per_pixel, config.volume, config.squash
  )
  bound_block(config.bound_block, config.batch_size)  # raises on a bad --bound_block


INITS = ("default", "fast", "torch")
BETA_SCHEDULES = ("linear", "eps")


def lr_milestones(spec: str) -> tuple[float, ...]:
  """``"0.75,0.9"`` -> ``(0.75, 0.9)``: the shares of training where the learning rate drops."""
  if spec.strip().lower() in ("", "none"):
    return ()
  try:
    values = tuple(float(v) for v in spec.split(","))
  except ValueError:
    values = ()
  if not values or any(not 0 < v < 1 for v in values) or list(values) != sorted(values):
    raise ValueError(
      f"--lr_decay={spec!r} must be increasing fractions in (0, 1), e.g. '0.75,0.9', or 'none'"
    )
  return values


def method_options(config: TrainConfig) -> methods.MethodOptions:
  return methods.MethodOptions(
    sabr_lambda=config.sabr_lambda,
    mtl_alpha=config.mtl_alpha,
    attack_steps=config.train_attack_steps,
    fast_reg=config.fast_reg,
    eps_max=config.eps * config.train_eps_factor,
    loss_fusion=config.loss_fusion,
  )


class TrainState(NamedTuple):
  step: jax.Array
  variables: Variables
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Setup:
  """The parts of a run that follow from its config (model, optimiser, schedules, sizes)."""

  model: CertifiedModel
  optimizer: optax.GradientTransformation
  steps_per_epoch: int
  total_steps: int
  eps0: Any
  kappa: Any
  beta: Any


# Examples per block of the CROWN-IBP bounds in training on a CPU by default (python -m
# bench.train_step --bound_blocks: at batch 128, DM-small's and cnn_small's CROWN-IBP steps in blocks
# of 16 are 1.3-1.5x faster than in one; blocks of 8 compile for twice as long). Batches up to twice
# that are bounded whole: their rows already fit in cache, and blocks would only add compilation.
CPU_BOUND_BLOCK = 16


def bound_block(setting: int, batch_size: int) -> int | None:
  """Examples per block of the training's CROWN-IBP bounds for ``--bound_block``: a positive
  ``setting`` as it is, 0 the whole batch (None), -1 (auto) :data:`CPU_BOUND_BLOCK` on one CPU
  device for batches larger than twice that, else the whole batch (an accelerator wants large
  batches, and blocks would cut across the shards of a batch split over devices)."""
  if setting < -1:
    raise ValueError(
      f"--bound_block must be a positive block size, 0 (none) or -1 (auto), got {setting}"
    )
  if setting == -1:
    on_one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    return CPU_BOUND_BLOCK if on_one_cpu and batch_size > 2 * CPU_BOUND_BLOCK else None
  return setting or None


def make_model(config: TrainConfig) -> CertifiedModel:
  return CertifiedModel.create(
    dataset=config.dataset,
    classifier=config.model,
    budget=config.budget,
    generator=config.generator,
    per_pixel=config.per_pixel,
    budget_range=config.budget_range,
    volume=config.volume,
    squash=config.squash,
    bound_block=bound_block(config.bound_block, config.batch_size),
  )


def make_setup(config: TrainConfig, steps_per_epoch: int) -> Setup:
  """Model, optimiser and schedules of a run (``steps_per_epoch`` sizes the schedules)."""
  total = config.steps if config.steps is not None else config.epochs * steps_per_epoch
  warmup = int(config.warmup_fraction * total)
  ramp = schedules.ramp(warmup, int(config.ramp_fraction * total), config.eps_schedule)
  linear = schedules.ramp(warmup, int(config.ramp_fraction * total), "linear")

  drops = {}
  for share in lr_milestones(config.lr_decay):  # two shares may land on one step: factors multiply
    drops[int(share * total)] = drops.get(int(share * total), 1.0) * config.lr_decay_factor

  def lr_schedule(base):
    return optax.piecewise_constant_schedule(base, drops)

  def opt(lr):
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(lr_schedule(lr)))

  optimizer = optax.multi_transform(
    {"classifier": opt(config.lr), "budget": opt(config.generator_lr)},
    lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()},
  )
  eps_max = config.eps * config.train_eps_factor
  if config.beta_schedule == "eps":  # auto_LiRPA: β = 1 − ε₀/ε_max, tied to the ε ramp
    beta = schedules.interpolate(ramp, 1.0, 0.0)
  else:
    beta = schedules.interpolate(linear, 1.0, 0.0)
  return Setup(
    make_model(config),
    optimizer,
    steps_per_epoch,
    total,
    eps0=schedules.interpolate(ramp, 0.0, eps_max),
    kappa=schedules.interpolate(linear, 1.0, config.kappa_end),
    beta=beta,
  )


def init_state(setup: Setup, config: TrainConfig, example=None) -> TrainState:
  """The state at step 0; ``example`` (default: the dataset's image shape) sizes the model."""
  if example is None:
    example = jnp.zeros((1,) + data.info(config.dataset).shape, jnp.float32)
  variables = setup.model.init(jax.random.key(config.seed), example)
  if config.init != "default":
    init = {"fast": methods.fast_init, "torch": methods.torch_init}[config.init]
    classifier = init(variables.params["classifier"], jax.random.key(config.seed + 1))
    variables = variables._replace(params={**variables.params, "classifier": classifier})
  return TrainState(jnp.asarray(0, jnp.int32), variables, setup.optimizer.init(variables.params))


# Phases of a run: what a step computes (see :func:`phase_per_step`).
PHASES = ("clean", "ibp", "full")


def phase_per_step(setup: Setup, config: TrainConfig) -> np.ndarray:
  """The phase of every step ``0 .. total_steps - 1`` (indices into :data:`PHASES`), read off the
  schedules on the host.

  * ``"clean"``: ε₀ = 0 and κ = 1 (the warm-up), so the objective is the clean cross-entropy alone;
    no budgets, bounds or attacks are computed. This holds for every method, whose loss is
    ``κ·clean + (1 − κ)·robust`` (:mod:`cbudget.methods`), unless the warm-up regularisers are on.
  * ``"ibp"``: CROWN-IBP with β = 0: the mix ``β·CROWN-IBP + (1 − β)·IBP`` is IBP alone, so the
    CROWN-IBP backward pass is skipped.
  * ``"full"``: the whole objective of ``config.method``.

  The schedules are monotone ramps, so each phase is a contiguous range of steps; the step chosen
  by the host for step ``s`` computes the same loss as the full step at ``s`` (to rounding).
  """
  steps = jnp.arange(setup.total_steps)
  eps0 = np.asarray(setup.eps0(steps))
  kappa = np.asarray(setup.kappa(steps))
  beta = np.asarray(setup.beta(steps))
  phase = np.full(setup.total_steps, PHASES.index("full"), np.int8)
  if config.method == "crown-ibp":
    phase[beta == 0] = PHASES.index("ibp")
  if config.fast_reg == 0:  # the warm-up regularisers act while eps0 = 0: no clean phase then
    phase[(eps0 == 0) & (kappa == 1)] = PHASES.index("clean")
  return phase


def phase_ranges(phases: np.ndarray) -> list[tuple[str, int, int]]:
  """``(phase, first step, end step)`` of each contiguous run of one phase."""
  starts = [0] + [i for i in range(1, len(phases)) if phases[i] != phases[i - 1]]
  ends = starts[1:] + [len(phases)]
  return [(PHASES[phases[a]], a, b) for a, b in zip(starts, ends)]


def make_loss_fn(setup: Setup, config: TrainConfig, phase: str = "full"):
  """``loss_fn(params, batch_stats, image, label, step) -> (loss, (batch_stats, metrics))``.

  ``phase`` (see :func:`phase_per_step`) must be the phase of ``step``: the clean and IBP phases
  compute only what the schedules leave of the objective. In the clean phase ``robust_loss`` and
  ``certified_error`` are NaN (no bound is computed, so nothing is certified), and the budgets are
  zero (ε₀ = 0 makes them zero), so their statistics are too.
  """
  if phase not in PHASES:
    raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
  method = "ibp" if phase == "ibp" else config.method
  options = method_options(config)
  attack_key = jax.random.key(config.seed + 2)

  def loss_fn(params, batch_stats, image, label, step):
    eps0, kappa, beta = setup.eps0(step), setup.kappa(step), setup.beta(step)
    variables = Variables(params, batch_stats)
    if phase == "clean":
      clean_logits, _, new_stats = setup.model.training_logits(variables, image)
      clean = clean_cross_entropy(clean_logits, label)
      nan = jnp.full((), jnp.nan, clean.dtype)
      losses = Losses(clean, clean, nan)
      eps, certified_error = jnp.zeros_like(image), nan
    else:
      out = methods.get(method)(
        setup.model,
        variables,
        image,
        label,
        eps0=eps0,
        kappa=kappa,
        beta=beta,
        key=jax.random.fold_in(attack_key, step),  # a function of the step: resumes exactly
        options=options,
      )
      losses, clean_logits, new_stats, eps = out.losses, out.clean_logits, out.batch_stats, out.eps
      certified_error = jnp.mean(jnp.any(out.margin_lower <= 0, axis=1))
    stats = budgets_lib.budget_stats(eps, image)
    metrics = {
      "loss": losses.loss,
      "clean_loss": losses.clean,
      "robust_loss": losses.robust,
      "clean_error": jnp.mean(jnp.argmax(clean_logits, -1) != label),
      "certified_error": certified_error,
      "eps0": eps0,
      "kappa": kappa,
      "beta": beta,
      "equivalent_eps": stats["equivalent_eps"],
      "eps_min": stats["min"],
      "eps_max": stats["max"],
    }
    return losses.loss, (new_stats, metrics)

  return loss_fn


def make_train_step(setup: Setup, config: TrainConfig, phase: str = "full"):
  """The jit-compiled step of one phase: ``(state, image, label) -> (state, metrics)``.

  The default, ``"full"``, is right at every step; :func:`train` uses the cheaper step of each
  step's phase (:func:`phase_per_step`), one compilation per phase.
  """
  loss_fn = make_loss_fn(setup, config, phase)

  @jax.jit
  def step_fn(state: TrainState, image, label):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    params, batch_stats = state.variables
    (loss, (new_stats, metrics)), grads = grad_fn(params, batch_stats, image, label, state.step)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # A non-finite step never reaches the state: the caller stops (or skips) on `finite`.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
      state.step + 1,
      keep(Variables(new_params, new_stats), state.variables),
      keep(opt_state, state.opt_state),
    )
    metrics = {**metrics, "grad_norm": grad_norm, "finite": finite}
    return new_state, metrics

  return step_fn


def data_parallel(devices=None):
  """``(put_batch, put_replicated)`` placing data on a 1-d mesh over ``devices`` (default: all).

  The batch is sharded along its first axis and everything else is replicated, so the jitted step
  runs data-parallel: XLA inserts the gradient all-reduce (GSPMD), no custom communication. Each
  host passes the same global batch (the pipeline is deterministic); it contributes the slices of
  its own devices, which works on one host and across hosts after ``jax.distributed.initialize``.
  """
  devices = jax.devices() if devices is None else devices
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def put(value, sharding):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  def put_batch(array):
    if array.shape[0] % len(devices):
      raise ValueError(
        f"--batch_size={array.shape[0]} must be divisible by the number of devices "
        f"({len(devices)}) for data-parallel training"
      )
    return put(array, batch_sharding)

  def put_replicated(tree):
    return jax.tree.map(lambda a: put(a, replicated), tree)

  return put_batch, put_replicated


class NonFiniteError(FloatingPointError):
  """Training produced a NaN/Inf loss or gradient."""


def _augment(config: TrainConfig) -> bool:
  if config.augment is not None:
    return config.augment
  return data.info(config.dataset).base == "cifar10"  # crops and flips suit CIFAR-like images


def _with_precise_bn(state, setup, train_set, config, epoch, put_replicated):
  """The state with BatchNorm's statistics recomputed on ``precise_bn_batches`` clean batches."""
  if state.variables.batch_stats is None:
    return state
  batches = data.batches(train_set, config.batch_size, seed=config.seed + 1, epoch=epoch)
  images = (b["image"] for _, b in zip(range(config.precise_bn_batches), batches))
  variables = setup.model.precise_batch_stats(state.variables, images)
  return state._replace(variables=put_replicated(variables))


def train(config: TrainConfig, *, until_step: int | None = None) -> dict:
  """Train (or resume) and return the final metrics. Writes to ``config.workdir``:

  ``config.json``, ``checkpoints/`` (orbax, atomic), ``metrics.jsonl`` (one JSON object per logged
  step, with ``step``), and TensorBoard summaries in ``tb/``.

  ``until_step`` stops early, with a checkpoint, as an interruption would (for time-limited jobs);
  the schedules still follow the full run, so the same call without it resumes exactly.
  """
  validate(config)
  os.makedirs(config.workdir, exist_ok=True)
  workdir.check_or_write_config(
    config.workdir, dataclasses.asdict(config), TrainConfig.IDENTITY, config_defaults()
  )
  train_set = data.load(
    config.dataset,
    "train",
    config.data_dir,
    seed=config.seed,
    num_examples=config.num_train_examples,
  )
  if config.batch_size > len(train_set.labels):
    raise ValueError(
      f"--batch_size={config.batch_size} is larger than the training set "
      f"({len(train_set.labels)} examples); use a smaller batch"
    )
  setup = make_setup(config, data.num_batches(train_set, config.batch_size))
  state = init_state(setup, config)
  manager = workdir.Manager(config.workdir)
  restored = manager.restore_latest(state)
  start = 0
  if restored is not None:
    state = restored
    start = int(state.step)
    log.info("resumed from step %d (checkpoint in %s)", start, manager.directory)
  put_batch, put_replicated = data_parallel()
  state = put_replicated(state)
  log.info(
    "training on %d device(s) (%s), %d process(es); %d steps of batch %d",
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_count(),
    setup.total_steps,
    config.batch_size,
  )
  metrics_log = workdir.MetricsLog(config.workdir, resume_step=start)
  if restored is not None:
    metrics_log.write({"step": start, "event": "resumed"})
  phases = phase_per_step(setup, config)
  for name, first, stop in phase_ranges(phases):
    log.info("phase %s: steps [%d, %d)", name, first, stop)
  step_fns = {}  # phase -> its compiled step, built when first needed

  def step_fn(state, image, label, step):
    name = PHASES[phases[step]]
    if name not in step_fns:
      step_fns[name] = make_train_step(setup, config, name)
    return step_fns[name](state, image, label)

  stop = {"signal": None}

  def on_signal(signum, frame):
    stop["signal"] = signum

  # Signal handlers can only be installed from the main thread (else train() runs without them).
  in_main = threading.current_thread() is threading.main_thread()
  previous = (
    {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
  )
  end = setup.total_steps if until_step is None else min(until_step, setup.total_steps)
  last, t0, t_epoch = {}, time.time(), time.time()
  try:
    step = start
    while step < end and stop["signal"] is None:
      epoch, first = divmod(step, setup.steps_per_epoch)
      for batch in data.batches(
        train_set,
        config.batch_size,
        seed=config.seed,
        epoch=epoch,
        augment=_augment(config),
        start_batch=first,
      ):
        state, metrics = step_fn(state, put_batch(batch["image"]), put_batch(batch["label"]), step)
        step += 1
        if not bool(metrics["finite"]):
          msg = (
            f"non-finite loss or gradient at step {step} (ε₀={float(metrics['eps0']):.4g}, "
            f"loss={float(metrics['loss'])}, grad norm={float(metrics['grad_norm'])}); likely "
            "causes: a learning rate too high, or a budget range too wide for the model. The "
            "last good checkpoint is kept."
          )
          if not config.skip_nonfinite:
            raise NonFiniteError(msg)
          log.warning("%s Skipping the step (--skip_nonfinite).", msg)
        if config.precise_bn and step % setup.steps_per_epoch == 0:  # before any checkpoint
          state = _with_precise_bn(state, setup, train_set, config, epoch, put_replicated)
        if step % config.log_every == 0 or step == setup.total_steps:
          last = {k: float(v) for k, v in metrics.items()}
          last.update(step=step, epoch=epoch, seconds=time.time() - t0)
          last["phase"] = PHASES[phases[step - 1]]
          metrics_log.write(last)
          log.info(
            "step %d/%d  loss %.4f  clean err %.3f  cert err %.3f  eps0 %.4f  "
            "equiv eps %.4f  [%.3f, %.3f]",
            step,
            setup.total_steps,
            last["loss"],
            last["clean_error"],
            last["certified_error"],
            last["eps0"],
            last["equivalent_eps"],
            last["eps_min"],
            last["eps_max"],
          )
        if step % config.checkpoint_every == 0 or step == end:
          manager.save(step, state)
        if step >= end or stop["signal"] is not None:
          break
      if step % setup.steps_per_epoch == 0:
        log.info("epoch %d done in %.1f s", epoch + 1, time.time() - t_epoch)
        t_epoch = time.time()
    if stop["signal"] is not None:
      log.warning("signal %d received: checkpointing at step %d and exiting", stop["signal"], step)
      manager.save(step, state)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    manager.close()
    metrics_log.close()
  return {**last, "step": int(state.step), "interrupted": stop["signal"] is not None}
