"""The classifier with its budgets: one object from an image batch to budgets, box, bounds and loss.

    model = CertifiedModel.create(
      dataset="shapes", classifier="dm_small", budget="contextual", budget_range=(0.25, 4.0)
    )
    variables = model.init(jax.random.key(0), images[:1])
    eps = model.budgets(variables.params, x, eps0)            # per-element budgets, exact volume
    box = model.box(x, eps)                                   # [x - eps, x + eps] ∩ [0, 1]
    lower = model.margin_bounds(variables, box, labels, "crown-ibp", beta)  # [N, K-1]
    out = model.certified_loss(variables, x, labels, eps0=eps0, kappa=kappa, method="ibp")

A training method is a small function over these pieces (budgets, box, bounds, loss); the object is
frozen and hashable, so it closes over jitted functions as a constant.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from cbudget import data
from cbudget.bounds import Box
from cbudget.budgets import BudgetConfig, budgets, make_budget_config
from cbudget.models import classifiers, generators
from cbudget.objective import (
  Losses,
  certified_loss,
  fused_certified_loss,
  margin_lower_bounds,
  margin_spec,
)


class Variables(NamedTuple):
  """Everything learned: parameters and the classifier's BatchNorm statistics."""

  params: Any  # {"classifier": ..., "budget": ... or None (uniform budgets)}
  batch_stats: Any = None  # BatchNorm running statistics, or None without BatchNorm


class LossOutput(NamedTuple):
  losses: Losses  # the loss trained, and its clean and robust parts
  clean_logits: jax.Array
  margin_lower: jax.Array  # [N, K-1] lower bounds of logit_y - logit_j over the box
  eps: jax.Array  # the budgets, x's shape
  batch_stats: Any  # BatchNorm running statistics after this batch (or None)


