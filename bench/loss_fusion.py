"""How tight is loss fusion? Mean robust cross-entropy bounds of a trained run, margin form vs fused.

  python -m bench.loss_fusion --workdir W [--num_examples 256] [--eps 0.05,0.1,0.2,0.3]

Per ε (uniform budgets): the robust cross-entropy of the margins' lower bounds from IBP and from
CROWN-IBP (the margin form CROWN-IBP training minimises), and the fused bound (one backward row per
example): the cross-entropy bounded whole, ``log`` relaxed by a tangent (as auto_LiRPA does), with
the margins' intervals from the logits' intervals (``lower(z_y) - upper(z_j)``, the first version,
given to the fused function as :func:`cbudget.bounds.reference_bounds`) and from IBP with the
margin folded into the last layer; and ``log`` applied after bounding its input, with the folded
intervals (what training uses, :func:`cbudget.objective.fused_bounds`).
Lower is tighter; every column is an upper bound of the worst-case cross-entropy.
"""

import argparse

import jax
import jax.numpy as jnp

from cbudget.bounds import Box, crown, crown_ibp_head, ibp, reference_bounds
from bench.common import trained_run_and_test_images
from cbudget.objective import (
  fused_robust_cross_entropy,
  margin_lower_bounds,
  margin_spec,
  negative_cross_entropy_of_margins,
  robust_cross_entropy,
)


def fused_over(f, variables, box, spec, margins: Box):
  """The fused bound with the margins' intervals given (as reference bounds) rather than folded."""

  def negative_cross_entropy(inputs, x):
    params, lower, upper = inputs
    m = reference_bounds(jnp.einsum("nsk,nk->ns", spec, f(params, x)), lower, upper)
    return negative_cross_entropy_of_margins(m, Box(lower, upper))

  return -crown(negative_cross_entropy, need_upper=False)(
    (variables, margins.lower, margins.upper), box
  ).lower[:, 0]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_examples", type=int, default=256)
  parser.add_argument("--eps", default="0.05,0.1,0.2,0.3")
  args = parser.parse_args()
  config, model, run_variables, x, labels = trained_run_and_test_images(
    args.workdir, args.num_examples
  )
  variables = model.classifier_variables(run_variables)
  f, k = model._apply, model.num_classes
  spec = margin_spec(labels, k)

  @jax.jit
  def columns(eps):
    box = model.box(x, jnp.full_like(x, eps))
    out = {
      m: robust_cross_entropy(margin_lower_bounds(f, variables, box, spec, m), labels, k)
      for m in ("ibp", "crown-ibp")
    }
    logits = ibp(f)(variables, box)
    true = lambda end: jnp.take_along_axis(end, labels[:, None], axis=1)
    others = lambda end: jnp.einsum("nsk,nk->ns", -jnp.minimum(spec, 0), end)  # z_j, j != y
    differenced = Box(
      true(logits.lower) - others(logits.upper), true(logits.upper) - others(logits.lower)
    )
    out["fused, logits' intervals"] = fused_over(f, variables, box, spec, differenced).mean()
    tangent = crown_ibp_head(f, negative_cross_entropy_of_margins, need_upper=False)
    out["fused, log's tangent"] = -tangent(variables, box, spec).crown.lower.mean()
    out["fused, log after"] = fused_robust_cross_entropy(f, variables, box, labels, k).mean()
    return out

  print(f"{args.workdir}: {config.model}, {args.num_examples} test examples")
  for eps in (float(e) for e in args.eps.split(",")):
    row = columns(eps)
    print(f"eps {eps:5.3f}  " + "  ".join(f"{name} {float(v):.3f}" for name, v in row.items()))


if __name__ == "__main__":
  main()
