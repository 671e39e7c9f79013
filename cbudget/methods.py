"""Certified training methods over :class:`cbudget.model.CertifiedModel`'s pieces, by name.

Every method is a function ``loss(model, variables, x, labels, *, eps0, kappa, beta, key, options)
-> LossOutput``: budgets for ``x`` (volume of a uniform ``eps0``), the non-uniform box
``[x - ε(x), x + ε(x)] ∩ [0, 1]``, bounds, and ``kappa * clean + (1 - kappa) * robust``. Training
relies on that form: while ε₀ = 0 and κ = 1 its step computes the clean loss alone
(:func:`cbudget.train.phase_per_step`), so a new method must keep it.

* ``ibp``, ``crown-ibp``: the robust cross-entropy of IBP (Gowal et al. 2018) or CROWN-IBP bounds
  (Zhang et al. 2020) over the full box.
* ``sabr`` (Müller et al. 2023): IBP through a small box of radius ``λ·ε(x)`` centred on a PGD
  point of the full box and kept inside it. Its ``margin_lower`` bounds the small box only, so the
  ``certified_error`` a training log shows for SABR is not a certificate of the full box.
* ``mtl-ibp`` (De Palma et al. 2024): ``α·IBP robust loss + (1 − α)·adversarial cross-entropy``,
  the attack inside the full box.

With ``options.fast_reg > 0`` every method adds Shi et al.'s (2021) warm-up regularisers (bound
tightness and ReLU balance, :func:`fast_regularizer`), weighted by ``fast_reg·(1 − ε₀/ε_max)``.
:func:`fast_init` is their initialisation. Attacks run with the classifier's statistics of the
batch frozen (as the bounds do) and their points carry no gradient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cbudget.attacks import pgd_attack
from cbudget.bounds import Box, ibp
from cbudget.model import CertifiedModel, LossOutput, Variables
from cbudget.objective import Losses, certified_loss, robust_cross_entropy


@dataclasses.dataclass(frozen=True)
class MethodOptions:
  """The settings of the methods (static: they shape the compiled step)."""

  sabr_lambda: float = 0.4  # SABR's small box: radius λ·ε(x), 0 < λ <= 1
  mtl_alpha: float = 0.5  # MTL-IBP: weight of the IBP loss, 0 <= α <= 1
  attack_steps: int = 8  # PGD steps of the training attack (SABR, MTL-IBP)
  attack_step_ratio: float = 0.25  # per-dimension PGD step, as a share of ε(x)
  fast_reg: float = 0.0  # weight of Shi et al.'s warm-up regularisers (0: off)
  fast_reg_tau: float = 0.5  # their target ratio τ
  eps_max: float = 1.0  # the ε₀ the ramp ends at (the regularisers fade as ε₀ reaches it)
  loss_fusion: bool = False  # CROWN-IBP: bound the cross-entropy directly (CertifiedModel)

  def __post_init__(self):
    if not 0 < self.sabr_lambda <= 1:
      raise ValueError(f"--sabr_lambda must be in (0, 1], got {self.sabr_lambda}")
    if not 0 <= self.mtl_alpha <= 1:
      raise ValueError(f"--mtl_alpha must be in [0, 1], got {self.mtl_alpha}")
    if self.attack_steps < 1:
      raise ValueError(f"--train_attack_steps must be >= 1, got {self.attack_steps}")
    if self.fast_reg < 0:
      raise ValueError(f"--fast_reg must be >= 0, got {self.fast_reg}")


# ---------------------------------------------------------------------------------------------
# Pieces


def attack_point(model: CertifiedModel, variables: Variables, x, labels, eps, key, options):
  """A PGD point of ``[x - eps, x + eps] ∩ [0, 1]`` (no gradient flows through it).

  ``variables`` are the ones the bounds use (with BatchNorm: the batch's statistics, frozen), so
  each example is attacked independently of the rest of the batch.
  """
  frozen = jax.lax.stop_gradient(variables)
  point = pgd_attack(
    lambda z: model.logits(frozen, z),
    jax.lax.stop_gradient(x),
    labels,
    jax.lax.stop_gradient(eps),
    steps=options.attack_steps,
    step_size_ratio=options.attack_step_ratio,
    key=key,
    loss="ce",
  )
  return jax.lax.stop_gradient(point)


def sabr_box(full: Box, centre, eps, lam) -> Box:
  """SABR's small box: radius ``min(λ·eps, radius of full)``, centred on ``centre`` moved (clipped)
  so that the box fits inside ``full``; the final clip keeps it inside exactly despite rounding."""
  radius = jnp.minimum(lam * eps, full.radius)
  centre = jnp.clip(centre, full.lower + radius, full.upper - radius)
  lower = jnp.clip(centre - radius, full.lower, full.upper)
  upper = jnp.clip(centre + radius, full.lower, full.upper)
  return Box(lower, upper)


def _preactivation_filter(has_batchnorm: bool):
  """Which module outputs feed a ReLU: BatchNorm's in nets with BatchNorm, else Dense/Conv's."""
  kinds = (nn.BatchNorm,) if has_batchnorm else (nn.Dense, nn.Conv)
  return lambda module, method: method == "__call__" and isinstance(module, kinds)


def _in_call_order(tree) -> list:
  """The leaves of Flax's ``intermediates`` in the order the modules ran (dicts keep it)."""
  if isinstance(tree, dict):
    return [leaf for value in tree.values() for leaf in _in_call_order(value)]
  if isinstance(tree, (tuple, list)):
    return [leaf for value in tree for leaf in _in_call_order(value)]
  return [tree]


def preactivation_bounds(model: CertifiedModel, variables: Variables, box: Box) -> list[Box]:
  """IBP bounds of the hidden layers' pre-activations over ``box``, input to output.

  The pre-activations are the outputs of the affine modules before each ReLU (BatchNorm's when
  the net has BatchNorm, in inference mode: pass the batch's statistics as ``batch_stats`` for
  training-mode bounds); the logits are left out. One IBP pass bounds them all.
  """
  has_bn = variables.batch_stats is not None
  cls_vars = model.classifier_variables(variables)
  n = box.shape[0]

  def hidden(v, x):
    logits, state = model.classifier.apply(
      v,
      x,
      train=False,
      capture_intermediates=_preactivation_filter(has_bn),
      mutable=["intermediates"],
    )
    values = [a for a in _in_call_order(state["intermediates"]) if a.shape != logits.shape]
    return values

  shapes = [a.shape for a in jax.eval_shape(hidden, cls_vars, box.lower)]
  if not shapes:
    raise ValueError("the classifier has no hidden layer (no pre-activation to bound)")
  flat = lambda v, x: jnp.concatenate([a.reshape(n, -1) for a in hidden(v, x)], axis=1)
  bounds = ibp(flat)(cls_vars, box)
  sizes = [math.prod(s[1:]) for s in shapes]
  splits = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
  lowers = jnp.split(bounds.lower, splits, axis=1)
  uppers = jnp.split(bounds.upper, splits, axis=1)
  return [Box(lo.reshape(s), up.reshape(s)) for lo, up, s in zip(lowers, uppers, shapes)]


def fast_regularizer(layers: list[Box], input_box: Box, tau: float = 0.5):
  """Shi et al.'s (2021) warm-up regularisers, averaged over layers (each 0 when satisfied).

  Tightness: the mean input radius over the mean pre-activation radius should stay above ``tau``
  (IBP widths must not blow up). ReLU balance: the mean interval centre of the surely active
  neurons against that of the surely inactive ones, and the spread of their centres, should be of
  similar size (ratios above ``tau``), so neither kind dominates.
  """
  tiny = 1e-12
  input_radius = jnp.mean(input_box.radius)
  total = 0.0
  for box in layers:
    centre, radius = box.center, jnp.mean(box.radius)
    tightness = jax.nn.relu(tau - input_radius / jnp.maximum(radius, tiny)) / tau
    active, inactive = box.lower > 0, box.upper < 0
    mean_active = jnp.mean(jnp.where(active, centre, 0.0))
    mean_inactive = -jnp.mean(jnp.where(inactive, centre, 0.0))
    spread = (centre - jnp.mean(centre)) ** 2
    var_active = jnp.sum(jnp.where(active, spread, 0.0))
    var_inactive = jnp.sum(jnp.where(inactive, spread, 0.0))

    def balanced(a, b):  # min(a/b, b/a), 0 when either side is empty
      return jnp.minimum(a / jnp.maximum(b, tiny), b / jnp.maximum(a, tiny))

    relu = (
      jax.nn.relu(tau - balanced(mean_active, mean_inactive))
      + jax.nn.relu(tau - balanced(var_active, var_inactive))
    ) / tau
    total = total + tightness + relu
  return total / len(layers)


def _redraw_layers(params, key, draw):
  """``params`` with the kernels of its Dense and Conv layers, and the biases beside them, redrawn:
  ``draw(name, leaf, fan_in, key)`` (name ``"kernel"`` or ``"bias"``; fan_in: the layer kernel's)
  gives the new leaf, or ``None`` to keep it. Every other parameter is kept."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  fan_in = {  # the parent path of each kernel -> its fan-in, for the bias beside it
    path[:-1]: math.prod(leaf.shape[:-1])
    for path, leaf in leaves
    if getattr(path[-1], "key", None) == "kernel"
  }
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    name = getattr(path[-1], "key", None)
    new = None
    if name in ("kernel", "bias") and path[:-1] in fan_in:
      new = draw(name, leaf, fan_in[path[:-1]], k)
    out.append(leaf if new is None else new)
  return jax.tree_util.tree_unflatten(treedef, out)


def fast_init(params, key):
  """Shi et al.'s (2021) IBP initialisation of a Flax parameter tree: every ``kernel`` drawn from
  ``N(0, 2π / n_in²)`` (``n_in``: its fan-in), so that the expected IBP width is kept from one layer
  to the next instead of growing like ``√n_in``; biases and other parameters are kept."""

  def draw(name, leaf, fan_in, k):
    if name != "kernel":
      return None
    return jax.random.normal(k, leaf.shape, leaf.dtype) * math.sqrt(2 * math.pi) / fan_in

  return _redraw_layers(params, key, draw)


def torch_init(params, key):
  """PyTorch's default initialisation of ``nn.Linear`` and ``nn.Conv2d`` on a Flax parameter tree:
  every ``kernel`` and the ``bias`` beside it drawn from ``U(-1/sqrt(n_in), 1/sqrt(n_in))`` (n_in:
  the kernel's fan-in; ``kaiming_uniform(a=sqrt(5))`` reduces to this bound). Its variance,
  ``1 / (3 n_in)``, is a third of Flax's LeCun normal default; auto_LiRPA's and CROWN-IBP's
  reference runs start from it, so ``--init torch`` lets a run match them."""

  def draw(name, leaf, fan_in, k):
    bound = 1 / math.sqrt(fan_in)
    return jax.random.uniform(k, leaf.shape, leaf.dtype, -bound, bound)

  return _redraw_layers(params, key, draw)


# ---------------------------------------------------------------------------------------------
# Methods


def _with_fast_reg(out: LossOutput, model, bound_variables, box, eps0, options) -> LossOutput:
  if options.fast_reg == 0:
    return out
  layers = preactivation_bounds(model, bound_variables, box)
  fade = jnp.clip(1 - eps0 / options.eps_max, 0.0, 1.0)
  reg = options.fast_reg * fade * fast_regularizer(layers, box, options.fast_reg_tau)
  return out._replace(losses=out.losses._replace(loss=out.losses.loss + reg))


def _bound_method(name):
  def loss(model, variables, x, labels, *, eps0, kappa, beta, key, options):
    del key
    fused = options.loss_fusion and name == "crown-ibp"
    out = model.certified_loss(
      variables, x, labels, eps0=eps0, kappa=kappa, beta=beta, method=name, loss_fusion=fused
    )
    if options.fast_reg == 0:
      return out
    # The regularisers need the bounds' variables and box again: recomputed only when they are on.
    _, bound_variables, _ = model.training_logits(variables, x)
    return _with_fast_reg(out, model, bound_variables, model.box(x, out.eps), eps0, options)

  return loss


def sabr_loss(model, variables, x, labels, *, eps0, kappa, beta, key, options) -> LossOutput:
  """SABR: the robust cross-entropy of IBP over :func:`sabr_box` around a PGD point."""
  del beta
  clean_logits, bound_variables, batch_stats = model.training_logits(variables, x)
  eps = model.budgets(variables.params, x, eps0)
  full = model.box(x, eps)
  centre = attack_point(model, bound_variables, x, labels, eps, key, options)
  small = sabr_box(full, centre, eps, options.sabr_lambda)
  lower = model.margin_bounds(bound_variables, small, labels, "ibp")
  out = LossOutput(
    certified_loss(clean_logits, lower, labels, kappa), clean_logits, lower, eps, batch_stats
  )
  return _with_fast_reg(out, model, bound_variables, full, eps0, options)


def mtl_ibp_loss(model, variables, x, labels, *, eps0, kappa, beta, key, options) -> LossOutput:
  """MTL-IBP: robust part ``α·(IBP robust cross-entropy) + (1 − α)·(cross-entropy at PGD point)``."""
  del beta
  clean_logits, bound_variables, batch_stats = model.training_logits(variables, x)
  eps = model.budgets(variables.params, x, eps0)
  box = model.box(x, eps)
  lower = model.margin_bounds(bound_variables, box, labels, "ibp")
  point = attack_point(model, bound_variables, x, labels, eps, key, options)
  adv_logits = model.logits(bound_variables, point)
  adversarial = optax.softmax_cross_entropy_with_integer_labels(adv_logits, labels).mean()
  verified = robust_cross_entropy(lower, labels, clean_logits.shape[-1])
  alpha = options.mtl_alpha
  robust = alpha * verified + (1 - alpha) * adversarial
  clean = certified_loss(clean_logits, lower, labels, kappa).clean
  losses = Losses(kappa * clean + (1 - kappa) * robust, clean, robust)
  out = LossOutput(losses, clean_logits, lower, eps, batch_stats)
  return _with_fast_reg(out, model, bound_variables, box, eps0, options)


METHODS: dict[str, Callable[..., LossOutput]] = {
  "ibp": _bound_method("ibp"),
  "crown-ibp": _bound_method("crown-ibp"),
  "sabr": sabr_loss,
  "mtl-ibp": mtl_ibp_loss,
}
TRAIN_METHODS = tuple(METHODS)


def get(name: str) -> Callable[..., LossOutput]:
  """The loss function of the training method ``name`` (one of :data:`TRAIN_METHODS`)."""
  if name not in METHODS:
    raise ValueError(f"--method={name!r} cannot train; choose one of {TRAIN_METHODS}")
  return METHODS[name]