@dataclasses.dataclass(frozen=True)
class CertifiedModel:
  """A classifier, the model of its budgets (None for uniform budgets) and how budgets are formed.

  ``classifier`` is a Flax module called as ``classifier(x, train=...)``; ``budget_model`` maps
  ``x`` to raw log-budgets, which :func:`cbudget.budgets.budgets` turns into budgets of exact
  volume under ``budget_config``. ``bound_block``: CROWN-IBP bounds (margins and loss fusion) are
  computed on blocks of that many examples (None: the whole batch at once; the same bounds, see
  :func:`cbudget.bounds.in_example_blocks`).
  """

  classifier: nn.Module
  budget_model: nn.Module | None
  budget_config: BudgetConfig
  num_classes: int
  bound_block: int | None = None

  @classmethod
  def create(
    cls,
    *,
    dataset: str,
    classifier: str,
    budget: str,
    generator: str = "coarse",
    per_pixel: bool = True,
    budget_range: tuple[float, float] | None = None,
    volume: str = "nominal",
    squash: str = "clip",
    bound_block: int | None = None,
  ) -> CertifiedModel:
    """The model of a run, by names; the dataset's facts give the classes and normalisation."""
    facts = data.info(dataset)
    slot_shape = None
    if budget == "oracle" and dataset in ("mnist_canvas", "cifar_canvas"):
      slot_shape = data.info(facts.base).shape[:2]  # one slot holds one image of the base data
    return cls(
      classifiers.get_classifier(classifier, facts.num_classes, mean=facts.mean, std=facts.std),
      generators.budget_model(budget, generator, per_pixel, slot_shape),
      make_budget_config(budget, budget_range, per_pixel, volume, squash),
      facts.num_classes,
      bound_block,
    )

  def init(self, key, example) -> Variables:
    """Initial variables from a key and an example batch (only its shape and dtype matter)."""
    k_cls, k_gen, _ = jax.random.split(key, 3)  # three keys, as every run so far was initialised
    variables = self.classifier.init(k_cls, example, train=False)
    params = {"classifier": variables["params"], "budget": None}
    if self.budget_model is not None:
      # an empty dict for a budget model without parameters (the oracle)
      params["budget"] = self.budget_model.init(k_gen, example).get("params", {})
    return Variables(params, variables.get("batch_stats"))

  def classifier_variables(self, variables: Variables) -> dict:
    """The Flax variables of the classifier (with ``batch_stats`` when it has BatchNorm)."""
    out = {"params": variables.params["classifier"]}
    if variables.batch_stats is not None:
      out["batch_stats"] = variables.batch_stats
    return out

  def budgets(self, params, x, eps0) -> jax.Array:
    """Budgets of ``x`` (its shape) with the volume of a uniform ``eps0``."""
    raw = None
    if self.budget_model is not None:
      raw = self.budget_model.apply({"params": params["budget"]}, x)
    return budgets(self.budget_config, eps0, raw, x.shape, x=x)

  def box(self, x, eps) -> Box:
    """The threat model: ``[x - eps, x + eps] ∩ [0, 1]``."""
    return Box.from_budget(x, eps)

  def _apply(self, classifier_variables, x):
    return self.classifier.apply(classifier_variables, x, train=False)

  def logits(self, variables: Variables, x) -> jax.Array:
    """Inference-mode logits (BatchNorm uses its running statistics)."""
    return self._apply(self.classifier_variables(variables), x)

  def training_logits(self, variables: Variables, x):
    """``(logits, variables for the bounds, new running statistics)`` of a training batch.

    With BatchNorm, the batch's own statistics normalise the clean pass, and the bounds use those
    same statistics, frozen as constants of the affine map (Shi et al., 2021); the running averages
    move towards them. Without BatchNorm this is the inference pass.
    """
    if variables.batch_stats is None:
      return self.logits(variables, x), variables, None
    # A clone with momentum 0 returns the batch statistics themselves as its "running" averages.
    batch_model = self.classifier.clone(bn_momentum=0.0)
    logits, updated = batch_model.apply(
      self.classifier_variables(variables), x, train=True, mutable=["batch_stats"]
    )
    batch_stats = updated["batch_stats"]
    momentum = self.classifier.bn_momentum
    running = jax.tree.map(
      lambda old, cur: momentum * old + (1 - momentum) * cur,
      variables.batch_stats,
      jax.lax.stop_gradient(batch_stats),
    )
    return logits, variables._replace(batch_stats=batch_stats), running

  def precise_batch_stats(self, variables: Variables, images) -> Variables:
    """``variables`` with BatchNorm's running statistics recomputed on the batches ``images``
    (an iterable of clean image batches): the population mean and variance of each layer's inputs
    in training mode, pooled over the batches, in place of the moving averages (precise BatchNorm,
    Wu & Johnson 2021), so inference-mode bounds describe the trained net. Without BatchNorm,
    ``variables`` unchanged."""
    if variables.batch_stats is None:
      return variables
    batch_model = self.classifier.clone(bn_momentum=0.0)

    @jax.jit
    def stats_of(x):
      _, updated = batch_model.apply(
        self.classifier_variables(variables), x, train=True, mutable=["batch_stats"]
      )
      # Per layer: E[x] and E[x²] of this batch (var + mean²), pooled below.
      return jax.tree.map(
        lambda layer: {"mean": layer["mean"], "var": layer["var"] + layer["mean"] ** 2},
        updated["batch_stats"],
        is_leaf=lambda t: isinstance(t, dict) and "mean" in t,
      )

    sums, count = None, 0
    for x in images:
      moments = stats_of(x)
      sums = moments if sums is None else jax.tree.map(lambda a, b: a + b, sums, moments)
      count += 1
    if count == 0:
      raise ValueError("precise_batch_stats needs at least one batch of images")
    pooled = jax.tree.map(
      lambda layer: {
        "mean": layer["mean"] / count,
        "var": jax.numpy.maximum(layer["var"] / count - (layer["mean"] / count) ** 2, 0.0),
      },
      sums,
      is_leaf=lambda t: isinstance(t, dict) and "mean" in t,
    )
    return variables._replace(batch_stats=pooled)

  def margin_bounds(
    self, variables: Variables, box: Box, labels, method: str, beta=1.0, **crown_options
  ) -> jax.Array:
    """Lower bounds ``[N, K-1]`` of ``logit_y - logit_j`` (every ``j != y``) over ``box``.

    ``method`` is one of :data:`cbudget.objective.EVAL_METHODS`; ``beta`` mixes CROWN-IBP with IBP;
    ``crown_options`` (``crown_chunk_size`` or ``crown_memory_limit`` in bytes) cap full CROWN's
    memory.
    """
    spec = margin_spec(labels, self.num_classes, box.dtype)
    return margin_lower_bounds(
      self._apply,
      self.classifier_variables(variables),
      box,
      spec,
      method,
      beta,
      block_size=self.bound_block,
      **crown_options,
    )

  def certified_loss(
    self,
    variables: Variables,
    x,
    labels,
    *,
    eps0,
    kappa,
    beta=1.0,
    method="ibp",
    train=True,
    loss_fusion=False,
  ) -> LossOutput:
    """Budgets for ``x``, the box they span, bounds over it, and the loss training minimises.

    With ``train=True`` BatchNorm uses the batch's statistics (:meth:`training_logits`); with
    ``train=False`` the running ones. ``loss_fusion`` (CROWN-IBP only) bounds the cross-entropy
    directly (:func:`cbudget.objective.fused_certified_loss`); ``margin_lower`` is then the IBP
    margins, raised where the fused bound certifies.
    """
    if loss_fusion and method != "crown-ibp":
      raise ValueError(f"loss fusion applies to CROWN-IBP training, not to method {method!r}")
    if train:
      clean_logits, bound_variables, batch_stats = self.training_logits(variables, x)
    else:
      clean_logits, bound_variables = self.logits(variables, x), variables
      batch_stats = variables.batch_stats
    eps = self.budgets(variables.params, x, eps0)
    box = self.box(x, eps)
    if loss_fusion:
      losses, lower = fused_certified_loss(
        self._apply,
        self.classifier_variables(bound_variables),
        box,
        clean_logits,
        labels,
        kappa,
        beta,
        self.bound_block,
      )
      return LossOutput(losses, clean_logits, lower, eps, batch_stats)
    lower = self.margin_bounds(bound_variables, box, labels, method, beta)
    losses = certified_loss(clean_logits, lower, labels, kappa)
    return LossOutput(losses, clean_logits, lower, eps, batch_stats)
